"""MiniLM encoder throughput on test.json in ``psydef predict``'s chunks of 64 rows, no cache: the former
settings, then each speed lever added in turn (the one-run ratios are what to read on a shared machine).

    python bench/encoder.py --data-dir ../shared/data/psydefconv [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ["PSYDEF_CACHE_DIR"] = "off"  # every text is encoded

from psydef.backbones.encoder import FrozenEncoder, native_dtype  # noqa: E402
from psydef.backbones.minilm import previous_turn  # noqa: E402
from psydef.core.data import read_split  # noqa: E402
from psydef.stages.predict import CHUNK_ROWS  # noqa: E402

MAX_LENGTH = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data/psydefconv")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = read_split(Path(args.data_dir) / "test.json")
    target = list(rows["current_text"])
    previous = [previous_turn(d) for d in rows["dialogue"]]
    settings = [  # (label, encoder settings, texts encoded per utterance)
        ("float32, batches of 64 rows, target + previous turn (before)",
         dict(batch_size=64, batch_tokens=10**9, dtype="float32"), (target, previous)),
        ("float32, batches cut at 1,024 padded tokens, target + previous turn", dict(dtype="float32"), (target, previous)),
        ("float32, batches cut at 1,024 padded tokens, target only", dict(dtype="float32"), (target,)),
        (f"{native_dtype()} (this CPU's choice), batches cut at 1,024 padded tokens, target only (now)", {}, (target,)),
    ]
    encoders = [FrozenEncoder(**kw) for _, kw, _ in settings]
    for encoder in encoders:  # load and warm every model before timing any
        encoder._encode(target[:CHUNK_ROWS], MAX_LENGTH)
    print(f"{len(rows)} utterances of {args.data_dir}/test.json, chunks of {CHUNK_ROWS}, max_length {MAX_LENGTH}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for repeat in range(args.repeats):
        for (label, _, views), encoder in zip(settings, encoders):
            start = time.perf_counter()
            for i in range(0, len(rows), CHUNK_ROWS):
                for texts in views:
                    encoder._encode(texts[i:i + CHUNK_ROWS], MAX_LENGTH)
            seconds = time.perf_counter() - start
            print(f"  repeat {repeat + 1}: {label}: {seconds:.1f} s = {len(rows) / seconds:.1f} utterances/s")


if __name__ == "__main__":
    main()

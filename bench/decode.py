"""Utterances per second of a registered ensemble of the CPU default backbone, decoding test.json.

    python bench/decode.py                                  # models:/psydef-ensemble@production
    python bench/decode.py models:/psydef-ensemble/3 --data-dir ../shared/data/psydefconv

Times loading the model, a first call on the built-in example (it loads the MiniLM encoder), then
predicting every record of test.json in the chunks ``psydef predict`` uses. The on-disk embedding
cache ($PSYDEF_CACHE_DIR) points to an empty temporary folder unless --warm-cache is given, and the
example's texts are not in the test set: every test utterance is encoded inside the timed pass (with
--warm-cache, those that training already embedded are read from the cache). The tracking store is
--tracking-uri, else MLflow's own default ($MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU only, before torch is imported anywhere


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_uri", nargs="?", default=None, help="default: models:/psydef-ensemble@production")
    parser.add_argument("--data-dir", default="../shared/data/psydefconv",
                        help="folder with test.json, or a split file")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    parser.add_argument("--warm-cache", action="store_true", help="keep $PSYDEF_CACHE_DIR (default: an empty one)")
    args = parser.parse_args()
    cold = None if args.warm_cache else tempfile.TemporaryDirectory()
    if cold is not None:
        os.environ["PSYDEF_CACHE_DIR"] = cold.name

    import mlflow
    import torch
    from mlflow import MlflowClient

    from psydef import tracking
    from psydef.backbones import CPU_DEFAULT
    from psydef.core.data import read_split
    from psydef.core.data import INPUT_COLUMNS, example_input
    from psydef.stages.predict import CHUNK_ROWS, split_path

    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    uri = tracking.resolve_model_uri(args.model_uri or tracking.PRODUCTION_URI)
    name, _, number = uri.removeprefix("models:/").partition("/")
    if not uri.startswith("models:/") or not number.isdigit():
        raise SystemExit(f"{uri} is not a registered model: give models:/NAME@ALIAS or models:/NAME/VERSION")
    backbone = MlflowClient().get_model_version(name, number).tags.get(tracking.V_BACKBONE)
    if backbone != CPU_DEFAULT:
        raise SystemExit(f"{uri} is a {backbone} ensemble; this bench times {CPU_DEFAULT} ensembles on CPU")
    table = read_split(split_path(args.data_dir))
    inputs = table.loc[:, list(INPUT_COLUMNS)]

    t = time.perf_counter()
    model = mlflow.pyfunc.load_model(uri)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    model.predict(example_input())
    first_s = time.perf_counter() - t

    t = time.perf_counter()
    for start in range(0, len(inputs), CHUNK_ROWS):
        model.predict(inputs.iloc[start:start + CHUNK_ROWS])
    decode_s = time.perf_counter() - t
    print(f"model {uri} (backbone {backbone}), CPU, {torch.get_num_threads()} torch threads, embedding cache "
          f"{'warm: ' + os.environ.get('PSYDEF_CACHE_DIR', '~/.cache/psydef') if cold is None else 'cold (empty)'}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"load: {load_s:.1f} s; first call (loads the encoder): {first_s:.1f} s")
    print(f"decode: {len(inputs)} utterances in {decode_s:.1f} s = {len(inputs) / decode_s:.1f} utterances/s "
          f"(chunks of {CHUNK_ROWS})")


if __name__ == "__main__":
    main()

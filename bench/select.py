"""Model selection with error bars: repeated grouped cross-validation of CPU candidates.

Each candidate is scored on ``--repeats`` x 5 folds (split seeds 42, 43, ...) under both
``group_by=dialogue`` and ``group_by=utterance``, with the fold assignment of ``prepare``
(psydef.core.folds.fold_table; the augmented variants of a repeat are made with its seed, as prepare
does, and follow their source into the training folds; only candidates that train on augmented rows
see them). Prints, per mode, the mean and standard deviation over repeats of the official OOF
macro-F1 (levels 1..8), the macro-F1 over 0..8 and the accuracy, as a markdown table, then each
candidate's paired difference in F1 1-8 from the first candidate on the same splits (mean ± std over
repeats, and on how many splits it was positive): the split-to-split spread cancels there.

Candidates:
  floor          word TF-IDF of the target + word TF-IDF of the last 6 turns,
                 LogisticRegression(C=4, class_weight="balanced"), real rows only
  torch-head     the former minilm backbone (bench/torch_head.py), through the Backbone interface
  minilm         the CPU default backbone with its defaults
  minilm:K=V,... the CPU default with hyper-parameters changed (values are JSON: C=1,combine="vote")

    python bench/select.py --data-dir ../shared/data/psydefconv --candidates floor,torch-head,minilm

Out-of-fold predictions are cached under $PSYDEF_CACHE_DIR/select (default ~/.cache/psydef/select),
keyed by candidate, its config, mode, split seed and data digest; the MiniLM embeddings in the shared
embedding cache (psydef.backbones.encoder). A rerun only computes what is missing.
"""
from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if __name__ == "select":
    # This file is named like the standard library's ``select``, which another bench script (its folder
    # first on the import path) may import: hand that import the real module, and define nothing here.
    import importlib.machinery
    import importlib.util

    _path = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
    _spec = importlib.machinery.PathFinder.find_spec("select", _path)
    sys.modules["select"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["select"])
else:
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]  # keep this file out of imports
    import argparse
    import hashlib
    import importlib.util
    import json
    import time

    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from psydef.backbones.encoder import FrozenEncoder, cache_root
    from psydef.backbones.minilm import MiniLMBackbone
    from psydef.core.augment import augment_minority, with_provenance
    from psydef.core.data import dataset_digest, read_split
    from psydef.core.folds import GROUP_BY, fold_table, split_fold
    from psydef.core.metrics import evaluate

    METRICS = (("macro_f1", "F1 1-8"), ("macro_f1_all", "F1 0-8"), ("accuracy", "acc"))


    class Floor:
        """The ten-line baseline the default must beat."""

        uses_augmented = False

        def config(self) -> dict:
            return {"C": 4, "context_turns": 6}

        def fit(self, rows: pd.DataFrame, *, seed: int) -> "Floor":
            self.target = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
            self.context = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
            x = sp.hstack([self.target.fit_transform(rows["current_text"]),
                           self.context.fit_transform(self._context(rows))], format="csr")
            self.model = LogisticRegression(C=4, class_weight="balanced", max_iter=2000).fit(x, rows["label"].astype(int))
            return self

        @staticmethod
        def _context(rows: pd.DataFrame) -> list[str]:
            return [" ".join(t["text"] for t in d[-7:-1]) for d in rows["dialogue"]]

        def predict(self, rows: pd.DataFrame) -> np.ndarray:
            x = sp.hstack([self.target.transform(rows["current_text"]), self.context.transform(self._context(rows))],
                          format="csr")
            return self.model.predict(x)


    class ViaBackbone:
        """A psydef Backbone as a candidate: it gets the augmented rows, as the train stage gives them."""

        uses_augmented = True

        def __init__(self, backbone):
            self.backbone = backbone

        def config(self) -> dict:
            return self.backbone.config()

        def fit(self, rows: pd.DataFrame, *, seed: int) -> "ViaBackbone":
            self.backbone.fit(rows, seed=seed)
            return self

        def predict(self, rows: pd.DataFrame) -> np.ndarray:
            return self.backbone.predict_logits(rows).argmax(1)


    def make_candidate(spec: str):
        name, _, args = spec.partition(":")
        hyper = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.split(",") if kv)}
        if name == "floor" and not hyper:
            return Floor()
        if name == "torch-head":
            if "torch_head" not in sys.modules:
                spec_ = importlib.util.spec_from_file_location("torch_head", BENCH / "torch_head.py")
                sys.modules["torch_head"] = importlib.util.module_from_spec(spec_)
                spec_.loader.exec_module(sys.modules["torch_head"])
            return ViaBackbone(sys.modules["torch_head"].TorchHeadBackbone(**hyper))
        if name == "minilm":
            return ViaBackbone(MiniLMBackbone(**hyper))
        raise SystemExit(f"unknown candidate {spec!r}: floor, torch-head[:K=V,...] or minilm[:K=V,...]")


    def cache_key(spec: str, candidate, mode: str, seed: int, digest: str) -> str:
        """By candidate kind and full config (not by how the spec spelled it): ``minilm`` and
        ``minilm:C=0.5`` share their results while C=0.5 is the default; ``minilm`` also by the encoder
        (its dtype follows the CPU)."""
        kind = spec.partition(":")[0]
        encoder = [FrozenEncoder.shared().key] if kind == "minilm" else []
        return hashlib.sha256(json.dumps([kind, candidate.config(), mode, seed, digest, *encoder]).encode()).hexdigest()[:24]


    def oof_predictions(spec: str, real: pd.DataFrame, mode: str, seed: int, digest: str, cache: Path | None,
                        cached_only: bool = False):
        """(OOF predictions for the real rows, seconds spent), read from the cache when present; None when
        ``cached_only`` and not cached."""
        candidate = make_candidate(spec)
        key = cache_key(spec, candidate, mode, seed, digest)
        path = None if cache is None else cache / f"{key}.json"
        if path is not None and path.is_file():
            saved = json.loads(path.read_text())
            return np.asarray(saved["pred"]), saved["seconds"]
        if cached_only:
            return None
        start = time.perf_counter()
        augmented = augment_minority(real, seed=seed, k=3 if candidate.uses_augmented else 0)
        folds = fold_table(real, augmented, seed=seed, group_by=mode)
        rows = pd.concat([with_provenance(real), augmented], ignore_index=True).set_index("id", drop=False)
        pred = pd.Series(-1, index=real["id"])
        for k in range(int(folds["fold"].max()) + 1):
            train_ids, valid_ids = split_fold(folds, k)
            model = make_candidate(spec).fit(rows.loc[train_ids["id"]], seed=seed)
            pred[valid_ids["id"].to_numpy()] = model.predict(rows.loc[valid_ids["id"]])
        seconds = time.perf_counter() - start
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"spec": spec, "mode": mode, "seed": seed, "pred": pred.tolist(),
                                        "seconds": seconds}))
        return pred.to_numpy(), seconds


    def main() -> None:
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--data-dir", default="../shared/data/psydefconv")
        parser.add_argument("--candidates", default="floor,torch-head,minilm", help="comma-free list, ';'-separated "
                            "when a candidate has arguments, e.g. 'floor;minilm:C=1,combine=\"vote\"'")
        parser.add_argument("--repeats", type=int, default=3)
        parser.add_argument("--modes", default=",".join(GROUP_BY))
        parser.add_argument("--cached-only", action="store_true", help="print what the cache holds, compute nothing "
                            "(a cell then says how many repeats it averages)")
        args = parser.parse_args()
        specs = args.candidates.split(";") if ";" in args.candidates else args.candidates.split(",")
        modes = args.modes.split(",")
        for spec in specs:  # a bad hyper-parameter stops here, before any data is read
            try:
                make_candidate(spec)
            except ValueError as err:
                raise SystemExit(f"--candidates {spec}: {err}") from None
        real = read_split(Path(args.data_dir) / "train.json", labelled=True)
        digest = dataset_digest(real)
        root = cache_root()
        cache = None if root is None else root / "select"
        y = real["label"].to_numpy()
        table = {}
        for spec in specs:
            for mode in modes:
                runs = []
                for r in range(args.repeats):
                    found = oof_predictions(spec, real, mode, 42 + r, digest, cache, args.cached_only)
                    if found is None:
                        continue
                    pred, seconds = found
                    runs.append({**evaluate(y, pred), "seconds": seconds, "seed": 42 + r})
                    print(f"{spec} {mode} seed {42 + r}: F1 1-8 {runs[-1]['macro_f1']:.4f} ({seconds:.0f} s)",
                          file=sys.stderr, flush=True)
                table[spec, mode] = runs
        print(f"\n{args.repeats} repeats x 5 folds (split seeds 42..{41 + args.repeats}), {len(real)} records; "
              "mean ± std over repeats of the OOF scores\n")
        header = "| candidate | " + " | ".join(f"{mode}: {label}" for mode in modes for _, label in METRICS) + " | s / 5 folds |"
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for spec in specs:
            cells = [_cell([r[m] for r in table[spec, mode]], args.repeats) for mode in modes for m, _ in METRICS]
            seconds = [r["seconds"] for mode in modes for r in table[spec, mode]]
            print(f"| `{spec}` | " + " | ".join(cells) + f" | {np.mean(seconds) if seconds else float('nan'):.0f} |")
        if len(specs) > 1:
            print(f"\nPaired difference in F1 1-8 from `{specs[0]}` on the same splits (mean ± std over repeats, "
                  "splits where it is positive)\n")
            print("| candidate | " + " | ".join(modes) + " |")
            print("|" + "---|" * (len(modes) + 1))
            for spec in specs[1:]:
                print(f"| `{spec}` | " + " | ".join(_paired(table[specs[0], mode], table[spec, mode]) for mode in modes) + " |")


    def _paired(reference: list[dict], runs: list[dict]) -> str:
        by_seed = {r["seed"]: r["macro_f1"] for r in reference}
        diffs = [r["macro_f1"] - by_seed[r["seed"]] for r in runs if r["seed"] in by_seed]
        if not diffs:
            return "not run"
        return f"{np.mean(diffs):+.4f} ± {np.std(diffs):.4f} ({sum(d > 0 for d in diffs)}/{len(diffs)})"


    def _cell(values: list[float], repeats: int) -> str:
        if not values:
            return "not run"
        text = f"{np.mean(values):.4f} ± {np.std(values):.4f}"
        return text if len(values) == repeats else f"{text} (n={len(values)})"


    if __name__ == "__main__":
        main()

"""Model selection with error bars: repeated grouped cross-validation of CPU ensembles.

A candidate is a member list and a seed count, ``MEMBERS[@SEEDS]`` (``minilm``, ``minilm@2``,
``minilm;minilm:combine=vote@3``): each member is trained for each seed, as ``main`` does, every
(member, seed) on the seed's own fold partition (psydef.core.folds.fold_table with that seed and
grouping, as prepare makes it; the augmented variants of a seed are made with it and follow their source
into the training folds; only members that train on augmented rows see them). Every (member, seed) gives
out-of-fold logits for every real record, from the fold model of its partition that did not see the
record, so the plain blend of a candidate (psydef.calibration.rule.plain_decode: the equal-weight average
of the members' softmax probabilities, what ``tune`` logs as the raw blend) is scored on honest OOF.

Repeat r (``--repeats``) trains seed j of every candidate with seed 42 + r + 100 j: the first seed of every
candidate has the same partition as the reference in the same repeat, and no two repeats share a seed.
Prints, per grouping mode (``group_by=dialogue`` and ``group_by=utterance``), the mean and standard
deviation over repeats of the official OOF macro-F1 (levels 1..8), the macro-F1 over 0..8 and the accuracy,
and the training time (seconds per repeat: every member and seed, 5 folds each) as a markdown table, then
each candidate's paired difference in F1 1-8 from the first candidate in the same repeat (mean ± std over
repeats, and in how many repeats it was positive): the split-to-split spread cancels there.

Members:
  floor          word TF-IDF of the target + word TF-IDF of the last 6 turns,
                 LogisticRegression(C=4, class_weight="balanced"), real rows only
  torch-head     the former minilm backbone (bench/torch_head.py), through the Backbone interface
  minilm         the CPU default backbone with its defaults
  minilm:K=V,... the CPU default with hyper-parameters changed (values parsed as JSON where they parse,
                 else strings, like --hyper: C=1,combine=vote)

    python bench/select.py --data-dir ../shared/data/psydefconv -c minilm -c minilm@2 -c 'minilm;minilm:combine=vote'

Out-of-fold logits are cached under $PSYDEF_CACHE_DIR/select (default ~/.cache/psydef/select), keyed by
member kind, its full config, mode, seed (= partition) and data digest, and for ``minilm`` the encoder: a
member shared by candidates, seeds shared by seed counts and the reference are computed once; the
embeddings sit in the shared embedding cache (psydef.backbones.encoder). A rerun only computes what is missing.
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
    from psydef.backbones.minilm import MISSING_CLASS_LOGIT, MiniLMBackbone
    from psydef.calibration.rule import plain_decode
    from psydef.core.augment import augment_minority, with_provenance
    from psydef.core.data import dataset_digest, read_split
    from psydef.core.folds import GROUP_BY, fold_table, split_fold
    from psydef.core.labels import N_LEVELS
    from psydef.core.metrics import evaluate
    from psydef.stages.config import parse_hyper

    SEED_STRIDE = 100  # seed j of repeat r is 42 + r + SEED_STRIDE * j

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

        def predict_logits(self, rows: pd.DataFrame) -> np.ndarray:
            x = sp.hstack([self.target.transform(rows["current_text"]), self.context.transform(self._context(rows))],
                          format="csr")
            logits = np.full((len(rows), N_LEVELS), MISSING_CLASS_LOGIT)
            logits[:, self.model.classes_] = self.model.predict_log_proba(x)
            return logits


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

        def predict_logits(self, rows: pd.DataFrame) -> np.ndarray:
            return self.backbone.predict_logits(rows)


    def make_member(spec: str):
        name, _, args = spec.partition(":")
        hyper = parse_hyper(args)
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
        raise SystemExit(f"unknown member {spec!r}: floor, torch-head[:K=V,...] or minilm[:K=V,...]")


    def parse_candidate(text: str) -> tuple[list[str], int]:
        """``MEMBERS[@SEEDS]`` -> (member specs, seed count); every member is built once here, so that a
        bad one fails before anything is trained."""
        members, at, seeds = text.rpartition("@")
        if not at or not seeds.isdigit():
            members, seeds = text, "1"
        specs = [m.strip() for m in members.split(";") if m.strip()]
        if not specs or int(seeds) < 1:
            raise SystemExit(f"candidate {text!r}: expected MEMBER;MEMBER...[@SEEDS] with SEEDS >= 1")
        for spec in specs:
            try:
                make_member(spec)
            except ValueError as err:  # a bad hyper-parameter value, named by the backbone
                raise SystemExit(f"candidate {text!r}: {err}") from None
        return specs, int(seeds)


    def cache_key(spec: str, member, mode: str, seed: int, digest: str) -> str:
        """By member kind and full config (not by how the spec spelled it): ``minilm`` and
        ``minilm:C=0.5`` share their results while C=0.5 is the default; ``minilm`` also by the encoder
        (its dtype follows the CPU). The seed is the partition's and the training's."""
        kind = spec.partition(":")[0]
        config = member.config()
        encoder = [FrozenEncoder.shared(config["encoder"]).key] if kind == "minilm" else []
        return hashlib.sha256(json.dumps(["logits", kind, config, mode, seed, digest, *encoder]).encode()).hexdigest()[:24]


    def oof_logits(spec: str, real: pd.DataFrame, mode: str, seed: int, digest: str, cache: Path | None,
                   cached_only: bool = False):
        """(OOF logits (n, 9) of the real rows from member ``spec`` trained with ``seed`` on the seed's own
        partition, seconds spent), read from the cache when present; None when ``cached_only`` and not cached."""
        member = make_member(spec)
        key = cache_key(spec, member, mode, seed, digest)
        path = None if cache is None else cache / f"{key}.npz"
        if path is not None and path.is_file():
            with np.load(path) as saved:
                return saved["logits"], float(saved["seconds"])
        if cached_only:
            return None
        start = time.perf_counter()
        augmented = augment_minority(real, seed=seed, k=3 if member.uses_augmented else 0)
        folds = fold_table(real, augmented, seed=seed, group_by=mode)
        rows = pd.concat([with_provenance(real), augmented], ignore_index=True).set_index("id", drop=False)
        position = pd.Series(np.arange(len(real)), index=real["id"])
        logits = np.full((len(real), N_LEVELS), np.nan)
        for k in range(int(folds["fold"].max()) + 1):
            train_ids, valid_ids = split_fold(folds, k)
            model = make_member(spec).fit(rows.loc[train_ids["id"]], seed=seed)
            logits[position[valid_ids["id"]].to_numpy()] = model.predict_logits(rows.loc[valid_ids["id"]])
        assert np.isfinite(logits).all(), "a real record got no out-of-fold logits"
        seconds = time.perf_counter() - start
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, logits=logits, seconds=seconds)
            tmp.replace(path)
        return logits, seconds


    def main() -> None:
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--data-dir", default="../shared/data/psydefconv")
        parser.add_argument("-c", "--candidate", action="append", dest="candidates",
                            help="MEMBERS[@SEEDS], repeatable; the first is the reference of the paired differences "
                                 "(default: floor, torch-head, minilm)")
        parser.add_argument("--repeats", type=int, default=5)
        parser.add_argument("--modes", default=",".join(GROUP_BY))
        parser.add_argument("--cached-only", action="store_true", help="print what the cache holds, compute nothing "
                            "(a cell then says how many repeats it averages)")
        args = parser.parse_args()
        names = args.candidates or ["floor", "torch-head", "minilm"]
        candidates = {name: parse_candidate(name) for name in names}
        modes = args.modes.split(",")
        real = read_split(Path(args.data_dir) / "train.json", labelled=True)
        digest = dataset_digest(real)
        root = cache_root()
        cache = None if root is None else root / "select"
        y = real["label"].to_numpy()
        table = {}
        for name, (specs, n_seeds) in candidates.items():
            for mode in modes:
                runs = []
                for r in range(args.repeats):
                    seeds = [42 + r + SEED_STRIDE * j for j in range(n_seeds)]
                    found = [oof_logits(spec, real, mode, seed, digest, cache, args.cached_only)
                             for seed in seeds for spec in specs]
                    if any(f is None for f in found):
                        continue
                    pred = plain_decode([logits for logits, _ in found])
                    seconds = sum(s for _, s in found)
                    runs.append({**evaluate(y, pred), "seconds": seconds, "repeat": r})
                    print(f"{name} {mode} repeat {r} (seeds {seeds}): F1 1-8 {runs[-1]['macro_f1']:.4f} "
                          f"({seconds:.0f} s)", file=sys.stderr, flush=True)
                table[name, mode] = runs
        print(f"\n{args.repeats} repeats x 5 folds (seed j of repeat r: 42 + r + {SEED_STRIDE} j), {len(real)} records; "
              "mean ± std over repeats of the plain blend's OOF scores; training seconds per repeat\n")
        header = ("| candidate | members x seeds | " + " | ".join(f"{mode}: {label}" for mode in modes for _, label in METRICS)
                  + " | train s |")
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for name, (specs, n_seeds) in candidates.items():
            cells = [_cell([r[m] for r in table[name, mode]], args.repeats) for mode in modes for m, _ in METRICS]
            seconds = [r["seconds"] for mode in modes for r in table[name, mode]]
            print(f"| `{name}` | {len(specs)} x {n_seeds} | " + " | ".join(cells)
                  + f" | {np.mean(seconds) if seconds else float('nan'):.0f} |")
        if len(names) > 1:
            print(f"\nPaired difference in F1 1-8 from `{names[0]}` in the same repeat (mean ± std over repeats, "
                  "repeats where it is positive)\n")
            print("| candidate | " + " | ".join(modes) + " |")
            print("|" + "---|" * (len(modes) + 1))
            for name in names[1:]:
                print(f"| `{name}` | " + " | ".join(_paired(table[names[0], mode], table[name, mode]) for mode in modes) + " |")


    def _paired(reference: list[dict], runs: list[dict]) -> str:
        by_repeat = {r["repeat"]: r["macro_f1"] for r in reference}
        diffs = [r["macro_f1"] - by_repeat[r["repeat"]] for r in runs if r["repeat"] in by_repeat]
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

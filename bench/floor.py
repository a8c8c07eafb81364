"""The floor the CPU default must beat: TF-IDF of the target + last 6 turns, class-balanced logistic
regression, on the same dialogue-grouped folds as `prepare` (seed 42). Prints the OOF official
macro-F1 (levels 1..8), macro-F1 over 0..8 and accuracy.

    python bench/floor.py --data-dir ../shared/data/psydefconv
"""
import argparse
import time

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from psydef.core.data import read_split
from psydef.core.folds import assign_folds
from psydef.core.metrics import evaluate


def context_and_target(dialogue, turns=6):
    return " ".join(t["text"] for t in dialogue[-turns - 1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/psydefconv")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    start = time.perf_counter()
    table = read_split(f"{args.data_dir}/train.json", labelled=True)
    texts = np.array([context_and_target(d) for d in table["dialogue"]], dtype=object)
    y, folds = table["label"].to_numpy(), assign_folds(table, seed=args.seed)
    pred = np.empty_like(y)
    for k in range(folds.max() + 1):
        model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                              LogisticRegression(class_weight="balanced", max_iter=2000))
        model.fit(texts[folds != k], y[folds != k])
        pred[folds == k] = model.predict(texts[folds == k])
    scores = evaluate(y, pred)
    print(f"TF-IDF (target + last 6 turns) + balanced LR, dialogue-grouped 5-fold OOF, seed {args.seed}:")
    print(f"  official macro-F1 (1..8) {scores['macro_f1']:.4f}  macro-F1 (0..8) {scores['macro_f1_all']:.4f}  "
          f"accuracy {scores['accuracy']:.4f}  ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()

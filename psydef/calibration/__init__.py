"""Calibration of the ensemble on OOF logits (plain numpy and Optuna, no MLflow):

rule.py        the decision rule (softmax, blend, gate, biased argmax) and its file, EnsembleSpec
validation.py  the checks of the input arrays (logits, probabilities, labels, weights, deltas, tau7s)
score.py       vectorised scoring of many candidate rules, and the official macro-F1
study.py       the Optuna search over the rule's parameters (search space, sampler, batches)
storage.py     where a study is stored (memory, SQLite, journal, PostgreSQL) and its cross-process lock
estimate.py    the validated estimate of what the search gains over the plain blend on unseen rows
calibrate.py   the whole calibration of one OOF bundle: search, estimate, choose (what tune calls)
"""

SAMPLERS = ("tpe", "cmaes", "random")  # the Optuna samplers study.py offers (here: read by `psydef tune --help`)

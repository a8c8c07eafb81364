"""Calibration of the ensemble on OOF logits: rule.py (decision rule, EnsembleSpec), score.py (fast
scorer, official F1), estimate.py (the validated gain estimate), study.py (Optuna study)."""

SAMPLERS = ("tpe", "cmaes", "random")  # the Optuna samplers study.py offers (here: read by `psydef tune --help`)

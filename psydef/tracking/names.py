"""Every MLflow name psydef uses: the experiment, tags, stages, artifact paths, metric names, the
registered model and its aliases. Names only: no MLflow import, no I/O."""
from __future__ import annotations

from psydef.core.labels import ALL_LABELS


DEFAULT_EXPERIMENT = "psydef"
# The embedded default: MLflow's local SQLite store in the working directory, artifacts beside it.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# Tags
STAGE = "psydef.stage"
SEED = "psydef.seed"
BACKBONE = "psydef.backbone"
MEMBER = "psydef.member"  # a train run's member spec, canonical (psydef.stages.config.member_tag)
DATA_DIGEST = "psydef.data_digest"
PREPARE_RUN_ID = "psydef.prepare_run_id"
# How a new train run got its prepare run, when none was given: nested under it, or reused (FINISHED, same data
# and settings)
PREPARE_ORIGIN, PREPARE_NESTED, PREPARE_REUSED = "psydef.prepare_origin", "nested", "reused"
TRAIN_RUN_ID = "psydef.train_run_id"  # on an aggregate run: the train run it aggregated
FOLD = "psydef.fold"
FOLD_STATUS = "psydef.fold_status"  # FOLD_FINISHED only once every fold artifact is logged
FOLD_FINISHED = "finished"
CHECKPOINT_EPOCH = "psydef.checkpoint_epoch"  # a fold run's epoch whose checkpoint/ is fully logged
RESUMED_FROM = "psydef.resumed_from"  # a fold run that continued the checkpoint of this killed fold run
MEMBER_RUN_IDS = "psydef.member_run_ids"  # a tune run's train runs, comma-separated, in ensemble order
STUDY_NAME = "psydef.study_name"  # a tune run's Optuna study (in its storage param)
PIPELINE_TUNE_RUN_ID, PIPELINE_MODEL_VERSION = "psydef.tune_run_id", "psydef.model_version"  # on a pipeline run
# MLflow's own tags
PARENT_RUN_ID = "mlflow.parentRunId"  # on nested runs
RUN_NAME = "mlflow.runName"
NOTE = "mlflow.note.content"  # a run's description (the UI's Description box)
# The experiment's kind: model training, not GenAI. MLflow 3.17's UI picks its view from the link
# instead (ui_runs_url); clients that read the kind see it here.
EXPERIMENT_KIND, CUSTOM_MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"
DATASET_CONTEXT, TRAINING = "mlflow.data.context", "training"  # a dataset input's role
# Liveness of a stage run (see "Heartbeat" below): unix time of the last beat, and who beats
HEARTBEAT, HEARTBEAT_PID, HEARTBEAT_HOST = "psydef.heartbeat", "psydef.pid", "psydef.host"
HEARTBEAT_PROCESS = "psydef.process"  # who beats, unambiguously: process_identity()
END_REASON = "psydef.end_reason"  # why a run was ended by another process

# Stages (values of the STAGE tag)
PREPARE, TRAIN, FOLD_RUN, AGGREGATE, TUNE, REGISTER, PROMOTE, PREDICT, PIPELINE = (
    "prepare", "train", "fold", "aggregate", "tune", "register", "promote", "predict", "pipeline")

# Artifact paths
FOLDS_CSV = "folds.csv"
AUGMENTED_JSON = "augmented.json"  # the prepare run's variants, with their source ids
CLASS_PLOT = "plots/class_distribution.png"
OOF_IDS, OOF_LOGITS = "oof/ids.json", "oof/logits.npy"
TEST_IDS, TEST_LOGITS, TEST_PROBS = "test/ids.json", "test/logits.npy", "test/probs.npy"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoint"  # a fold run's training state while it trains (deleted once the fold completes)
ENSEMBLE_JSON = "ensemble.json"
TRIALS_CSV = "trials.csv"
HISTORY_PLOT, IMPORTANCE_PLOT = "plots/optimization_history.png", "plots/param_importances.png"
HISTORY_HTML, IMPORTANCE_HTML = "plots/optimization_history.html", "plots/param_importances.html"  # with plotly
MODEL_ARTIFACT = "model"  # the pyfunc logged by a register run
PREDICTION_JSON, PREDICTION_ZIP = "prediction.json", "prediction.zip"  # CodaBench submission
PREDICT_IDS, PREDICT_PROBS = "ids.json", "probs.npy"
CONFUSION_PLOT = "plots/confusion_matrix.png"
PER_CLASS_F1_PLOT = "plots/per_class_f1.png"
# MLflow's system metrics (SystemMetricsMonitor's names; GPUs add system/gpu_<i>_...), on fold and pipeline runs
SYSTEM_CPU, SYSTEM_MEMORY = "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"

# Model registry: the ensemble's name, its aliases, the deprecated stage set on request
MODEL_NAME = "psydef-ensemble"
PRODUCTION, PREVIOUS = "production", "previous"  # the champion and the one it replaced


def registered_model_uri(name: str, *, version: str | int | None = None, alias: str | None = None) -> str:
    """``models:/name/version`` or ``models:/name@alias``."""
    return f"models:/{name}/{version}" if alias is None else f"models:/{name}@{alias}"


PRODUCTION_URI = registered_model_uri(MODEL_NAME, alias=PRODUCTION)
LEGACY_STAGE = "Production"

# Tune metrics. RAW_F1: the plain blend (equal weights, delta 0, no gate) on the OOF rows; CALIBRATED_F1: the
# searched rule on the rows it was searched on (optimistic); CALIBRATED_ESTIMATED_F1 and ESTIMATED_GAIN (with the
# spread of its folds): the searched rule's macro-F1 and gain over the plain blend on rows its search never saw
# (psydef.calibration.estimate); ESTIMATED_F1: that estimate for the rule tune chose. Register logs MODEL_METRICS
# on the logged model it registers; the promote gate compares GATE_METRIC (the version tag of older versions).
RAW_F1, CALIBRATED_F1 = "oof_macro_f1_raw", "oof_macro_f1_calibrated"
CALIBRATED_ESTIMATED_F1 = "oof_macro_f1_calibrated_estimated"
ESTIMATED_GAIN, ESTIMATED_GAIN_STD = "calibration_gain_estimated", "calibration_gain_estimated_fold_std"
ESTIMATED_F1 = "oof_macro_f1_estimated"
OOF_LEVEL_F1 = "oof_f1_level_{}"  # per level, of the chosen rule on the OOF rows (tune) or the argmax (train)
# Train metrics: a train parent's argmax on its OOF rows (and OOF_LEVEL_F1); a fold run's per-epoch loss and
# the validation scores (VAL_PREFIX + a psydef.core.metrics.evaluate score name)
OOF_F1, OOF_F1_ALL, OOF_ACCURACY = "oof_macro_f1", "oof_macro_f1_all", "oof_accuracy"
TRAIN_LOSS, VAL_PREFIX = "train_loss", "val_"
# Tag of a tune run: which rule it chose (the calibrated one only when ESTIMATED_GAIN > 0)
CALIBRATION, CALIBRATED, PLAIN = "psydef.calibration", "calibrated", "plain"
GATE_METRIC = ESTIMATED_F1  # what the promote gate compares: rename in one line
MODEL_METRICS = (RAW_F1, CALIBRATED_F1, CALIBRATED_ESTIMATED_F1, ESTIMATED_GAIN, ESTIMATED_GAIN_STD, ESTIMATED_F1,
                 *(OOF_LEVEL_F1.format(level) for level in ALL_LABELS))
# Model version tags (lineage)
V_TUNE_RUN_ID, V_TRAIN_RUN_IDS, V_DATA_DIGEST, V_BACKBONE = "tune_run_id", "train_run_ids", "data_digest", "backbone"


# The promotion lease (psydef.tracking.lease): a registered model, tagged with its holder
LEASE_SUFFIX = ".promote-lease"
LEASE_OWNER, LEASE_EXPIRES, LEASE_PROCESS = "psydef.lease_owner", "psydef.lease_expires", "psydef.lease_process"

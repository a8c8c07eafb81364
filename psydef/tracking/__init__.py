"""psydef's MLflow layer, one module per concept; tracking code never does math.

names     every MLflow name: tags, stages, artifact paths, metric names, the registered model
store     where to track: configure, the per-store artifact root, the fast probe, the client
writes    writes that several processes make at once, settled by what the store holds
queries   run queries (the only place that builds filter strings)
runs      a stage's run and what it logs: tags, params, descriptions, datasets, arrays, figures
liveness  heartbeats and process identities: no run stays RUNNING after its process is gone
lease     the promotion lease: one promote at a time per registered model
models    the registry, model loading and the smoke test

Callers use ``tracking.X`` for any of them (and ``tracking.redact_uri``, the one password mask)."""
# ruff: noqa: F401 (the package re-exports its modules' names: tracking.X)
from psydef.core.secrets import redact_uri
from psydef.tracking.names import (DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI, STAGE, SEED, BACKBONE, MEMBER, DATA_DIGEST,
                                   PREPARE_RUN_ID, PREPARE_ORIGIN, PREPARE_NESTED, PREPARE_REUSED, TRAIN_RUN_ID, FOLD,
                                   FOLD_STATUS, FOLD_FINISHED, CHECKPOINT_EPOCH, RESUMED_FROM, MEMBER_RUN_IDS,
                                   STUDY_NAME, PIPELINE_TUNE_RUN_ID, PIPELINE_MODEL_VERSION, PARENT_RUN_ID, RUN_NAME,
                                   NOTE, EXPERIMENT_KIND, CUSTOM_MODEL_DEVELOPMENT, DATASET_CONTEXT, TRAINING,
                                   HEARTBEAT, HEARTBEAT_PID, HEARTBEAT_HOST, HEARTBEAT_PROCESS, END_REASON, PREPARE,
                                   TRAIN, FOLD_RUN, AGGREGATE, TUNE, REGISTER, PROMOTE, PREDICT, PIPELINE, FOLDS_CSV,
                                   AUGMENTED_JSON, CLASS_PLOT, OOF_IDS, OOF_LOGITS, TEST_IDS, TEST_LOGITS, TEST_PROBS,
                                   ADAPTER_DIR, CHECKPOINT_DIR, ENSEMBLE_JSON, TRIALS_CSV, HISTORY_PLOT,
                                   IMPORTANCE_PLOT, HISTORY_HTML, IMPORTANCE_HTML, MODEL_ARTIFACT, PREDICTION_JSON,
                                   PREDICTION_ZIP, PREDICT_IDS, PREDICT_PROBS, CONFUSION_PLOT, PER_CLASS_F1_PLOT,
                                   SYSTEM_CPU, SYSTEM_MEMORY, MODEL_NAME, PRODUCTION, PREVIOUS, registered_model_uri,
                                   PRODUCTION_URI, LEGACY_STAGE, RAW_F1, CALIBRATED_F1, CALIBRATED_ESTIMATED_F1,
                                   ESTIMATED_GAIN, ESTIMATED_GAIN_STD, ESTIMATED_F1, OOF_LEVEL_F1, OOF_F1, OOF_F1_ALL,
                                   OOF_ACCURACY, TRAIN_LOSS, VAL_PREFIX, CALIBRATION, CALIBRATED, PLAIN, GATE_METRIC,
                                   MODEL_METRICS, V_TUNE_RUN_ID, V_TRAIN_RUN_IDS, V_DATA_DIGEST, V_BACKBONE,
                                   LEASE_SUFFIX, LEASE_OWNER, LEASE_EXPIRES, LEASE_PROCESS)
from psydef.tracking.store import (configure, ui_runs_url, sqlite_artifact_root, PROBE_TIMEOUT_S, split_userinfo,
                                   TrackingStoreUnreachable, DATABASE_PORTS, probe, client)
from psydef.tracking.writes import (WRITE_ATTEMPTS, ConcurrentWriteConflict, is_unique_violation,
                                    tolerate_concurrent_write, run_tag)
from psydef.tracking.queries import (get_run, member_of, fold_runs, complete_fold_runs, mark_stale_folds_failed,
                                     fold_attempts, checkpointed_fold_run, find_parent, find_finished_run,
                                     finished_train_runs)
from psydef.tracking.runs import (train_tags, fold_tags, complete_fold, stage_run, system_metrics, log_new_params,
                                  set_run_tags, describe, log_dataset, log_training_dataset, log_npy, log_figure,
                                  artifact_uri, load_npy, log_checkpoint, continue_fold_run, delete_checkpoints)
from psydef.tracking.liveness import (HEARTBEAT_S, STALE_AFTER_S, heartbeat, failed_on_sigterm, pid_namespace,
                                      process_identity, process_gone, why_dead, mark_dead_runs_failed)
from psydef.tracking.lease import (LEASE_TTL_S, LEASE_WAIT_S, LeaseLost, lease_name, PromotionLease, promotion_lease)
from psydef.tracking.models import (registered_model, model_version, version_metrics, create_version, resolve_model_uri,
                                    load_model, smoke_test)

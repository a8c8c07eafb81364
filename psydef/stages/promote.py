"""The ``promote`` stage: move the alias ``production`` to a version once the version has loaded and
predicted, and only if its estimated OOF macro-F1 on unseen rows is not below the current champion's; the
champion it replaces gets the alias ``previous``.

Concurrent promotes (on any machines sharing the tracking server) are serialised by the promotion
lease (:class:`psydef.tracking.PromotionLease`): the champion is read, gated against and replaced
while holding it, so they end as some one-after-the-other order of them would. Every check comes
before the registry is changed, so a failure leaves ``production`` where it was.
"""
from __future__ import annotations

from psydef import tracking
from psydef.stages.config import PromoteConfig


class PromotionRefused(ValueError):
    """The champion/challenger gate kept the current production version."""


def _gate_metric(version) -> float:
    value = version.tags.get(tracking.GATE_METRIC)
    if value is None:
        raise ValueError(f"version {version.version} of {version.name!r} has no tag {tracking.GATE_METRIC}, which "
                         "the promote gate compares; register it with `psydef register`, or pass --force")
    return float(value)


def run_promote(config: PromoteConfig):
    """Point the alias ``production`` of model ``config.name`` at ``config.version`` (default: the
    newest) once it has loaded and predicted on the built-in example, and unless its gate metric
    (``tracking.GATE_METRIC``) is below the current champion's (``config.force`` skips that gate). The
    replaced champion gets the alias ``previous``; ``config.legacy_stage`` also moves the version to
    the deprecated stage ``Production``. Returns the promoted ``ModelVersion``."""
    import mlflow

    version, name, force, legacy_stage = config.version, config.name, config.force, config.legacy_stage

    client = tracking.client()
    candidate = tracking.model_version(name, version)
    # MLflow returns version numbers as int here and str there: compare them as str
    number = str(candidate.version)
    with tracking.stage_run(tracking.PROMOTE, f"promote {name} v{number}"):
        tracking.log_new_params({**config.params(), "promoted_version": number})
        # slow, and independent of the champion: before the lease
        tracking.smoke_test(tracking.registered_model_uri(name, version=number))
        with tracking.promotion_lease(name) as lease:
            champion = tracking.registered_model(name).aliases.get(tracking.PRODUCTION)
            champion = None if champion is None else str(champion)
            tracking.log_new_params({"champion_version": champion or ""})
            moves = champion != number
            if moves and champion is not None and not force:
                new, old = _gate_metric(candidate), _gate_metric(client.get_model_version(name, champion))
                mlflow.log_metrics({f"challenger_{tracking.GATE_METRIC}": new,
                                    f"champion_{tracking.GATE_METRIC}": old})
                if new < old:
                    refused = PromotionRefused(f"version {number} has {tracking.GATE_METRIC} {new:.6g}, below "
                                               f"{old:.6g} of production version {champion}: not promoted (pass "
                                               "--force to promote it anyway)")
                    tracking.describe(f"Refused: {refused}.")
                    raise refused
            lease.check("before moving the aliases")
            if legacy_stage:
                client.transition_model_version_stage(name, number, tracking.LEGACY_STAGE,
                                                      archive_existing_versions=True)
            if moves:
                if champion is not None:
                    client.set_registered_model_alias(name, tracking.PREVIOUS, champion)
                client.set_registered_model_alias(name, tracking.PRODUCTION, number)
            lease.check("while moving the aliases")
            now = tracking.registered_model(name).aliases.get(tracking.PRODUCTION)
            if str(now) != number:
                raise tracking.LeaseLost(f"promote: {tracking.PRODUCTION} of {name!r} is version {now}, not {number}, "
                                         "after moving it under the lease; check the aliases and promote again")
        outcome = (f"is {tracking.PRODUCTION}"
                   + (f" (was version {champion}, now {tracking.PREVIOUS})" if moves and champion else "")
                   + ("" if moves else " already"))
        tracking.describe(f"Version {number} of {name} {outcome}: it loaded and predicted on the built-in example"
                          + ("" if force or not champion or not moves else
                             f", and its {tracking.GATE_METRIC} is not below the champion's") + ".")
    print(f"promote: {name} version {number} {outcome}")
    return client.get_model_version(name, number)

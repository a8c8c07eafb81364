"""The ``promote`` stage: move the alias ``production`` to a version once the version has loaded and
predicted, and only if its estimated OOF macro-F1 on unseen rows beats the current champion's by at least
``min_gain``; the champion it replaces gets the alias ``previous``.

Concurrent promotes (on any machines sharing the tracking server) are serialised by the promotion
lease (:class:`psydef.tracking.PromotionLease`): the champion is read, gated against and replaced
while holding it, so they end as some one-after-the-other order of them would. Every check comes
before the registry is changed, so a failure leaves ``production`` where it was.
"""
from __future__ import annotations

import logging

from psydef import tracking
from psydef.stages.config import PromoteConfig

logger = logging.getLogger(__name__)


class PromotionRefused(ValueError):
    """The champion/challenger gate kept the current production version."""


def _gate_metric(version) -> float:
    """The version's gate score: its logged model's metric, else the version tag that versions registered
    before the metrics moved to the logged model carry."""
    value = tracking.version_metrics(version).get(tracking.GATE_METRIC, version.tags.get(tracking.GATE_METRIC))
    if value is None:
        raise ValueError(f"version {version.version} of {version.name!r} has no {tracking.GATE_METRIC} (neither on its "
                         "logged model nor as a tag), which the promote gate compares; register it with "
                         "`psydef register`, or pass --force")
    return float(value)


def beats(challenger: float, champion: float, min_gain: float) -> bool:
    """Whether a gate score replaces the champion's: higher, by at least ``min_gain`` (the difference
    rounded to 1e-9, so that 0.41 - 0.40 counts as 0.01)."""
    return challenger > champion and round(challenger - champion, 9) >= min_gain


def run_promote(config: PromoteConfig):
    """Point the alias ``production`` of model ``config.name`` at ``config.version`` (default: the
    newest) once it has loaded and predicted on the built-in example, and only if its gate metric
    (``tracking.GATE_METRIC``) beats the current champion's by at least ``config.min_gain``
    (:func:`beats`; ``config.force`` skips that gate). The replaced champion gets the alias
    ``previous``; ``config.legacy_stage`` also moves the version to the deprecated stage
    ``Production``. Returns the promoted ``ModelVersion``."""
    import mlflow

    from psydef.core.data import InputLimits

    version, name, force, legacy_stage = config.version, config.name, config.force, config.legacy_stage
    min_gain = config.min_gain
    InputLimits.from_env()  # the limits the smoke test's model loads with: a bad one is the setting's fault
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
                if not beats(new, old, min_gain):
                    needed = f"at least {min_gain:g}" if min_gain > 0 else "more than 0"
                    refused = PromotionRefused(
                        f"version {number} has {tracking.GATE_METRIC} {new:.6g} against {old:.6g} of production version "
                        f"{champion}: a gain of {new - old:+.6g}, where {needed} (min_gain) is needed: not promoted "
                        "(pass --force to promote it anyway, or a smaller --min-gain)")
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
                             f", and its {tracking.GATE_METRIC} beats the champion's by at least {min_gain:g}")
                          + ".")
    logger.info(f"promote: {name} version {number} {outcome}")
    return client.get_model_version(name, number)

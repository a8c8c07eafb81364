"""Promotion lease: one promote at a time per registered model, across machines

MLflow has no compare-and-set for aliases, but creating a registered model is atomic: the store's
unique key on the name lets exactly one of several concurrent creates succeed (the others get
RESOURCE_ALREADY_EXISTS), on SQLite, PostgreSQL and through a tracking server alike. The lease on
model NAME is the registered model ``NAME.promote-lease``, tagged with its owner, the owner's process
identity and the expiry; it is deleted when the promote ends. Others wait with jittered exponential
backoff, saying once who holds it; a lease past its expiry, or whose owner's process is gone from
this machine (process_gone), is deleted and contested again. The owner re-reads the lease before
and after it moves the aliases, so a promote that lost its lease never reports success."""
from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid
from contextlib import contextmanager

from psydef.tracking.liveness import process_gone, process_identity
from psydef.tracking.names import LEASE_EXPIRES, LEASE_OWNER, LEASE_PROCESS, LEASE_SUFFIX
from psydef.tracking.store import client

logger = logging.getLogger(__name__)


LEASE_TTL_S = 120.0  # far above the seconds a promote holds it (a few registry calls)
LEASE_WAIT_S = 600.0


class LeaseLost(ValueError):
    """Another process holds the promotion lease this process thought it held."""


def lease_name(name: str) -> str:
    return f"{name}{LEASE_SUFFIX}"


def _lease_ended(tags: dict) -> str | None:
    """Why a lease (its tags) no longer holds: expired, or its owner's process is gone; None while it holds."""
    if float(tags.get(LEASE_EXPIRES, "0")) < time.time():
        return "expired"
    if process_gone(tags.get(LEASE_PROCESS, "")):
        return "was left by a process that is gone"
    return None


class PromotionLease:
    def __init__(self, name: str, ttl: float = LEASE_TTL_S):
        self.name, self.ttl = lease_name(name), ttl
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    def _read(self):
        """The lease's registered model, or None when nobody holds it."""
        from mlflow.exceptions import MlflowException

        try:
            return client().get_registered_model(self.name)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def acquire(self, wait: float = LEASE_WAIT_S) -> "PromotionLease":
        from mlflow.exceptions import MlflowException

        deadline, delay, announced = time.monotonic() + wait, 0.05, None
        while True:
            try:
                client().create_registered_model(
                    self.name, tags={LEASE_OWNER: self.owner, LEASE_EXPIRES: repr(time.time() + self.ttl),
                                     LEASE_PROCESS: process_identity()},
                    description="Held while `psydef promote` moves the aliases; deleted when it ends.")
                if self.held():
                    return self
            except MlflowException as err:
                # taken; or taken and released already: the store reads the holder back for its message
                if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                    raise
            current = self._read()
            ended = None if current is None else _lease_ended(current.tags)
            if ended:
                again = self._read()  # delete only the lease seen ended, not one taken since
                if again is not None and again.tags.get(LEASE_OWNER) == current.tags.get(LEASE_OWNER):
                    logger.info(f"promote: the lease {self.name} of {current.tags.get(LEASE_OWNER)} {ended}; "
                                "taking it over")
                    self._delete()
                continue
            holder = None if current is None else current.tags.get(LEASE_OWNER)
            if holder is not None and holder != announced:
                until = time.strftime("%H:%M:%S", time.localtime(float(current.tags.get(LEASE_EXPIRES, "0"))))
                logger.info(f"promote: waiting for the promotion lease {self.name}, held by {holder} until {until} "
                            "at the latest")
                announced = holder
            if time.monotonic() > deadline:
                holder = current.tags.get(LEASE_OWNER) if current is not None else "?"
                raise ValueError(f"promote: registered model {self.name} (the promotion lease) is held by {holder} "
                                 f"for more than {wait:.0f} s; if that process is gone it expires by itself")
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(2 * delay, 2.0)

    def held(self) -> bool:
        current = self._read()
        return (current is not None and current.tags.get(LEASE_OWNER) == self.owner
                and float(current.tags.get(LEASE_EXPIRES, "0")) > time.time())

    def check(self, what: str) -> None:
        if not self.held():
            raise LeaseLost(f"promote: lost the promotion lease {self.name} {what}; another promote took over. "
                            "Check the aliases of the model and promote again")

    def _delete(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            client().delete_registered_model(self.name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise

    def release(self) -> None:
        if self.held():
            self._delete()


@contextmanager
def promotion_lease(name: str, *, ttl: float = LEASE_TTL_S, wait: float = LEASE_WAIT_S):
    """Hold the promotion lease of registered model ``name`` inside the block."""
    lease = PromotionLease(name, ttl).acquire(wait)
    try:
        yield lease
    finally:
        lease.release()

"""Global concurrency limits: created or resized from settings at the start of a run, and held
through leases that come back when their holder dies.

Prefect's own slot leases do not survive what kills runs in practice: the temporary server a
run starts never revokes expired leases (its lease repossessor runs only in ``prefect server``),
and any server keeps leases in memory, so a restarted server forgets them while the limit's
``active_slots`` stay taken. So a run takes its slots with a plain increment and keeps a holder
record beside them, a Prefect Variable (in the server's database, seen by every run, host and
temporary server) that it renews every few seconds. A waiting run clears records nobody renewed
for a lease (their owner was killed) and gives back slots that no live record accounts for.

Every user of a limit held here must go through :func:`hold_slots`: slots taken any other way
look like a dead holder's.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    VariableCreate,
    VariableUpdate,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound, PrefectHTTPStatusError

from pacsflow.tasks.core.errors import TransientError

log = logging.getLogger(__name__)
Logger = logging.Logger | logging.LoggerAdapter

LEASE_S = 30.0  # a holder silent this long is dead; renewed every third of it
WAIT_LOG_S = 15.0  # a waiting run says what it waits for this often
POLL_S = 1.0
HOLDING = ("acquiring", "held")  # states whose slots may be counted by the limit


class SlotWaitTimeout(TransientError):
    """A run waited longer than its ``slot_wait_s`` for the PACS slots; the next run tries again."""

    reason = "slot-wait-timeout"


def ensure_concurrency_limit(name: str, limit: int) -> None:
    """Every run shares one limit on PACS associations, across flows and workers."""
    with get_client(sync_client=True) as client:
        try:
            current = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            return
        if current.limit != limit or not current.active:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit, active=True))


# -- holder records (plain data; the decisions are unit-tested) ---------------------------------
@dataclass(frozen=True)
class Holder:
    """One run's claim on a limit: who (run id, host, pid), how many slots, in what state
    (waiting | acquiring | held), and when the server last saw it renewed."""

    run_id: str
    host: str
    pid: int
    slots: int
    state: str
    lease_s: float
    renewed: dt.datetime | None = None  # the server's clock: records of every host compare

    def value(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "renewed"}

    @classmethod
    def parse(cls, value: Any, renewed: dt.datetime | None) -> "Holder | None":
        try:
            data = value if isinstance(value, dict) else json.loads(str(value))
            return cls(str(data["run_id"]), str(data["host"]), int(data["pid"]), int(data["slots"]),
                       str(data["state"]), float(data["lease_s"]), renewed)
        except (KeyError, TypeError, ValueError):
            return None

    def silent_for(self, now: dt.datetime) -> float:
        return (now - self.renewed).total_seconds() if self.renewed else float("inf")

    def describe(self, now: dt.datetime) -> str:
        return (f"run {self.run_id} (pid {self.pid} on {self.host}, {self.slots} slots, {self.state}, "
                f"renewed {self.silent_for(now):.0f}s ago)")


def stale_holders(holders: dict[str, Holder], now: dt.datetime) -> dict[str, Holder]:
    """Records their owner stopped renewing for longer than their lease: the owner is gone."""
    return {name: h for name, h in holders.items() if h.silent_for(now) > h.lease_s}


def unaccounted_slots(active_slots: int, live: dict[str, Holder]) -> int:
    """Slots the limit counts that no live record may hold (waiting records hold none)."""
    return max(0, active_slots - sum(h.slots for h in live.values() if h.state in HOLDING))


def holders_text(holders: dict[str, Holder], now: dt.datetime) -> str:
    return "; ".join(h.describe(now) for h in holders.values()) or "no live holder"


# -- the registry in Prefect Variables ------------------------------------------------------------
def _prefix(limit: str) -> str:
    return f"slot-holder--{limit}--"


class HolderRegistry:
    """The holder records of one limit, and the one record of this run."""

    def __init__(self, client: SyncPrefectClient, limit: str, me: Holder) -> None:
        self.client, self.limit = client, limit
        self.name = f"{_prefix(limit)}{uuid.uuid4().hex}"
        self.me = me
        self._lock = threading.Lock()
        self._unaccounted = 0  # what the previous look found held by no live record

    def publish(self, state: str | None = None, client: SyncPrefectClient | None = None) -> None:
        """Write (or renew) this run's record; a renewal moves the server's ``updated`` stamp.
        One writer at a time: a renewal carrying an older state must not land after a newer one."""
        client = client or self.client
        with self._lock:
            if state:
                self.me = Holder(**{**self.me.value(), "state": state})
            value = json.dumps(self.me.value())
            try:
                client.update_variable(VariableUpdate(name=self.name, value=value))
            except PrefectHTTPStatusError as exc:
                if exc.response.status_code != 404:
                    raise
                client.create_variable(VariableCreate(name=self.name, value=value, tags=["pacsflow"]))

    def withdraw(self) -> None:
        try:
            self.client.delete_variable_by_name(self.name)
        except ObjectNotFound:
            pass

    def read(self) -> tuple[dict[str, Holder], dt.datetime]:
        """Every record of the limit, and the server's "now" (this run's own latest renewal)."""
        response = self.client.request("POST", "/variables/filter", json={
            "variables": {"name": {"like_": _prefix(self.limit)}}, "limit": 200})
        holders: dict[str, Holder] = {}
        now = None
        for v in response.json():
            holder = Holder.parse(v.get("value"), dt.datetime.fromisoformat(v["updated"]))
            if v["name"] == self.name:
                now = holder.renewed if holder else None
            elif holder is not None and v["name"].startswith(_prefix(self.limit)):
                holders[v["name"]] = holder
        return holders, now or dt.datetime.now(dt.timezone.utc)

    def clear_stale(self, logger: Logger) -> dict[str, Holder]:
        """Delete dead holders' records and give back the slots no live record accounts for; the
        live records of others. One clearer at a time (a lock record): two clearers would give
        the same slots back twice."""
        active = self.client.read_global_concurrency_limit_by_name(self.limit).active_slots
        holders, now = self.read()  # after the count: every slot it includes has its record here, or was given back
        stale = stale_holders(holders, now)
        live = {n: h for n, h in holders.items() if n not in stale}
        # A run that gives its slot back and withdraws its record between the count and the read
        # looks like a dead holder for that one look: give back only what two looks in a row found.
        found = unaccounted_slots(active, live)
        extra, self._unaccounted = min(found, self._unaccounted), found
        if not stale and not extra:
            return live
        with self._clearing(now, logger) as mine:
            if not mine:
                return live
            for name, holder in stale.items():
                logger.warning("concurrency limit %s: holder %s is gone (its lease is %.0fs); clearing it",
                               self.limit, holder.describe(now), holder.lease_s)
                self.client.delete_variable_by_name(name)
            if extra:
                logger.warning("concurrency limit %s: %d of %d slots held by no live run; giving them back",
                               self.limit, extra, active)
                # No occupancy: how long a dead run held them is unknown, and must not skew the limit's average.
                self.client.request("POST", "/v2/concurrency_limits/decrement",
                                    json={"names": [self.limit], "slots": extra})
        return live

    @contextmanager
    def _clearing(self, now: dt.datetime, logger: Logger) -> Iterator[bool]:
        lock = f"{_prefix(self.limit)}clearing"
        try:
            self.client.create_variable(VariableCreate(name=lock, value=self.me.run_id, tags=["pacsflow"]))
        except ObjectAlreadyExists:
            other = self.client.read_variable_by_name(lock)
            if other is not None and (now - other.updated).total_seconds() > LEASE_S:  # type: ignore[operator]
                logger.warning("concurrency limit %s: clearing lock of a dead run removed", self.limit)
                self.client.delete_variable_by_name(lock)
            yield False
            return
        try:
            yield True
        finally:
            self.client.delete_variable_by_name(lock)


class _Renewal(threading.Thread):
    """Renews this run's record while it waits and while it holds; a dead process renews nothing."""

    def __init__(self, registry: HolderRegistry, every_s: float) -> None:
        super().__init__(daemon=True, name=f"slot-lease-{registry.limit}")
        self.registry, self.every_s = registry, every_s
        self.stopped = threading.Event()
        # The caller's Prefect settings (its API URL): a new thread would start from the defaults.
        self.context = contextvars.copy_context()

    def run(self) -> None:
        self.context.run(self._renew)

    def _renew(self) -> None:
        with get_client(sync_client=True) as client:
            while not self.stopped.wait(self.every_s):
                try:
                    self.registry.publish(client=client)
                except Exception as exc:  # noqa: BLE001 - keep renewing; a lost renewal is logged, not fatal
                    log.warning("concurrency limit %s: lease renewal failed (%s)", self.registry.limit,
                                type(exc).__name__)


def _try_take(client: SyncPrefectClient, limit: str, slots: int) -> bool:
    try:
        client.increment_concurrency_slots([limit], slots, mode="concurrency")
    except PrefectHTTPStatusError as exc:
        if exc.response.status_code == 423:
            return False
        raise
    return True


def _wait_for_slots(registry: HolderRegistry, slots: int, max_wait_s: float, logger: Logger) -> None:
    client, limit = registry.client, registry.limit
    started = time.monotonic()
    next_log = started
    while True:
        live = registry.clear_stale(logger)
        registry.publish("acquiring")  # before the increment: a clearer counts it from here on
        if _try_take(client, limit, slots):
            registry.publish("held")
            logger.info("concurrency limit %s: %d slots taken after %.1fs", limit, slots, time.monotonic() - started)
            return
        registry.publish("waiting")
        waited = time.monotonic() - started
        now = dt.datetime.now(dt.timezone.utc)
        if waited >= max_wait_s:
            raise SlotWaitTimeout(f"gave up after {waited:.0f}s waiting for {slots} slots of concurrency limit "
                                  f"{limit} (held by {holders_text(live, now)}); raise slot_wait_s or stop them")
        if time.monotonic() >= next_log:
            logger.warning("waiting for %d slots of concurrency limit %s, held by %s; waited %.0fs of %.0fs",
                           slots, limit, holders_text(live, now), waited, max_wait_s)
            next_log += WAIT_LOG_S
        time.sleep(POLL_S)


@contextmanager
def hold_slots(limit: str, slots: int, *, run_id: str, max_wait_s: float, logger: Logger | None = None,
               lease_s: float = LEASE_S, size: int | None = None) -> Iterator[None]:
    """Take ``slots`` of the global limit ``limit`` (of ``size`` slots in all, default ``slots``)
    for the block, waiting at most ``max_wait_s`` (then :class:`SlotWaitTimeout`), logging who
    holds them while waiting. The slots come back when the block ends, and within about
    ``lease_s`` when the process is killed."""
    logger = logger or log
    ensure_concurrency_limit(limit, size or slots)
    me = Holder(run_id, socket.gethostname(), os.getpid(), slots, "waiting", lease_s)
    with get_client(sync_client=True) as client:
        registry = HolderRegistry(client, limit, me)
        registry.publish()
        renewal = _Renewal(registry, lease_s / 3)
        renewal.start()
        try:
            _wait_for_slots(registry, slots, max_wait_s, logger)
            taken = time.monotonic()
            try:
                yield
            finally:
                client.release_concurrency_slots([limit], slots, occupancy_seconds=time.monotonic() - taken)
        finally:
            renewal.stopped.set()
            renewal.join(timeout=10)  # a renewal landing after the withdrawal would bring the record back
            registry.withdraw()

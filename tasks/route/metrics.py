"""The listener's Prometheus metrics, read when they are scraped.

The counters live where the work happens (the listener's :class:`ListenerCounters`, the
forwarder's totals) and the queue depth in the outbox; this collector only reads them, so a
scrape never disagrees with ``pacsflow route status``. Labels are reasons, destinations and
states: nothing that identifies a patient or a study.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pacsflow.tasks.route.outbox import DeliveryState

PREFIX = "pacsflow_listener"


class ListenerMetrics(Collector):
    """``counters()`` returns the listener's counters (``received``, ``refused`` by reason,
    ``stable``, ``handed``, ``failed``, ``pending``), ``forwarded()`` the forwarder's totals by
    (destination, outcome), ``depth()`` the outbox's objects by destination and state."""

    def __init__(self, counters: Callable[[], Any], forwarded: Callable[[], Counter[tuple[str, str]]],
                 depth: Callable[[], Mapping[str, Mapping[DeliveryState, int]]]) -> None:
        self._counters, self._forwarded, self._depth = counters, forwarded, depth

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        c = self._counters()
        yield _counter("received", "objects received and kept", c.received)
        refused = CounterMetricFamily(f"{PREFIX}_refused", "objects and associations refused", labels=["reason"])
        for reason, n in sorted(c.refused.items()):
            refused.add_metric([reason], n)
        yield refused
        yield _counter("stable", "study generations that became stable", c.stable)
        yield _counter("handled", "stable study generations routed and handed on", c.handed)
        yield _counter("route_failed", "attempts to route a stable study that failed (tried again)", c.failed)
        yield GaugeMetricFamily(f"{PREFIX}_pending_objects", "objects received, not yet routed", value=c.pending)
        forwarded = CounterMetricFamily(f"{PREFIX}_forwarded", "objects sent to destinations, by outcome",
                                        labels=["destination", "outcome"])
        for (destination, outcome), n in sorted(self._forwarded().items()):
            forwarded.add_metric([destination, outcome], n)
        yield forwarded
        queue = GaugeMetricFamily(f"{PREFIX}_outbox_objects", "objects in the outbox, by destination and state",
                                  labels=["destination", "state"])
        for destination, states in sorted(self._depth().items()):
            for state in DeliveryState:
                queue.add_metric([destination, state.value], states.get(state, 0))
        yield queue


def _counter(name: str, documentation: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", documentation, value=value)

"""pacsflow.tasks.route.router: the shipped mammography rules applied to real studies, into a real outbox."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom
import pytest

from pacsflow.deployments.local import sampledata
from pacsflow.tasks.route.outbox import DeliveryState, Outbox
from pacsflow.tasks.route.router import Arrival, Router, link_for_ingest
from pacsflow.tasks.route.rules import RoutingRules

EXAMPLE = Path(__file__).resolve().parents[2] / "deployments" / "router" / "mammography.yaml"


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, list[Path]]:
    made = sampledata.generate(tmp_path_factory.mktemp("in"), studies=3, series_per_study=(1, 1),
                               instances_per_series=(3, 3), end_date=dt.date(2026, 11, 1), days=3, seed=11,
                               modalities=("MG", "CT", "US"), rows=16, cols=16)
    return {s.modality: sorted(s.path.rglob("*.dcm")) for s in made}


def arrivals(files: list[Path]) -> list[Arrival]:
    return [Arrival(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID), f, "MODALITY") for f in files]


@pytest.fixture
def router(tmp_path: Path) -> Router:
    return Router(RoutingRules.load(EXAMPLE), Outbox(tmp_path / "outbox.sqlite"), tmp_path / "copies")


def test_mammography_goes_to_both_destinations_annotated_only_for_the_ai_archive(router, studies):
    routed = router.route("2.25.1", arrivals(studies["MG"]))

    assert routed.queued == {"main-pacs": 3, "ai-archive": 3}
    assert routed.ingest and routed.modalities == {"MG"}
    rows = {(r.destination, r.sop_uid): r for r in router.outbox.rows()}
    for original in studies["MG"]:
        sop = str(pydicom.dcmread(original, stop_before_pixels=True).SOPInstanceUID)
        main, ai = rows[("main-pacs", sop)].file, rows[("ai-archive", sop)].file
        assert Path(main).samefile(original)  # sent as received: a hard link, not a copy
        tagged, plain = pydicom.dcmread(ai), pydicom.dcmread(original)
        assert tagged.private_block(0x0013, "AI_PRIORITY")[0x10].value == "HIGH"
        assert tagged.PixelData == plain.PixelData
        del tagged[0x00130010], tagged[0x00131010]
        assert tagged == plain  # nothing else changed


def test_other_modalities_reach_the_main_pacs_only_and_only_ct_is_ingested(router, studies):
    ct, us = router.route("2.25.2", arrivals(studies["CT"])), router.route("2.25.3", arrivals(studies["US"]))

    assert ct.queued == {"main-pacs": 3} and ct.ingest
    assert us.queued == {"main-pacs": 3} and not us.ingest
    assert all(r.state is DeliveryState.QUEUED for r in router.outbox.rows())


def test_routing_a_study_again_after_a_crash_queues_nothing_twice(router, studies):
    router.route("2.25.1", arrivals(studies["MG"]))
    again = router.route("2.25.1", arrivals(studies["MG"]))

    assert sum(again.queued.values()) == 0
    assert len(router.outbox.rows()) == 6


def test_an_object_deleted_before_routing_is_counted_not_routed(router, studies, tmp_path):
    gone = tmp_path / "gone.dcm"
    routed = router.route("2.25.4", [Arrival("2.25.99", gone, "MODALITY"), *arrivals(studies["US"][:1])])

    assert routed.unreadable == 1 and routed.queued == {"main-pacs": 1}


def test_ingest_links_are_idempotent(studies, tmp_path):
    folder = tmp_path / "handoff" / "2.25.1-1"
    assert link_for_ingest(studies["MG"], folder) == 3
    assert link_for_ingest(studies["MG"], folder) == 3
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in studies["MG"])

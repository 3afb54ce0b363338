"""Retrieving every listed object of a study (pacsflow.tasks.pacs.retrieval), against a model of a
PACS that, like Orthanc, sends objects in its own order and stops the whole retrieve at the first
object it cannot send."""

from __future__ import annotations

import pytest

from pacsflow.tasks.core.errors import IncompleteRetrieve, PacsConfigurationError, PacsStatusError
from pacsflow.tasks.pacs.models import Objects
from pacsflow.tasks.pacs.retrieval import PROBES_BEFORE_GIVING_UP, describe_refusal, retrieve_listed
from pacsflow.tasks.pacs.status import PERMANENT_FAILURES, MoveDestinationUnknown, raise_for_status

FAILURE = 0xC000
SUCCESS = 0x0000


class AbortingPacs:
    """Holds ``listed`` (SOP UID -> series); ``unsendable`` objects end a retrieve with 0xC000
    and nothing after them in the PACS's order (reverse UID order here) is sent."""

    def __init__(self, listed: dict[str, str], unsendable: set[str] = frozenset(), status: int = FAILURE) -> None:
        self.listed, self.unsendable, self.status = listed, set(unsendable), status
        self.disk: set[str] = set()
        self.requests: list[Objects | None] = []

    def send(self, objects: Objects | None) -> int:
        self.requests.append(objects)
        wanted = list(self.listed) if objects is None else list(objects[1])
        for uid in sorted(wanted, reverse=True):
            if uid in self.unsendable:
                return self.status
            self.disk.add(uid)
        return SUCCESS

    def staged(self, uids) -> set[str]:
        return set(uids) & self.disk

    def retrieve(self) -> dict[str, int]:
        return retrieve_listed(self.send, self.listed, self.staged, "C-MOVE", "2.25.1")


def _study(n: int, series: int = 2) -> dict[str, str]:
    return {f"1.2.{i:03d}": f"1.3.{i % series}" for i in range(n)}


def test_a_study_that_arrives_at_once_costs_one_retrieve():
    pacs = AbortingPacs(_study(40))
    assert pacs.retrieve() == {}
    assert pacs.requests == [None] and len(pacs.disk) == 40


@pytest.mark.parametrize("bad", [{"1.2.000"}, {"1.2.039"}, {"1.2.007", "1.2.020", "1.2.021"}])
def test_every_sendable_object_arrives_and_each_unsendable_one_is_named(bad):
    pacs = AbortingPacs(_study(40), unsendable=bad)
    refused = pacs.retrieve()
    assert refused == {uid: FAILURE for uid in bad}
    assert pacs.disk == set(pacs.listed) - bad
    # Bisection, not one retrieve per object: a handful of retrieves per unsendable object.
    assert len(pacs.requests) <= 2 + len(bad) * 14


def test_a_failure_no_object_escapes_is_the_studys_and_costs_only_a_few_probes():
    pacs = AbortingPacs(_study(500), unsendable=set(_study(500)))  # e.g. a move destination the PACS lacks
    with pytest.raises(PacsStatusError, match=r"C-MOVE for study 2\.25\.1: failure status 0xC000"):
        pacs.retrieve()
    assert len(pacs.requests) == 1 + PROBES_BEFORE_GIVING_UP


@pytest.mark.parametrize("by_c_get", [True, False])
def test_nothing_sent_but_the_same_object_comes_by_c_get_means_an_unknown_move_destination(by_c_get):
    # Orthanc answers a move destination it does not know with 0xC000 and no sub-operation, as it
    # answers a study it cannot read: only asking the other way (C-GET) tells the two apart.
    pacs = AbortingPacs(_study(50), unsendable=set(_study(50)))
    probes: list[Objects] = []

    def other_way(objects: Objects) -> bool:
        probes.append(objects)
        return by_c_get

    with pytest.raises(PacsConfigurationError if by_c_get else PacsStatusError) as raised:
        retrieve_listed(pacs.send, pacs.listed, pacs.staged, "C-MOVE", "2.25.1", other_way=other_way,
                        destination="PACSFLOW at 10.0.0.5:11113")
    assert len(probes) == 1 and len(probes[0][1]) == 1  # one object, once
    assert len(pacs.requests) == 1 + PROBES_BEFORE_GIVING_UP
    if by_c_get:
        assert isinstance(raised.value, MoveDestinationUnknown)
        assert str(raised.value) == (
            "C-MOVE for study 2.25.1: status 0xC000 (unable to process) and nothing sent, but the PACS sends the study by C-GET; "
            "the PACS may not know our move destination PACSFLOW at 10.0.0.5:11113; check receiver.ae_title and "
            "the PACS's modality list")
    else:
        assert "failure status 0xC000" in str(raised.value)


def test_a_permanent_status_is_raised_at_once_with_what_to_check():
    pacs = AbortingPacs(_study(5), unsendable={"1.2.004"}, status=0xA801)
    with pytest.raises(MoveDestinationUnknown, match="0xA801.*move destination PACSFLOW at h:1; check receiver.ae_title"):
        retrieve_listed(pacs.send, pacs.listed, pacs.staged, "C-MOVE", "2.25.1", destination="PACSFLOW at h:1")
    assert pacs.requests == [None]
    for code in PERMANENT_FAILURES:
        with pytest.raises(PacsConfigurationError, match="; (check|the PACS)") as raised:
            raise_for_status(code, "C-GET", "2.25.1")
        assert "check " in str(raised.value)


def test_success_with_objects_missing_is_an_incomplete_retrieve():
    pacs = AbortingPacs(_study(5))
    pacs.listed["1.2.999"] = "1.3.0"  # listed, but the PACS's retrieve does not find it
    pacs.send = lambda objects: (pacs.requests.append(objects), pacs.disk.update(_study(5)), SUCCESS)[-1]
    with pytest.raises(IncompleteRetrieve, match="1 of 6 listed objects did not arrive"):
        pacs.retrieve()


def test_the_reason_quotes_the_pacs_status():
    assert describe_refusal(FAILURE) == "the PACS did not send it (status 0xC000 (unable to process))"

import csv
import io

import pytest

from pacsflow.tasks.migrate.reconcile import (
    EXTRA, NOT_CATALOGED, NOT_ON_PACS, OK, SHORT, as_csv, differences, reconcile, sample)


def pseudo(uid: str) -> str:
    return "2.25." + uid.replace(".", "")


PACS = {"1.1": {"1.1.1": 10, "1.1.2": 5}, "1.2": {"1.2.1": 3}, "1.3": {"1.3.1": 4}, "1.4": {"1.4.1": 2}}
CATALOG = {pseudo("1.1"): {pseudo("1.1.1"): 10, pseudo("1.1.2"): 4},
           pseudo("1.2"): {pseudo("1.2.1"): 1},   # two ultrasound frames quarantined on purpose
           pseudo("1.4"): {pseudo("1.4.1"): 3},
           pseudo("1.5"): {pseudo("1.5.1"): 1}}   # gone from the PACS since


def test_each_study_and_series_is_compared_with_what_was_held_back():
    rows = reconcile(PACS, CATALOG, retrieved={pseudo("1.1"): 15}, quarantined={pseudo("1.2"): 2}, pseudonym=pseudo)
    by_key = {(r.study, r.series): r for r in rows}
    assert by_key[(pseudo("1.1"), "")].status == SHORT and by_key[(pseudo("1.1"), "")].retrieved == 15
    assert by_key[(pseudo("1.1"), pseudo("1.1.1"))].status == OK
    assert by_key[(pseudo("1.1"), pseudo("1.1.2"))].status == SHORT
    assert by_key[(pseudo("1.2"), "")].status == OK  # 1 cataloged + 2 quarantined = 3
    assert by_key[(pseudo("1.2"), pseudo("1.2.1"))].status == OK  # short by what the study held back
    assert by_key[(pseudo("1.3"), "")].status == NOT_CATALOGED
    assert by_key[(pseudo("1.4"), "")].status == EXTRA
    assert by_key[(pseudo("1.5"), "")].status == NOT_ON_PACS
    assert {r.study for r in differences(rows)} == {pseudo(u) for u in ("1.1", "1.3", "1.4", "1.5")}


def test_the_report_names_pseudonyms_only():
    text = as_csv(reconcile(PACS, CATALOG, {}, {}, pseudo))
    assert not any(original in text for original in ("1.1.1", "1.2.1,", ",1.3,"))
    header, *body = list(csv.reader(io.StringIO(text)))
    assert header[:3] == ["study", "series", "pacs"] and len(body) == 5 + 6


def test_checksum_sample_is_reproducible():
    items = list(range(100))
    assert sample(items, 1.0, "x") == items
    assert sample(items, 0.1, "night-1") == sample(items, 0.1, "night-1")
    assert len(sample(items, 0.1, "night-1")) == 10
    with pytest.raises(ValueError, match="fraction"):
        sample(items, 0, "x")

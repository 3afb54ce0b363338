"""``pacsflow route test`` and ``route dry-run``, called as a user would, on generated studies and a
real catalog built from them."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path

import pydicom
import pytest
import typer
from typer.testing import CliRunner

from pacsflow.catalog.backends import open_store
from pacsflow.tasks.lake.rows import StudyExtractor
from pacsflow.tasks.route import cli as route_cli
from tests.unit.test_route_rules import DESTINATIONS, EXAMPLE, MODALITIES, files_of, make_samples

runner = CliRunner()
INGESTED = dt.datetime(2026, 11, 2, 8, 0, tzinfo=dt.timezone.utc)

# Mounted the way the root command line mounts it: `pacsflow route ...`.
root = typer.Typer()
root.add_typer(route_cli.app)


@root.command("other")
def _other() -> None:
    """A second command, so that `route` is a subcommand as it is under `pacsflow`."""


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    return {s.modality: s for s in make_samples(tmp_path_factory.mktemp("samples"))}


@pytest.fixture(scope="module", params=["snapshot", "delta"])
def catalog(request, studies, tmp_path_factory) -> Path:
    """The four studies in a real catalog of each backend (headers as written; de-identification is
    not the point here). The backend goes to the command through PACSFLOW_CATALOG__BACKEND."""
    path = tmp_path_factory.mktemp("lake") / "catalog"
    store = open_store(path, request.param)
    for study in studies.values():
        ex = StudyExtractor()
        for f in files_of(study):
            ex.add(pydicom.dcmread(f, stop_before_pixels=True), file_path=str(f), file_size=f.stat().st_size,
                   sha256=hashlib.sha256(f.read_bytes()).hexdigest())
        store.commit(ex.tables(INGESTED))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PACSFLOW_CATALOG__BACKEND", request.param)
        yield path


@pytest.fixture(autouse=True)
def settings_env(monkeypatch):
    monkeypatch.delenv("PACSFLOW_CONFIG", raising=False)
    monkeypatch.delenv("PACSFLOW_LISTENER__RULES_FILE", raising=False)
    monkeypatch.setenv("COLUMNS", "200")


def route(*args: str, code: int = 0):
    result = runner.invoke(root, ["route", *args])
    assert result.exit_code == code, result.output
    return result


def rows(text: str) -> dict[str, list[str]]:
    """The body rows of rich tables, by first cell."""
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]
    return {row[0]: row[1:] for row in cells}


# -- route test ------------------------------------------------------------------------------------


def test_route_test_shows_rules_destinations_blocks_and_ingest_per_file(studies):
    files = {m: files_of(studies[m])[0] for m in MODALITIES}
    text = route("test", "--rules", str(EXAMPLE), *map(str, files.values())).stdout
    order = sorted(MODALITIES, key=lambda m: text.index(f"{files[m]}: "))
    assert order == list(MODALITIES)  # in the order given, each part starting with its file's path
    parts = {m: text.split(f"{files[m]}: ")[1] for m in MODALITIES}
    assert "Digital Mammography X-Ray Image Storage - For Presentation, Modality MG" in parts["MG"]
    assert "CT Image Storage, Modality CT" in parts["CT"]
    for m in MODALITIES:
        assert "rules: all-to-main-pacs" in parts[m]
    mg = parts["MG"].split(f"{files['US']}: ")[0]
    assert "rules: all-to-main-pacs, mammography-to-ai, ingest-mg-ct" in mg and "ingest: yes" in mg
    assert rows(mg)["ai-archive"] == ["AIARCHIVE", "original", "(0013,AI_PRIORITY) 10 LO HIGH"]
    assert rows(mg)["main-pacs"] == ["MAINPACS", "original", "none"]
    assert text.count("AI_PRIORITY") == 1 and text.count("ai-archive") == 1
    assert text.count("ingest: yes") == 2 and text.count("ingest: no") == 2
    for f in files.values():  # nothing of the patient reaches the output
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for value in (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber):
            assert value not in text


def test_route_test_de_identified_copies_and_calling_ae(tmp_path, studies):
    rules = tmp_path / "rules.yaml"
    rules.write_text(DESTINATIONS + "rules:\n  - {name: from-mammo, match: {calling_ae: MAMMO1}, forward: [ai-archive]}\n")
    mg = str(files_of(studies["MG"])[0])
    text = route("test", "--rules", str(rules), "--calling-ae", "MAMMO1", mg).stdout
    assert rows(text)["ai-archive"] == ["AIARCHIVE", "de-identified", "none"] and "ingest: no" in text
    text = route("test", "--rules", str(rules), mg).stdout
    assert "no rule matches: forwarded nowhere, not ingested" in text


def test_route_test_reads_the_rules_file_setting(monkeypatch, studies):
    monkeypatch.setenv("PACSFLOW_LISTENER__RULES_FILE", str(EXAMPLE))
    assert "mammography-to-ai" in route("test", str(files_of(studies["MG"])[0])).stdout
    monkeypatch.delenv("PACSFLOW_LISTENER__RULES_FILE")
    failed = route("test", str(files_of(studies["MG"])[0]), code=2)
    assert failed.stderr == "pacsflow: error: RulesError: listener.rules_file is not set: pass --rules FILE\n"


def test_route_test_bad_rules_end_with_one_line_and_status_2(tmp_path, studies):
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: [{name: r, match: {Modalty: MG}}]\n")
    failed = route("test", "--rules", str(rules), str(files_of(studies["CT"])[0]), code=2)
    assert failed.stderr == f"pacsflow: error: RulesError: {rules}: rules[0].match.Modalty: not a DICOM keyword " \
                            "(nor calling_ae)\n"
    assert failed.stdout == ""


def test_route_test_unreadable_files_are_named_and_the_rest_printed(tmp_path, studies):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 20)
    result = route("test", "--rules", str(EXAMPLE), str(junk), str(files_of(studies["US"])[0]), code=1)
    assert f"{junk}: cannot read it as DICOM (InvalidDicomError)" in result.stderr
    assert "Ultrasound Image Storage, Modality US" in result.stdout


# -- route dry-run ---------------------------------------------------------------------------------


def totals(text: str) -> dict[str, tuple[int, int]]:
    return {name: (int(cells[-2]), int(cells[-1])) for name, cells in rows(text).items()}


def test_dry_run_counts_studies_and_instances_per_destination(monkeypatch, catalog, studies):
    monkeypatch.setenv("PACSFLOW_CATALOG_ROOT", str(catalog))
    text = route("dry-run", "--since", "2026-10-01", "--until", "2026-11-01", "--rules", str(EXAMPLE)).stdout
    n = {m: studies[m].n_instances for m in MODALITIES}
    assert f"2026-10-01 .. 2026-11-01: 4 studies, {sum(n.values())} instances in the catalog" in text
    assert totals(text) == {
        "main-pacs": (4, sum(n.values())),
        "ai-archive": (1, n["MG"]),
        "(ingest)": (2, n["MG"] + n["CT"]),
    }
    assert rows(text)["ai-archive"][:2] == ["AIARCHIVE", "original"]
    assert "not decidable" not in text


def test_dry_run_window_and_rules_the_catalog_cannot_decide(monkeypatch, tmp_path, catalog, studies):
    monkeypatch.setenv("PACSFLOW_CATALOG_ROOT", str(catalog))
    rules = tmp_path / "rules.yaml"
    rules.write_text(DESTINATIONS + """
rules:
  - {name: by-sop-class, match: {SOPClassUID: {regex: '1\\.2\\.840\\.10008\\.5\\.1\\.4\\.1\\.1\\.1\\.2'}},
     forward: [ai-archive], ingest: true}
  - {name: by-station, match: {StationName: {regex: 'MG.*'}}, forward: [main-pacs]}
  - {name: by-sender, match: {any: [{calling_ae: MAMMO1}, {Modality: MG}]}, forward: [main-pacs]}
""")
    day = studies["MG"].study_date.isoformat()
    text = route("dry-run", "--since", day, "--until", day, "--rules", str(rules)).stdout
    assert f"{day} .. {day}: 1 studies, {studies['MG'].n_instances} instances" in text
    mg = studies["MG"].n_instances
    assert totals(text) == {"main-pacs": (0, 0), "ai-archive": (1, mg), "(ingest)": (1, mg)}
    assert "rule by-station: not decidable from the catalog (reads StationName); left out" in text
    assert "rule by-sender: not decidable from the catalog (reads calling_ae); left out" in text
    other = studies["CT"].study_date.isoformat()
    assert totals(route("dry-run", "--since", other, "--until", other, "--rules", str(rules)).stdout)[
        "ai-archive"] == (0, 0)


def test_dry_run_bad_input_ends_with_status_2(monkeypatch, tmp_path, catalog):
    backend = os.environ["PACSFLOW_CATALOG__BACKEND"]
    # A missing snapshot catalog is an error; an empty Delta location reads as no rows (yet).
    monkeypatch.setenv("PACSFLOW_CATALOG__BACKEND", "snapshot")
    monkeypatch.setenv("PACSFLOW_CATALOG_ROOT", str(tmp_path / "no-catalog"))
    failed = route("dry-run", "--since", "2026-10-01", "--rules", str(EXAMPLE), code=2)
    assert failed.stderr.startswith("pacsflow: error: CatalogNotFound: catalog_root: no catalog folder at ")
    assert "expected YYYY-MM-DD" in route("dry-run", "--since", "1.10.2026", "--rules", str(EXAMPLE), code=2).output
    monkeypatch.setenv("PACSFLOW_CATALOG__BACKEND", backend)
    monkeypatch.setenv("PACSFLOW_CATALOG_ROOT", str(catalog))
    assert "0 studies, 0 instances in the catalog" in route("dry-run", "--since", "2030-01-01",
                                                            "--rules", str(EXAMPLE)).stdout


def test_help_names_both_commands():
    text = route("--help").stdout
    assert "test" in text and "dry-run" in text
    assert "--calling-ae" in route("test", "--help").stdout


# -- route status | retry | drop -------------------------------------------------------------------


@pytest.fixture
def outbox(monkeypatch, tmp_path):
    """A real outbox in the listener's PHI zone: two dead rows for ai-archive, one delivered row."""
    from pacsflow.tasks.route.outbox import Backoff, Outbox

    monkeypatch.setenv("PACSFLOW_STATE_ROOT", str(tmp_path / "state"))
    box = Outbox(tmp_path / "state" / "listener" / "outbox.sqlite")
    copies = []
    for i in range(3):
        copy = tmp_path / f"copy{i}.dcm"
        copy.write_bytes(b"x")
        copies.append(copy)
        box.enqueue("ai-archive" if i else "main-pacs", f"1.2.3.{i}", "2.25.7", copy)
    [delivered] = box.claim("main-pacs", 10)
    box.delivered([delivered.id])
    dead = box.claim("ai-archive", 10)
    box.failed([r.id for r in dead], "DestinationRefused: AIARCHIVE@127.0.0.1:4243 refused (0xA900)",
               permanent=True, backoff=Backoff(1, 10, 3))
    return box, dead, copies


def test_status_retry_and_drop_act_on_the_dead_letters_only(outbox):
    from pacsflow.tasks.route.outbox import DeliveryState

    box, dead, copies = outbox
    status = route("status").stdout
    assert "ai-archive" in status and "0xA900" in status and "1.2.3." not in status  # no original UID shown

    route("drop", code=2)  # nothing is dropped without a destination or a row
    assert "1 dead-lettered objects queued again" in route("retry", "--id", str(dead[0].id)).stdout
    assert "1 dead-lettered objects dropped" in route("drop", "--destination", "ai-archive").stdout
    states = {r.id: r.state for r in box.rows()}
    assert states[dead[0].id] is DeliveryState.QUEUED and states[dead[1].id] is DeliveryState.DROPPED
    assert not copies[2].exists() and copies[1].exists()  # a dropped row's prepared copy goes


def test_status_without_an_outbox_ends_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PACSFLOW_STATE_ROOT", str(tmp_path / "nowhere"))
    assert "has the listener run here?" in route("status", code=2).output

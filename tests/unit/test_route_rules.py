"""pacsflow.tasks.route.rules: rules files as operators write them, decided on real DICOM headers."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom
import pytest

from pacsflow.deployments.local import sampledata
from pacsflow.tasks.route.annotate import PrivateBlock
from pacsflow.tasks.route.rules import Decision, Forward, RoutingRules, RulesError, Subject

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deployments" / "router" / "mammography.yaml"
MODALITIES = ("CT", "MR", "MG", "US")
DESTINATIONS = """
destinations:
  main-pacs: {ae_title: MAINPACS, host: 127.0.0.1, port: 4242}
  ai-archive: {ae_title: AIARCHIVE, host: 127.0.0.1, port: 4243, deidentify: true}
"""


def make_samples(out: Path) -> list[sampledata.StudySummary]:
    """Four studies, one per modality, two series each, written by the local stack's generator."""
    return sampledata.generate(out, studies=4, series_per_study=(2, 2), instances_per_series=(2, 3),
                               end_date=dt.date(2026, 11, 1), days=4, seed=7, modalities=MODALITIES,
                               rows=32, cols=32)


def files_of(study: sampledata.StudySummary) -> list[Path]:
    return sorted(study.path.rglob("*.dcm"))


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, sampledata.StudySummary]:
    studies = make_samples(tmp_path_factory.mktemp("samples"))
    return {s.modality: s for s in studies}


def header(study: sampledata.StudySummary) -> pydicom.Dataset:
    return pydicom.dcmread(files_of(study)[0], stop_before_pixels=True)


def rules_from(tmp_path: Path, text: str) -> RoutingRules:
    path = tmp_path / "rules.yaml"
    path.write_text(text, encoding="utf-8")
    return RoutingRules.load(path)


def one_rule(tmp_path: Path, match: str) -> RoutingRules:
    return rules_from(tmp_path, DESTINATIONS + f"rules:\n  - name: r\n    match: {match}\n    forward: [main-pacs]\n")


# -- the shipped example ---------------------------------------------------------------------------


def test_the_shipped_example_routes_real_headers_as_the_readme_says(samples):
    rules = RoutingRules.load(EXAMPLE)
    assert set(rules.destinations) == {"main-pacs", "ai-archive"}
    decisions = {m: rules.decide(Subject.of_dataset(header(samples[m]), "MODALITY1")) for m in MODALITIES}
    for modality, decision in decisions.items():
        assert decision.forwards[0] == Forward("main-pacs", ())
        assert decision.ingest is (modality in ("MG", "CT"))
    assert [f.destination for f in decisions["CT"].forwards] == ["main-pacs"]
    assert [f.destination for f in decisions["MR"].forwards] == ["main-pacs"]
    assert decisions["MR"].matched == ("all-to-main-pacs",) and decisions["US"].matched == ("all-to-main-pacs",)
    mg = decisions["MG"]
    assert mg.matched == ("all-to-main-pacs", "mammography-to-ai", "ingest-mg-ct")
    (block,) = mg.forwards[1].annotations
    assert mg.forwards[1].destination == "ai-archive"
    assert (block.group, block.creator) == (0x0013, "AI_PRIORITY")
    assert [(e.element, e.vr, e.value) for e in block.elements] == [(0x10, "LO", "HIGH")]


def test_destinations_are_named_by_their_keys_with_defaults():
    rules = RoutingRules.load(EXAMPLE)
    main = rules.destinations["main-pacs"]
    assert (main.name, main.ae_title, main.port, main.deidentify, main.max_associations) == (
        "main-pacs", "MAINPACS", 4242, False, 2)
    assert rules.destinations["ai-archive"].max_associations == 1
    assert not rules.destinations["ai-archive"].storage_commitment


# -- every form of condition -----------------------------------------------------------------------


@pytest.mark.parametrize(("match", "hits"), [
    ("{Modality: MG}", {"MG"}),
    ("{Modality: [CT, MR]}", {"CT", "MR"}),
    ("{SOPClassUID: {regex: '1\\.2\\.840\\.10008\\.5\\.1\\.4\\.1\\.1\\.(2|4)'}}", {"CT", "MR"}),
    ("{SOPClassUID: {regex: '1\\.2\\.840'}}", set()),  # the whole value must match, not a prefix
    ("{Modality: {not: [CT, MR]}}", {"MG", "US"}),
    ("{Modality: {not: {regex: 'M.'}}}", {"CT", "US"}),
    ("{any: [{Modality: US}, {BodyPartExamined: BREAST}]}", {"US", "MG"}),
    ("{all: [{Modality: MG}, {BodyPartExamined: BREAST}]}", {"MG"}),
    ("{Modality: MG, BodyPartExamined: HEAD}", set()),  # a bare mapping: all of it
    ("{any: [{all: [{Modality: CT}, {SOPClassUID: '1.2.840.10008.5.1.4.1.1.2'}]}, {Modality: US}]}", {"CT", "US"}),
    ("{ImageType: ORIGINAL}", set(MODALITIES)),  # multi-valued: one of the values is enough
    ("{ImageType: [AXIAL, ABDOMINAL]}", {"CT", "MR", "US"}),
    ("{ImageType: {not: SECONDARY}}", set(MODALITIES)),
    ("{MagneticFieldStrength: {regex: '.*'}}", {"MR"}),  # absent elsewhere: only `not` matches absent values
    ("{MagneticFieldStrength: {not: {regex: '.*'}}}", {"CT", "MG", "US"}),
])
def test_conditions_on_real_headers(tmp_path, samples, match, hits):
    rules = one_rule(tmp_path, match)
    got = {m for m in MODALITIES if rules.decide(Subject.of_dataset(header(samples[m]))).matched}
    assert got == hits


def test_the_sample_headers_hold_what_the_conditions_test(samples):
    ct, mr = header(samples["CT"]), header(samples["MR"])
    assert list(ct.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"] and "ABDOMINAL" in header(samples["US"]).ImageType
    assert list(header(samples["MG"]).ImageType) == ["ORIGINAL", "PRIMARY"]
    assert "MagneticFieldStrength" in mr and "MagneticFieldStrength" not in ct
    assert header(samples["MG"]).BodyPartExamined == "BREAST"


def test_calling_ae_is_the_senders_title(tmp_path, samples):
    rules = one_rule(tmp_path, "{calling_ae: [MAMMO1, MAMMO2], Modality: MG}")
    mg = header(samples["MG"])
    assert rules.decide(Subject.of_dataset(mg, "MAMMO2")).matched == ("r",)
    assert rules.decide(Subject.of_dataset(mg, "CTSCANNER")) == Decision()
    assert rules.decide(Subject.of_dataset(mg)) == Decision()
    negated = one_rule(tmp_path, "{calling_ae: {not: MAMMO1}}")
    assert negated.decide(Subject.of_dataset(mg, "")).matched == ("r",)
    assert negated.decide(Subject.of_dataset(mg, "MAMMO1")).matched == ()


def test_subject_of_mapping_takes_catalog_values():
    subject = Subject.of_mapping({"Modality": "MG", "ImageType": ["ORIGINAL", "PRIMARY"], "StationName": None,
                                  "SeriesNumber": 3}, calling_ae="X")
    assert subject.value("Modality") == ["MG"] and subject.value("ImageType") == ["ORIGINAL", "PRIMARY"]
    assert subject.value("StationName") == [] and subject.value("BodyPartExamined") == []
    assert subject.value("SeriesNumber") == ["3"] and subject.value("calling_ae") == ["X"]


def test_one_forward_per_destination_with_the_blocks_of_every_rule(tmp_path):
    rules = rules_from(tmp_path, DESTINATIONS + """
rules:
  - name: a
    forward:
      - to: ai-archive
        annotate: [{group: 0x0013, creator: AI_PRIORITY, elements: [{element: 0x10, vr: LO, value: HIGH}]}]
  - name: b
    match: {Modality: MG}
    forward:
      - main-pacs
      - to: ai-archive
        annotate:
          - {group: "0x0013", creator: AI_PRIORITY, elements: [{element: "0x10", vr: LO, value: HIGH}]}
          - {group: 0x0015, creator: SITE, elements: [{element: 0x20, vr: US, value: 7}]}
    ingest: true
  - name: c
    match: {Modality: CT}
    forward: main-pacs
""")
    decision = rules.decide(Subject.of_mapping({"Modality": "MG"}))
    assert decision.matched == ("a", "b") and decision.ingest
    assert [f.destination for f in decision.forwards] == ["ai-archive", "main-pacs"]
    blocks = decision.forwards[0].annotations
    assert [(b.group, b.creator) for b in blocks] == [(0x13, "AI_PRIORITY"), (0x15, "SITE")]  # the same block once
    assert decision.forwards[1] == Forward("main-pacs", ())
    assert rules.decide(Subject.of_mapping({"Modality": "CT"})).forwards[1] == Forward("main-pacs", ())


def test_nothing_matches_gives_the_empty_decision(tmp_path):
    rules = one_rule(tmp_path, "{Modality: MG}")
    assert rules.decide(Subject.of_mapping({"Modality": "CT"})) == Decision((), (), False)


def test_restricted_to_splits_rules_by_the_keys_they_read(tmp_path):
    rules = rules_from(tmp_path, DESTINATIONS + """
rules:
  - {name: all, forward: [main-pacs]}
  - {name: mg, match: {Modality: MG}, forward: [ai-archive]}
  - {name: station, match: {any: [{StationName: MAMMO}, {Modality: MG}]}, forward: [ai-archive]}
  - {name: sender, match: {calling_ae: X}, ingest: true}
""")
    assert rules.keys() == {"Modality", "StationName", "calling_ae"}
    kept, left = rules.restricted_to({"Modality", "SOPClassUID"})
    assert [r.name for r in kept.rules] == ["all", "mg"] and left == ("station", "sender")
    assert kept.destinations == rules.destinations


# -- files that are refused -----------------------------------------------------------------------


SECRET = "DOE^JANE"  # a value that must never reach an error message


@pytest.mark.parametrize(("text", "message"), [
    ("destinations: [\n", "not valid YAML (line 2, column 1)"),
    ("- just a list\n", "must be a mapping with destinations and rules"),
    (DESTINATIONS + f"rules: [{{name: r, match: {{PatientNam: '{SECRET}'}}}}]",
     "rules[0].match.PatientNam: not a DICOM keyword (nor calling_ae)"),
    (DESTINATIONS + f"rules: [{{name: r, match: {{any: [{{Modality: MG}}, {{PatientName: {{regex: '({SECRET}'}}}}]}}}}]",
     "rules[0].match.any[1].PatientName.regex: not a valid regular expression"),
    (DESTINATIONS + "rules: [{name: r, match: {Modality: yes}}]", "rules[0].match.Modality: must be a text"),
    (DESTINATIONS + f"rules: [{{name: r, match: {{PatientName: {{like: '{SECRET}'}}}}}}]",
     "rules[0].match.PatientName: a mapping here is {regex: TEXT} or {not: ...}"),
    (DESTINATIONS + f"rules: [{{name: r, forward: ['{SECRET}x']}}]", "rules[0].forward[0].to: no destination of that name"),
    (DESTINATIONS + "rules: [{name: r}, {name: r}]", "rules[1].name: another rule has this name"),
    (DESTINATIONS + "rules: [{name: r, ingest: maybe}]", "rules[0].ingest: Input should be a valid boolean"),
    (DESTINATIONS + "rules: [{name: r, forwrd: [main-pacs]}]", "rules[0].forwrd: Extra inputs are not permitted"),
    ("destinations: {x: {ae_title: X, host: h, port: 0}}", "destinations.x.port: Input should be greater than"),
    ("destinations: {x: {ae_title: WAY_TOO_LONG_AE_TITLE, host: h, port: 1}}",
     "destinations.x.ae_title: must be 1-16 ASCII"),
    ("destinations: {x: {ae_title: X, host: h, port: 1, max_associations: 17}}",
     "destinations.x.max_associations: Input should be less than or equal to 16"),
    (DESTINATIONS + "rules:\n - name: r\n   forward:\n    - to: main-pacs\n      annotate: [{group: 0x0012, creator: A, "
     "elements: [{element: 0x10, vr: LO, value: x}]}]",
     "rules[0].forward[0].annotate[0].group: must be an odd group from 0x0009 to 0xFFFD"),
    (DESTINATIONS + "rules:\n - name: r\n   forward:\n    - to: main-pacs\n      annotate: [{group: 0x0013, creator: A, "
     f"elements: [{{element: 0x10, vr: US, value: '{SECRET}'}}]}}]",
     "rules[0].forward[0].annotate[0].elements[0]: value: VR US holds a number, not text"),
])
def test_bad_files_give_one_line_naming_file_and_field_never_values(tmp_path, text, message):
    path = tmp_path / "site-rules.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RulesError) as caught:
        RoutingRules.load(path)
    line = str(caught.value)
    assert line.startswith(f"{path}: ") and message in line, line
    assert "\n" not in line and SECRET not in line


def test_a_missing_file_is_named_with_the_reason(tmp_path):
    with pytest.raises(RulesError, match=r"nope\.yaml: cannot read it \(FileNotFoundError\)$"):
        RoutingRules.load(tmp_path / "nope.yaml")


def test_private_blocks_load_from_hex_text_and_ints():
    a = PrivateBlock.model_validate({"group": "0x0013", "creator": "AI_PRIORITY",
                                     "elements": [{"element": "0x10", "vr": "lo", "value": "HIGH"}]})
    b = PrivateBlock.model_validate({"group": 0x13, "creator": "AI_PRIORITY",
                                     "elements": [{"element": 16, "vr": "LO", "value": "HIGH"}]})
    assert a == b and a.elements[0].vr == "LO"

"""Issue 10's acceptance: ``pacsflow deidentify`` on objects where every Table E.1-1 row is filled.

The corpus (``tests/deid_corpus.py``) plants a unique value in every attribute row of the table,
in sequence items (codes, free text, names, private blocks), SR content, a curve, an overlay and
private blocks, in a CT, an MR (ISO_IR 192), a Secondary Capture (ISO_IR 100, BurnedInAnnotation
NO), a Comprehensive SR and an ultrasound image with burned-in text. The real command line runs
with the default options; then:

- every object is written, except the one at burned-in risk (quarantined with the reason, or
  written with BurnedInAnnotation NO once its text is masked); any other quarantine is a false
  alarm of the residual-PHI audit or a leak it caught;
- no original value of an attribute whose action is D, X, Z, U or C (or that sits in a D, X or Z
  sequence, or is free text in a C sequence) is left in the encoded bytes, in ASCII, UTF-8 or
  Latin-1, in any case;
- a second run writes byte-identical files.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pacsflow.tasks.deid.deidentifier import Deidentifier
from pacsflow.tasks.deid.manifest import MANIFEST_NAME, object_id

from tests.deid_corpus import SPECS, CorpusObject, Planted, build_corpus, table_rows

KEY = "table-e11-key-0123456789abcdef"
PACSFLOW = Path(sys.executable).with_name("pacsflow")
# The corpus carries the table's command-group rows (0000,1000) and (0000,1001); pydicom warns on reading them.
pytestmark = pytest.mark.filterwarnings("ignore:Expected implicit VR:UserWarning")


def _cli(in_dir: Path, out_dir: Path, key_file: Path, quarantine: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSFLOW_")}  # the defaults, no site config
    return subprocess.run(
        [str(PACSFLOW), "deidentify", str(in_dir), str(out_dir), "--key-file", str(key_file),
         "--quarantine-dir", str(quarantine)],
        check=False, capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, list[CorpusObject], Path, Path]:
    root = tmp_path_factory.mktemp("table-e11")
    corpus = build_corpus(root / "in", Deidentifier(KEY.encode()))  # the CLI's default options
    (root / "key").write_text(KEY + "\n")
    for name in ("a", "b"):
        proc = _cli(root / "in", root / name, root / "key", root / f"q-{name}", root)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root, corpus, root / "a", root / "b"


def _output(deid: Deidentifier, out: Path, obj: CorpusObject) -> Path:
    return out / deid.uid(obj.study_uid) / deid.uid(obj.series_uid) / f"{deid.uid(obj.sop_instance_uid)}.dcm"


def _written(runs) -> list[tuple[CorpusObject, bytes]]:
    _, corpus, out, _ = runs
    deid = Deidentifier(KEY.encode())
    return [(obj, _output(deid, out, obj).read_bytes()) for obj in corpus if _output(deid, out, obj).exists()]


def test_every_object_not_at_burned_in_risk_is_written(runs):
    root, corpus, out, _ = runs
    deid = Deidentifier(KEY.encode())
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    reasons = {q["id"]: q["reason"] for q in manifest["quarantined"]}
    by_id = {object_id(KEY.encode(), obj.file): obj for obj in corpus}
    assert set(reasons) <= set(by_id)
    wrong = {by_id[i].file: r for i, r in reasons.items() if not by_id[i].burned_in}
    assert not wrong, f"quarantined without burned-in risk (audit false alarm or caught leak): {wrong}"
    for obj in corpus:
        path = _output(deid, out, obj)
        qid = object_id(KEY.encode(), obj.file)
        if obj.burned_in and qid in reasons:
            assert reasons[qid].startswith("burned-in annotation") and not path.exists()
            assert (root / "q-a" / f"{qid}.dcm").exists()
        elif obj.burned_in:
            assert pydicom.dcmread(path).BurnedInAnnotation == "NO"  # text found and masked
        else:
            assert path.exists(), f"{obj.file} not written"
    assert manifest["written"] == sum(1 for obj in corpus if _output(deid, out, obj).exists()) >= 4


def test_the_corpus_fills_every_table_row(runs):
    root, corpus, _, _ = runs
    rows = {t for t, _ in table_rows() if t >> 16 != 0x0002}
    assert len(rows) > 600
    for obj in corpus:
        ds = pydicom.dcmread(root / "in" / obj.file)
        missing = sorted(t for t in rows if t not in ds)
        assert not missing, f"{obj.file}: rows without a value {missing[:5]}"
        assert ds.file_meta.MediaStorageSOPInstanceUID == obj.sop_instance_uid  # (0002,0003)
        assert 0x50000022 in ds and 0x60003000 in ds and 0x00091001 in ds
    planted = [p for obj in corpus for p in obj.planted]
    assert len({p.value for p in planted if p.kind in ("text", "name", "uid", "bytes")}) > 5000
    assert any(p.must_go and "on (0040,A730)" in p.why for p in planted)  # SR content under D


_BOUNDED = {"date": (rb"(?<![0-9])", b""), "datetime": (rb"(?<![0-9])", rb"(?![0-9])"),
            "time": (rb"(?<![0-9])", rb"(?![0-9])"), "number": (rb"(?<![0-9.])", rb"(?![0-9])"),
            "uid": (rb"(?<![0-9.])", rb"(?![0-9])")}


def _forms(value: str | bytes) -> set[bytes]:
    """The value as it may be encoded: ASCII, UTF-8 or Latin-1, upper or lower case."""
    if isinstance(value, bytes):
        return {value.lower()}
    out = set()
    for text in (value, value.lower(), value.upper()):
        for enc in ("utf-8", "latin-1"):
            try:
                out.add(text.encode(enc).lower())
            except UnicodeEncodeError:
                pass
    return out


def survivors(data: bytes, planted: list[Planted]) -> list[Planted]:
    """The must-go values found in ``data`` (binary numbers are checked on the dataset instead)."""
    hay = data.lower()
    found = []
    for p in planted:
        if not p.must_go or p.kind == "binary":
            continue
        before, after = _BOUNDED.get(p.kind, (b"", b""))
        if any(re.search(before + re.escape(f) + after, hay) for f in _forms(p.value)):
            found.append(p)
    return found


def test_no_original_value_of_a_removed_or_cleaned_attribute_survives(runs):
    leaks = []
    for obj, data in _written(runs):
        leaks += [f"{obj.file} {p.path} [{p.why}] {p.value!r}" for p in survivors(data, obj.planted)]
        ds = pydicom.dcmread(io.BytesIO(data))
        for p in obj.planted:
            if p.must_go and p.kind == "binary" and "." not in p.path:
                tag = int(p.path[1:5] + p.path[6:10], 16)
                if tag in ds and ds[tag].value == int.from_bytes(p.value, "little"):
                    leaks.append(f"{obj.file} {p.path} [{p.why}] {ds[tag].value}")
    assert _written(runs), "nothing written"
    assert not leaks, f"{len(leaks)} original values survive:\n" + "\n".join(leaks)


def test_the_scan_finds_what_it_looks_for(runs):
    """The check itself: values the profile keeps are found in the output, in every encoding."""
    found: dict[str, int] = {}
    for obj, data in _written(runs):
        kept = [dataclasses.replace(p, must_go=True) for p in obj.planted if not p.must_go and p.kind != "binary"]
        found[obj.file] = sum(1 for p in survivors(data, kept) if isinstance(p.value, bytes) or not p.value.isascii())
        found[obj.file + " ascii"] = len(survivors(data, kept))
    assert all(found[f"{spec.file} ascii"] > 50 for spec in SPECS if spec.burned_in != "YES"), found
    assert found["02-mr-utf8.dcm"] > 0 and found["03-sc-latin1.dcm"] > 0, found  # accented, UTF-8 and Latin-1


def test_a_second_run_is_byte_identical(runs):
    _, _, a, b = runs

    def tree(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    first, second = tree(a), tree(b)
    assert len(first) >= 5 and first == second

"""Issue 15 item 3 (the receiver's part): our Storage SCP, listening for the length of a run,
trusts no stranger.

Real peers (DCMTK ``echoscu``/``storescu``) call the real receiver, set up as the nightly flow sets
it up (``StorageReceiver.for_run``), with each engine (``receiver.engine``): a calling AE that is
neither the PACS's nor an allowed one is rejected at association; the PACS's AE may only store
objects of the studies being retrieved; an object above ``receiver.max_object_mb`` is refused and
leaves nothing in staging. pynetdicom refuses those objects on the wire; DCMTK's storescp cannot,
so the native engine answers success and refuses them at the staging boundary.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from pacsflow.deployments.local import sampledata
from pacsflow.tasks.pacs.receiver import StagingWriter, StorageReceiver, count_staged
from pacsflow.tasks.settings import load_settings
from tests.helpers import dcmtk_env, free_port

PACS_AE = "ORTHANC"  # settings.pacs.called_ae: the AE the PACS sends C-MOVE objects from
ROUTER_AE = "ROUTER"  # an extra AE allowed by receiver.allowed_aes
RECEIVER_AE = "PACSFLOW"


def _require_dcmtk() -> None:
    missing = [n for n in ("echoscu", "storescu") if shutil.which(n) is None]
    if missing:
        pytest.skip(f"DCMTK tools missing: {missing}")


def _folder_name(study_uid: str) -> str:
    return "s" + hashlib.sha256(study_uid.encode()).hexdigest()[:16]


class Site:
    def __init__(self, root: Path, engine: str) -> None:
        self.native = engine == "dcmtk"
        self.studies = sampledata.generate(root / "in", studies=2, days=1, seed=7, modalities=("CT",))
        self.expected, self.other = self.studies
        self.staging = root / "state" / "staging"
        self.settings = load_settings(
            pacs={"called_ae": PACS_AE},
            receiver={"ae_title": RECEIVER_AE, "port": free_port(), "allowed_aes": [ROUTER_AE], "max_object_mb": 1,
                      "engine": engine},
            state_root=root / "state",
        )
        self.writer = StagingWriter(self.staging, _folder_name, self.settings.receiver.max_object_mb)
        self.writer.expect([self.expected.study_uid])  # the run retrieves this study only
        self.receiver = StorageReceiver.for_run(self.settings, self.writer)

    def files(self, study) -> list[Path]:
        return sorted(Path(study.path).rglob("*.dcm"))

    def staged(self) -> list[Path]:
        assert self.receiver.drain(30), "the receiver did not take in what it received"
        return sorted(p for p in self.staging.rglob("*") if p.is_file())

    def refusals_on_the_wire(self, sent: subprocess.CompletedProcess[str], status: str) -> int:
        """How many objects the sender was refused with ``status``; the native engine refuses none
        on the wire (each is answered success, then refused at the staging boundary)."""
        expected = "Store Response (Success)" if self.native else f"Store Response ({status})"
        return sent.stderr.count(expected)

    def run(self, tool: str, calling_ae: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
        cmd = [tool, "-v", "-aet", calling_ae, "-aec", RECEIVER_AE, "127.0.0.1", str(self.settings.receiver.port),
               *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=60)


@pytest.fixture(params=["dcmtk", "pynetdicom"])
def site(tmp_path, caplog, request):
    _require_dcmtk()
    caplog.set_level(logging.WARNING, logger="pacsflow")
    s = Site(tmp_path, request.param)
    with s.receiver:
        yield s


def test_a_stranger_cannot_echo_or_store(site, caplog):
    assert site.run("echoscu", PACS_AE).returncode == 0  # the PACS may
    assert site.run("echoscu", ROUTER_AE).returncode == 0  # and so may an allowed AE
    echo = site.run("echoscu", "STRANGER")
    store = site.run("storescu", "INTRUDER", *site.files(site.expected))
    assert echo.returncode != 0 and "Rejected" in echo.stdout + echo.stderr
    assert store.returncode != 0
    assert site.staged() == []  # not even an object of the study being retrieved
    assert site.receiver.refused_aes == ["STRANGER", "INTRUDER"]
    assert "calling AE 'STRANGER'" in caplog.text and "calling AE 'INTRUDER'" in caplog.text


def test_an_object_of_a_study_not_being_retrieved_is_refused_and_not_staged(site):
    injected = site.run("storescu", PACS_AE, "--no-halt", *site.files(site.other))
    sent = len(site.files(site.other))
    # 0x0124 Refused: Not Authorised (PS3.7 Annex C; DCMTK names it "Unknown Status"), per object
    assert site.refusals_on_the_wire(injected, "Unknown Status: 0x124") == sent
    assert site.staged() == [] and site.writer.refused["unexpected_study"] == sent == site.writer.rejected
    wanted = site.run("storescu", PACS_AE, *site.files(site.expected))
    assert wanted.returncode == 0, wanted.stderr[-500:]
    assert len(site.staged()) == site.expected.n_instances  # nothing of the other study beside it
    assert count_staged(site.writer.study_dir(site.expected.study_uid)) == site.expected.n_instances


def test_an_oversized_object_is_refused_and_leaves_no_file(site, tmp_path):
    big = pydicom.dcmread(site.files(site.expected)[0])
    big.SOPInstanceUID = big.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    block = big.private_block(0x0009, "PACSFLOW TEST", create=True)
    block.add_new(0x01, "OB", b"\0" * (3 * 1024 * 1024 // 2))  # 1.5 MB > max_object_mb = 1
    path = tmp_path / "big.dcm"
    big.save_as(path, enforce_file_format=True)
    refused = site.run("storescu", PACS_AE, path)
    assert site.refusals_on_the_wire(refused, "Refused: OutOfResources") == 1  # 0xA700
    assert (refused.returncode == 0) == site.native
    assert site.staged() == []  # no object, no temp file, no study folder
    assert site.writer.refused["too_large"] == 1
    small = site.run("storescu", PACS_AE, site.files(site.expected)[0])
    assert small.returncode == 0 and len(site.staged()) == 1


def test_an_object_the_pacs_did_not_list_is_refused_and_counted(site):
    files = site.files(site.expected)
    listed = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files[1:]]
    site.writer.announce(site.expected.study_uid, listed)  # the PACS listed every object but the first
    sent = site.run("storescu", PACS_AE, "--no-halt", *files)
    assert site.refusals_on_the_wire(sent, "Unknown Status: 0x124") == (len(files) if site.native else 1)
    assert len(site.staged()) == len(listed)  # the injected object left nothing in staging
    assert site.writer.unlisted(site.expected.study_uid) == 1 == site.writer.refused["unlisted_object"]
    assert site.writer.staged(site.expected.study_uid, listed) == set(listed)

"""A run's StudyProcessor: one Deidentifier, in this process or in worker processes, same output."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pacsflow.deployments.local import sampledata
from pacsflow.tasks.deid.deidentifier import Deidentifier
from pacsflow.tasks.lake.study import GROUP_OBJECTS, SPLIT_ABOVE, StudyOutcome, StudyProcessor, batches, group_size

KEY = b"study-processor-key-0123456789"


def _stage(study: sampledata.StudySummary, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for f in study.path.rglob("*.dcm"):
        shutil.copy(f, folder / f.name)
    return folder


def _lake_digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.dcm")}


@pytest.mark.parametrize("options", [(), ("Retain UIDs",)])
def test_worker_processes_write_what_this_process_writes(tmp_path, options):
    [study] = sampledata.generate(tmp_path / "in", studies=1, seed=7, modalities=("CT",))
    deid = Deidentifier(KEY, options)
    outcomes = {}
    for workers in (0, 1):
        run = tmp_path / f"w{workers}"
        with StudyProcessor(deid, str(run / "lake"), run / "quarantine", workers) as processor:
            outcomes[workers] = processor.process(_stage(study, run / "staged"), "2.25.1", run / "rows")
    assert outcomes[0].written == outcomes[1].written == study.n_instances
    assert _lake_digests(tmp_path / "w0" / "lake") == _lake_digests(tmp_path / "w1" / "lake") != {}

    # The outcome carries the catalog's StudyInstanceUID: the pseudonym, or the original under Retain UIDs.
    rows = pq.read_table(Path(outcomes[1].rows_dir) / "studies.parquet").column("study_uid").to_pylist()
    expected = study.study_uid if options else deid.uid(study.study_uid)
    assert outcomes[0].study_uids == outcomes[1].study_uids == rows == [expected]


def test_a_closed_processor_refuses_work(tmp_path):
    processor = StudyProcessor(Deidentifier(KEY), str(tmp_path / "lake"), tmp_path / "q", 1)
    processor.close()
    with pytest.raises(RuntimeError):
        processor.process(tmp_path, "2.25.1", tmp_path / "rows")


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def test_an_interrupted_run_abandons_its_studies_and_stops_its_workers(tmp_path):
    import os
    import threading
    import time
    from concurrent.futures import BrokenExecutor

    [study] = sampledata.generate(tmp_path / "in", studies=1, seed=7, modalities=("CT",), series_per_study=(4, 4),
                                  instances_per_series=(40, 40), rows=256, cols=256)
    staged = _stage(study, tmp_path / "staged")
    before = _children(os.getpid())
    results: list[object] = []
    with pytest.raises(KeyboardInterrupt):
        with StudyProcessor(Deidentifier(KEY), str(tmp_path / "lake"), tmp_path / "q", 1) as processor:
            def work() -> None:
                try:
                    results.append(processor.process(staged, "2.25.1", tmp_path / "rows"))
                except BrokenExecutor as exc:
                    results.append(exc)

            thread = threading.Thread(target=work)
            thread.start()
            while not list((tmp_path / "lake").rglob("*.dcm")):  # the worker is busy with the study
                time.sleep(0.01)
            workers = _children(os.getpid()) - before
            raise KeyboardInterrupt
    thread.join(10)
    assert workers and not _children(os.getpid()) & workers
    assert isinstance(results[0], BrokenExecutor)  # abandoned, not finished
    assert len(list((tmp_path / "lake").rglob("*.dcm"))) < study.n_instances
    with pytest.raises(RuntimeError):
        processor.process(tmp_path, "2.25.1", tmp_path / "rows")


def test_batches_split_only_large_studies_and_cover_every_object():
    paths = [Path(f"{i:05d}.dcm") for i in range(1000)]
    assert batches(paths[:SPLIT_ABOVE], 4) == [paths[:SPLIT_ABOVE]]  # small: one worker
    assert batches(paths, 1) == [paths]
    split = batches(paths, 4)
    assert len(split) == 4 and [p for b in split for p in b] == paths
    assert len(batches(paths[:300], 4)) == 2  # no batch under half the threshold


def test_a_large_study_split_across_workers_gives_the_rows_and_files_of_one_pass(tmp_path):
    [study] = sampledata.generate(tmp_path / "in", studies=1, seed=3, modalities=("CT",), series_per_study=(3, 3),
                                  instances_per_series=(100, 100), rows=16, cols=16)
    assert len(batches(sorted(study.path.rglob("*.dcm")), 2)) == 2
    deid = Deidentifier(KEY)
    tables = {}
    for workers in (0, 2):
        run = tmp_path / f"w{workers}"
        with StudyProcessor(deid, str(run / "lake"), run / "quarantine", workers) as processor:
            outcome = processor.process(_stage(study, run / "staged"), "2.25.1", run / "rows")
        assert outcome.written == study.n_instances == 300 and outcome.quarantined == []
        tables[workers] = {name: pq.read_table(run / "rows" / f"{name}.parquet").drop_columns(["ingested_at"])
                           if name == "studies" else pq.read_table(run / "rows" / f"{name}.parquet")
                           for name in ("studies", "series", "instances")}
        tables[workers]["actions"] = outcome.actions
    paths = {w: [p.replace(f"/w{w}/", "/") for p in tables[w]["instances"].column("file_path").to_pylist()]
             for w in (0, 2)}
    assert paths[0] == paths[2]  # the same files, each lake under its own folder
    for w in (0, 2):
        tables[w]["instances"] = tables[w]["instances"].drop_columns(["file_path"])
    assert tables[0] == tables[2]
    assert _lake_digests(tmp_path / "w0" / "lake") == _lake_digests(tmp_path / "w2" / "lake") != {}


def test_small_waiting_studies_are_grouped_and_large_ones_go_alone():
    small, large = 100, SPLIT_ABOVE + 1
    assert group_size([]) == 0
    assert group_size([small, small, small]) == 3
    assert group_size([large, small]) == 1  # a study split across the workers has its own task
    assert group_size([small, large, small]) == 1  # consecutive only: the large one is next, alone
    assert group_size([small] * 20, max_studies=4) == 4
    assert group_size([SPLIT_ABOVE, SPLIT_ABOVE, 1]) == GROUP_OBJECTS // SPLIT_ABOVE


@pytest.mark.parametrize("workers", [0, 1])
def test_several_studies_at_once_each_keep_their_outcome_or_their_error(tmp_path, workers):
    generated = sampledata.generate(tmp_path / "in", studies=2, seed=5, modalities=("CT",), series_per_study=(1, 1),
                                    instances_per_series=(5, 5), rows=16, cols=16)
    staged = [_stage(s, tmp_path / f"staged{i}") for i, s in enumerate(generated)]
    deid = Deidentifier(KEY)
    with StudyProcessor(deid, str(tmp_path / "lake"), tmp_path / "q", workers) as processor:
        results = processor.process_many([(staged[0], "2.25.1", tmp_path / "rows1"),
                                          (tmp_path / "never-staged", "2.25.2", tmp_path / "rows2"),
                                          (staged[1], "2.25.3", tmp_path / "rows3")])
    first, missing, last = results
    assert isinstance(missing, FileNotFoundError)  # that study alone failed
    assert isinstance(first, StudyOutcome) and isinstance(last, StudyOutcome)
    assert (first.pseudo_uid, last.pseudo_uid) == ("2.25.1", "2.25.3")
    assert first.written == generated[0].n_instances and last.written == generated[1].n_instances
    assert first.study_uids == [deid.uid(generated[0].study_uid)] and last.study_uids == [deid.uid(generated[1].study_uid)]
    assert len(list((tmp_path / "lake").rglob("*.dcm"))) == first.written + last.written
    assert not (tmp_path / "rows2").exists()

"""What the DICOM JSON column (``instances.dicom_json``) costs in catalog size, per instance and at 1M.

Rows come from real files: sample studies are generated (CT, MR, MG, the project's generator),
de-identified with the default options exactly as a nightly run does, and extracted with
``StudyExtractor``. Those studies are then replicated until the requested number of instances
is reached; every replica gets fresh random ``2.25.`` UIDs (study, series, instance, frame of
reference), in the typed columns and inside the JSON text alike, and its own study month, so
that the compressor sees the per-instance entropy a real catalog has. The two catalogs, one
with the JSON and one with the column null, are written by ``CatalogStore.commit`` (the real
writer: zstd, sorted, partitioned by month) and their ``instances`` files are measured.

    .venv/bin/python -m bench.catalog_size [--instances 100000] [--studies 24] [--seed 5]

At 1M instances the JSON text alone is several GB in memory; measure at 100k and multiply (the
Parquet size grows linearly with the rows), as the README does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pydicom

from pacsflow.catalog.store import CatalogStore
from pacsflow.deployments.local import sampledata
from pacsflow.tasks.core.errors import DeidentificationError
from pacsflow.tasks.deid.choices import PixelPolicy
from pacsflow.tasks.deid.deidentifier import Deidentifier
from pacsflow.tasks.lake.dicom_json import dicom_json
from pacsflow.tasks.lake.rows import StudyExtractor

_UID_COLUMNS = {
    "studies": ("study_uid",),
    "series": ("study_uid", "series_uid", "frame_of_reference_uid"),
    "instances": ("study_uid", "series_uid", "sop_instance_uid"),
}
TABLES = ("studies", "series", "instances")


def template_studies(out: Path, studies: int, seed: int) -> tuple[list[dict[str, pa.Table]], float]:
    """De-identified, extracted sample studies; and the mean time of dicom_json() per instance."""
    summaries = sampledata.generate(out, studies=studies, seed=seed, modalities=("CT", "MR", "MG"))
    deid = Deidentifier(b"bench-key-0123456789abcdef", pixel_policy=PixelPolicy.QUARANTINE)
    tables, json_seconds, n = [], 0.0, 0
    for summary in summaries:
        ex = StudyExtractor()
        for path in sorted(summary.path.rglob("*.dcm")):
            ds = pydicom.dcmread(path)
            try:
                deid.apply(ds)
            except DeidentificationError:
                continue
            start = time.process_time()  # CPU time: the machine may be shared
            dicom_json(ds)
            json_seconds += time.process_time() - start
            n += 1
            ex.add(ds, file_path=f"file:///lake/{n}.dcm", file_size=path.stat().st_size, sha256="0" * 64)
        if len(ex):
            tables.append(ex.tables())
    return tables, json_seconds / max(n, 1)


def _new_uid(rng: random.Random) -> str:
    return "2.25." + str(rng.getrandbits(128))


def replica(study: dict[str, pa.Table], rng: random.Random, month: int) -> dict[str, pa.Table]:
    """The study with fresh UIDs everywhere (columns and JSON) and a study date in another month."""
    olds: set[str] = set()
    for name, columns in _UID_COLUMNS.items():
        for column in columns:
            olds.update(v for v in study[name].column(column).to_pylist() if v)
    mapping = {old: _new_uid(rng) for old in olds}
    date = dt.date(2020, 1, 1) + dt.timedelta(days=31 * month + rng.randrange(28))
    out = {}
    for name in TABLES:
        table = study[name]
        for column in _UID_COLUMNS[name]:
            values = [mapping.get(v, v) if v else v for v in table.column(column).to_pylist()]
            table = table.set_column(table.schema.get_field_index(column), table.schema.field(column),
                                     pa.array(values, table.schema.field(column).type))
        dates = pa.array([date] * table.num_rows, pa.date32())
        table = table.set_column(table.schema.get_field_index("study_date"), table.schema.field("study_date"), dates)
        out[name] = table
    texts = out["instances"].column("dicom_json").to_pylist()
    texts = [_substitute(t, mapping) if t else t for t in texts]
    field = out["instances"].schema.field("dicom_json")
    out["instances"] = out["instances"].set_column(out["instances"].schema.get_field_index("dicom_json"), field,
                                                   pa.array(texts, field.type))
    return out


def _substitute(text: str, mapping: dict[str, str]) -> str:
    for old, new in mapping.items():
        text = text.replace(old, new)
    return text


def build(templates: list[dict[str, pa.Table]], instances: int, seed: int) -> dict[str, pa.Table]:
    rng = random.Random(seed)
    parts: dict[str, list[pa.Table]] = {t: [] for t in TABLES}
    total, i = 0, 0
    while total < instances:
        study = replica(templates[i % len(templates)], rng, month=(i // len(templates)) % 24)
        for name in TABLES:
            parts[name].append(study[name])
        total += study["instances"].num_rows
        i += 1
    return {name: pa.concat_tables(tables) for name, tables in parts.items()}


def without_json(tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    inst = tables["instances"]
    pos = inst.schema.get_field_index("dicom_json")
    nulls = pa.nulls(inst.num_rows, inst.schema.field(pos).type)
    return {**tables, "instances": inst.set_column(pos, inst.schema.field(pos), nulls)}


def instances_bytes(root: Path) -> int:
    return sum(Path(p).stat().st_size for p in CatalogStore(root).files("instances"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--studies", type=int, default=24, help="sample studies to replicate")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        templates, json_seconds = template_studies(root / "in", args.studies, args.seed)
        tables = build(templates, args.instances, args.seed)
        n = tables["instances"].num_rows
        texts = tables["instances"].column("dicom_json").cast(pa.large_binary())
        text_bytes = pc.sum(pc.binary_length(texts))
        alone = sum(pa.compress(t, "zstd", asbytes=True).__len__() for t in texts.to_pylist()[:20_000])
        sizes = {}
        for label, data in (("with dicom_json", tables), ("without", without_json(tables))):
            start = time.perf_counter()
            CatalogStore(root / label).commit(data)
            sizes[label] = (instances_bytes(root / label), time.perf_counter() - start)
    scale = 1_000_000 / n
    print(f"instances: {n} (from {len(templates)} de-identified sample studies, replicated with fresh UIDs)")
    print(f"dicom_json text: {text_bytes.as_py() / n:,.0f} bytes/instance before compression; "
          f"built in {json_seconds * 1e3:.2f} ms/instance")
    for label, (size, seconds) in sizes.items():
        print(f"instances table {label}: {size / 1e6:,.1f} MB ({size / n:,.0f} B/instance), commit {seconds:.1f} s; "
              f"at 1M: {size * scale / 1e9:,.2f} GB")
    per_row = alone / min(n, 20_000)
    print(f"each instance's JSON compressed alone (no help from its neighbours, an upper bound): "
          f"{per_row:,.0f} B/instance; at 1M: {per_row * 1e6 / 1e9:,.2f} GB")
    extra = sizes["with dicom_json"][0] - sizes["without"][0]
    print(f"cost of dicom_json: {extra / n:,.0f} B/instance; at 1M: {extra * scale / 1e9:,.2f} GB "
          f"(+{json_seconds * 1e6 / 60:,.1f} CPU minutes to build)")


if __name__ == "__main__":
    main()

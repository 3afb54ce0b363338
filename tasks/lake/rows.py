"""De-identified Dataset -> catalog rows, one study at a time (pure: no prefect, no sockets).

Usage::

    ex = StudyExtractor()
    for path, ds in deidentified_instances:          # the same Dataset the de-id step wrote
        ex.add(ds, file_path=url, file_size=size, sha256=digest)
    tables = ex.tables()                            # {"studies", "series", "instances"}
    CatalogStore(root).commit(tables)

Design
------
* ``add()`` is cheap: it reads only the ~60 attributes the catalog needs through ``Dataset.get``
  (pydicom converts just those elements) and keeps a small dict per instance; the Dataset is not
  retained and the file is never read again. Pixel data is never touched.
* Values are coerced defensively. A missing attribute, an empty value or a malformed value
  (``IS "abc"``, ``DA "2004-13-45"``, ``DS "n/a"``) becomes null and is counted in
  :attr:`StudyExtractor.malformed_values`; it never raises. Where one value is expected and several
  are stored, the first is used. Dates become ``datetime.date`` (``date32``); times stay as the
  stored TM text (see :mod:`pacsflow.catalog.schema`).
* Only identifiers without which a row cannot be placed raise :class:`~pacsflow.tasks.core.errors.BadDicom`
  (no StudyInstanceUID / SeriesInstanceUID / SOPInstanceUID, or an instance of another study).
  The extractor is unchanged when ``add()`` raises, so the rest of the study is kept.
* Output is deterministic whatever the order of ``add()`` calls: instances are sorted by
  (series_uid, sop_instance_uid) and study/series attributes are taken from the first instance in
  that order that has a non-null value; a SOP Instance UID added twice keeps one copy (the one with
  the smaller SHA-256). Re-extracting a study therefore yields identical rows.
* Logs carry UIDs and counts only, never header values.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pyarrow as pa
from pydicom.dataset import Dataset

from pacsflow.catalog.schema import INSTANCES, SERIES, STUDIES
from pacsflow.tasks.core.errors import BadDicom
from pacsflow.tasks.core.values import is_multi, items_of
from pacsflow.tasks.lake.dicom_json import dicom_json

logger = logging.getLogger(__name__)

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_STRIP = " \x00\t\r\n"


# -- value coercion: raw pydicom value -> Python value for Arrow, or None -----------------------
def _first(value: Any) -> Any:
    """First item of a multi-valued element (MultiValue/list/tuple), else the value itself."""
    if is_multi(value):
        return value[0] if len(value) else None
    return value


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    original = getattr(value, "original_string", None)  # DA/TM/DT objects keep their text
    text = str(original if original is not None else value).strip(_STRIP)
    return text or None


def to_str(value: Any) -> str | None:
    """Single string: first value, blanks and NUL padding stripped, empty -> None."""
    return _text(_first(value))


def to_str_list(value: Any) -> list[str] | None:
    """All values as stripped strings (empty items dropped); None when there are none."""
    if value is None:
        return None
    out = [t for t in (_text(v) for v in items_of(value)) if t is not None]
    return out or None


def to_int32(value: Any) -> int | None:
    """IS/US/SS/UL -> int within int32; '12.0' -> 12; malformed, fractional or out of range -> None."""
    value = _first(value)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = int(value)
    else:
        text = _text(value)
        if text is None:
            return None
        try:
            number = int(text)
        except ValueError:
            try:
                as_float = float(text)
            except ValueError:
                return None
            if not math.isfinite(as_float) or not as_float.is_integer():
                return None
            number = int(as_float)
    return number if _INT32_MIN <= number <= _INT32_MAX else None


def _float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = _text(value)
        if text is None:
            return None
        try:
            number = float(text)
        except ValueError:
            return None
    return number if math.isfinite(number) else None


def to_float(value: Any) -> float | None:
    """DS/FD -> finite float; first value if several; malformed -> None."""
    return _float(_first(value))


def to_float_list(value: Any) -> list[float] | None:
    """Multi-valued DS -> list of floats; None if absent or if any item is malformed."""
    if value is None:
        return None
    items = items_of(value)
    if not items:
        return None
    out = [_float(v) for v in items]
    if any(v is None for v in out):
        return None
    return out  # type: ignore[return-value]


def to_date(value: Any) -> _dt.date | None:
    """DA 'YYYYMMDD' (or ACR-NEMA 'YYYY.MM.DD') -> date; anything else -> None."""
    value = _first(value)
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        return value.date()
    if isinstance(value, _dt.date):
        return _dt.date(value.year, value.month, value.day)
    text = _text(value)
    if text is None:
        return None
    if len(text) == 10 and text[4] == "." and text[7] == ".":
        text = text[:4] + text[5:7] + text[8:]
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return _dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def to_time_text(value: Any) -> str | None:
    """TM kept as stored text (stripped); obviously malformed text (not digits/'.'/':') -> None."""
    text = to_str(value)
    if text is None:
        return None
    return text if all(c.isdigit() or c in ".:" for c in text) else None


def to_yes_no(value: Any) -> bool | None:
    """CS YES/NO -> True/False; anything else -> None."""
    text = to_str(value)
    if text is None:
        return None
    return {"YES": True, "NO": False}.get(text.upper())


_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


_AGE_CAP = 90  # Safe Harbor: every age of 90 or more is one category


def age_in_years(value: Any) -> float | None:
    """AS 'nnnU' (U in D/W/M/Y) -> years, rounded to 4 decimals, 90 or more as 90.0; malformed -> None."""
    text = to_str(value)
    if text is None or len(text) < 2:
        return None
    unit = text[-1].upper()
    digits = text[:-1]
    if unit not in _AGE_UNIT_YEARS or not digits.isdigit():
        return None
    return min(round(int(digits) * _AGE_UNIT_YEARS[unit], 4), float(_AGE_CAP))


def age_text(value: Any) -> str | None:
    """AS as stored, except an age of 90 or more, shown as '090Y' (the de-identifier writes it so;
    this holds for files de-identified elsewhere too)."""
    years = age_in_years(value)
    return "090Y" if years is not None and years >= _AGE_CAP else to_str(value)


_NO_CONTRAST = frozenset({"NONE", "NO", "N", "NIL", "0", "-", "N/A", "NA", "WITHOUT"})


def contrast_present(agent: Any) -> bool | None:
    """ContrastBolusAgent -> True when it names an agent, False for 'none'/'no'...; None when absent.

    Under Clean Descriptors the agent is kept after cleaning; under the Basic Profile it is emptied
    (Type 2) or a dummy, so the flag is null or unreliable then (README, Catalog columns)."""
    text = to_str(agent)
    if text is None:
        return None
    return text.upper() not in _NO_CONTRAST


def exposure_mas(exposure: Any, exposure_uas: Any, current_ma: Any, time_ms: Any) -> float | None:
    """Exposure in mAs: Exposure (IS, mAs), else ExposureInuAs / 1000, else tube current x time."""
    mas = to_float(exposure)
    if mas is not None:
        return mas
    uas = to_float(exposure_uas)
    if uas is not None:
        return uas / 1000
    ma, ms = to_float(current_ma), to_float(time_ms)
    return round(ma * ms / 1000, 6) if ma is not None and ms is not None else None


def joined(value: Any) -> str | None:
    """All values joined by '; ' (for VM 1-n text such as DeidentificationMethod)."""
    items = to_str_list(value)
    return "; ".join(items) if items else None


# column -> (DICOM keyword, coercion); order matters only for readability. These tables are data,
# so their lines look alike.
_Conv = Callable[[Any], Any]

_STUDY_ATTRS: dict[str, tuple[str, _Conv]] = {
    "patient_pseudo_id": ("PatientID", to_str),
    "study_date": ("StudyDate", to_date),
    "study_time": ("StudyTime", to_time_text),
    "study_id": ("StudyID", to_str),
    "accession_number": ("AccessionNumber", to_str),
    "study_description": ("StudyDescription", to_str),
    "patient_sex": ("PatientSex", to_str),
    "patient_age": ("PatientAge", age_text),
    "patient_age_years": ("PatientAge", age_in_years),
    "patient_size": ("PatientSize", to_float),
    "patient_weight": ("PatientWeight", to_float),
    "institution_name": ("InstitutionName", to_str),
    "deidentification_method": ("DeidentificationMethod", joined),
    "patient_identity_removed": ("PatientIdentityRemoved", to_yes_no),
}

_SERIES_ATTRS: dict[str, tuple[str, _Conv]] = {
    "series_number": ("SeriesNumber", to_int32),
    "modality": ("Modality", to_str),
    "series_description": ("SeriesDescription", to_str),
    "body_part_examined": ("BodyPartExamined", to_str),
    "laterality": ("Laterality", to_str),
    "series_date": ("SeriesDate", to_date),
    "series_time": ("SeriesTime", to_time_text),
    "manufacturer": ("Manufacturer", to_str),
    "manufacturer_model_name": ("ManufacturerModelName", to_str),
    "station_name": ("StationName", to_str),
    "protocol_name": ("ProtocolName", to_str),
    "frame_of_reference_uid": ("FrameOfReferenceUID", to_str),
}

_INSTANCE_ATTRS: dict[str, tuple[str, _Conv]] = {
    "sop_class_uid": ("SOPClassUID", to_str),
    "instance_number": ("InstanceNumber", to_int32),
    "image_type": ("ImageType", to_str_list),
    "rows": ("Rows", to_int32),
    "columns": ("Columns", to_int32),
    "number_of_frames": ("NumberOfFrames", to_int32),
    "samples_per_pixel": ("SamplesPerPixel", to_int32),
    "bits_allocated": ("BitsAllocated", to_int32),
    "bits_stored": ("BitsStored", to_int32),
    "photometric_interpretation": ("PhotometricInterpretation", to_str),
    "pixel_spacing": ("PixelSpacing", to_float_list),
    "slice_thickness": ("SliceThickness", to_float),
    "slice_location": ("SliceLocation", to_float),
    "image_position_patient": ("ImagePositionPatient", to_float_list),
    "image_orientation_patient": ("ImageOrientationPatient", to_float_list),
    "acquisition_date": ("AcquisitionDate", to_date),
    "content_date": ("ContentDate", to_date),
    "content_time": ("ContentTime", to_time_text),
    "burned_in_annotation": ("BurnedInAnnotation", to_yes_no),
    "spacing_between_slices": ("SpacingBetweenSlices", to_float),
    "imager_pixel_spacing": ("ImagerPixelSpacing", to_float_list),
    # acquisition parameters: per instance, since several vary within a series (multi-echo MR,
    # tube current modulation, dual energy); the series rows summarise them (_SERIES_SUMMARIES)
    "magnetic_field_strength": ("MagneticFieldStrength", to_float),
    "scanning_sequence": ("ScanningSequence", to_str_list),
    "sequence_variant": ("SequenceVariant", to_str_list),
    "sequence_name": ("SequenceName", to_str),
    "mr_acquisition_type": ("MRAcquisitionType", to_str),
    "repetition_time": ("RepetitionTime", to_float),
    "echo_time": ("EchoTime", to_float),
    "inversion_time": ("InversionTime", to_float),
    "flip_angle": ("FlipAngle", to_float),
    "kvp": ("KVP", to_float),
    "convolution_kernel": ("ConvolutionKernel", joined),
    "contrast_bolus_agent": ("ContrastBolusAgent", to_str),
    "view_position": ("ViewPosition", to_str),
    "image_laterality": ("ImageLaterality", to_str),
}

# Read for exposure_mas only (combined by exposure_mas()).
_EXPOSURE_ATTRS: tuple[tuple[str, _Conv], ...] = (
    ("Exposure", to_float), ("ExposureInuAs", to_float), ("XRayTubeCurrent", to_float), ("ExposureTime", to_float),
)

# series column -> (instance column, how the series' instance values are summarised)
_Summary = Callable[[list[Any]], Any]


def _distinct_sorted(values: list[Any]) -> list[Any] | None:
    return sorted(set(values)) or None


def _first_value(values: list[Any]) -> Any:
    return values[0] if values else None


def _any_true(values: list[Any]) -> bool | None:
    return any(values) if values else None


_SERIES_SUMMARIES: dict[str, tuple[str, _Summary]] = {
    "magnetic_field_strength": ("magnetic_field_strength", _first_value),
    "sequence_name": ("sequence_name", _first_value),
    "scanning_sequence": ("scanning_sequence", _first_value),
    "mr_acquisition_type": ("mr_acquisition_type", _first_value),
    "repetition_times": ("repetition_time", _distinct_sorted),
    "echo_times": ("echo_time", _distinct_sorted),
    "inversion_times": ("inversion_time", _distinct_sorted),
    "flip_angles": ("flip_angle", _distinct_sorted),
    "kvps": ("kvp", _distinct_sorted),
    "convolution_kernel": ("convolution_kernel", _first_value),
    "contrast_bolus_agent": ("contrast_bolus_agent", _first_value),
    "contrast_present": ("contrast_present", _any_true),
    "view_positions": ("view_position", _distinct_sorted),
    "slice_thickness": ("slice_thickness", _first_value),
    "spacing_between_slices": ("spacing_between_slices", _first_value),
}


def _is_empty(raw: Any) -> bool:
    if raw is None:
        return True
    if isinstance(raw, str):
        return not raw.strip(_STRIP)
    if isinstance(raw, bytes):
        return not raw.strip(_STRIP.encode())
    if is_multi(raw):
        return len(raw) == 0
    return False


class StudyExtractor:
    """Collects catalog rows for ONE study; see the module docstring.

    ``study_uid``: expected StudyInstanceUID; by default the first added instance's.
    """

    def __init__(self, study_uid: str | None = None) -> None:
        self._study_uid = study_uid
        self._instances: dict[str, dict[str, Any]] = {}
        self._study_values: dict[str, dict[str, Any]] = {}  # sop uid -> study-level values
        self._series_values: dict[str, dict[str, Any]] = {}  # sop uid -> series-level values
        self.malformed_values = 0
        self.duplicates = 0

    @property
    def study_uid(self) -> str | None:
        return self._study_uid

    def __len__(self) -> int:
        return len(self._instances)

    # -- reading ---------------------------------------------------------------------------
    def _read(self, ds: Dataset, keyword: str, conv: _Conv, sop_uid: str, counter: list[int]) -> Any:
        try:
            raw = ds.get(keyword)
        except Exception:  # noqa: BLE001 - an undecodable element becomes null and is counted
            counter[0] += 1
            logger.debug("unreadable %s in instance %s", keyword, sop_uid)
            return None
        value = conv(raw)
        if value is None and not _is_empty(raw):
            counter[0] += 1
            logger.debug("malformed %s in instance %s", keyword, sop_uid)
        return value

    @staticmethod
    def _json(ds: Dataset, sop_uid: str, counter: list[int]) -> str | None:
        try:
            return dicom_json(ds)
        except Exception:  # noqa: BLE001 - an undecodable element: the instance keeps its typed columns
            counter[0] += 1
            logger.debug("no DICOM JSON for instance %s", sop_uid)
            return None

    @staticmethod
    def _uid(ds: Dataset, keyword: str, meta_keyword: str | None = None) -> str | None:
        try:
            uid = to_str(ds.get(keyword))
            if uid is None and meta_keyword is not None:
                file_meta = getattr(ds, "file_meta", None)
                if file_meta is not None:
                    uid = to_str(file_meta.get(meta_keyword))
        except Exception:  # noqa: BLE001 - treated as missing; the caller raises BadDicom
            return None
        return uid

    def add(self, ds: Dataset, *, file_path: str, file_size: int, sha256: str) -> str:
        """Record one de-identified instance; returns its SOP Instance UID.

        Raises BadDicom (message with UIDs only) when the instance cannot be placed.
        """
        sop_uid = self._uid(ds, "SOPInstanceUID", "MediaStorageSOPInstanceUID")
        if sop_uid is None:
            raise BadDicom("instance without SOPInstanceUID; check the object at the PACS")
        study_uid = self._uid(ds, "StudyInstanceUID")
        if study_uid is None:
            raise BadDicom(f"instance {sop_uid} has no StudyInstanceUID; check the object at the PACS")
        if self._study_uid is not None and study_uid != self._study_uid:
            raise BadDicom(f"instance {sop_uid} belongs to study {study_uid}, not {self._study_uid}")
        series_uid = self._uid(ds, "SeriesInstanceUID")
        if series_uid is None:
            raise BadDicom(f"instance {sop_uid} has no SeriesInstanceUID; check the object at the PACS")

        counter = [0]
        study = {col: self._read(ds, kw, conv, sop_uid, counter) for col, (kw, conv) in _STUDY_ATTRS.items()}
        series = {col: self._read(ds, kw, conv, sop_uid, counter) for col, (kw, conv) in _SERIES_ATTRS.items()}
        if series["laterality"] is None:
            series["laterality"] = self._read(ds, "ImageLaterality", to_str, sop_uid, counter)
        inst = {col: self._read(ds, kw, conv, sop_uid, counter) for col, (kw, conv) in _INSTANCE_ATTRS.items()}
        if inst["sop_class_uid"] is None:
            inst["sop_class_uid"] = self._uid(ds, "SOPClassUID", "MediaStorageSOPClassUID")
        inst["contrast_present"] = contrast_present(inst["contrast_bolus_agent"])
        inst["dicom_json"] = self._json(ds, sop_uid, counter)
        inst["exposure_mas"] = exposure_mas(*(self._read(ds, kw, conv, sop_uid, counter) for kw, conv in _EXPOSURE_ATTRS))
        file_meta = getattr(ds, "file_meta", None)
        inst["transfer_syntax_uid"] = (
            self._uid(file_meta, "TransferSyntaxUID") if isinstance(file_meta, Dataset) else None
        )
        inst.update(
            study_uid=study_uid,
            series_uid=series_uid,
            sop_instance_uid=sop_uid,
            file_path=str(file_path),
            file_size=int(file_size),
            file_sha256=str(sha256).lower(),
        )

        # Commit the instance only now: a raise above leaves the extractor unchanged.
        self._keep(sop_uid, inst, study, series)
        self.malformed_values += counter[0]
        return sop_uid

    def _keep(self, sop_uid: str, inst: dict[str, Any], study: dict[str, Any], series: dict[str, Any]) -> None:
        """One instance's rows; of two copies of an instance, the one with the lower hash stays."""
        previous = self._instances.get(sop_uid)
        if previous is not None:
            self.duplicates += 1
            logger.warning("instance %s added twice to study %s; keeping one copy", sop_uid, inst["study_uid"])
            if previous["file_sha256"] <= inst["file_sha256"]:
                return
        self._study_uid = inst["study_uid"]
        self._instances[sop_uid] = inst
        self._study_values[sop_uid] = study
        self._series_values[sop_uid] = series

    def merge(self, other: "StudyExtractor") -> None:
        """Take in what another extractor of the same study recorded (a batch of its objects
        extracted elsewhere); raises BadDicom when it is another study's."""
        if other.study_uid is not None and self._study_uid is not None and other.study_uid != self._study_uid:
            raise BadDicom(f"rows of study {other.study_uid} cannot join study {self._study_uid}")
        for sop_uid, inst in other._instances.items():
            self._keep(sop_uid, inst, other._study_values[sop_uid], other._series_values[sop_uid])
        self.malformed_values += other.malformed_values
        self.duplicates += other.duplicates

    @classmethod
    def from_tables(cls, tables: Mapping[str, pa.Table]) -> "StudyExtractor":
        """An extractor holding one study's rows as :meth:`tables` made them (e.g. read back from
        the catalog), so that the rows of objects that arrive later can be merged into them and
        the study's and series' aggregates computed again over all. Raises BadDicom when the rows
        are not those of one study."""
        studies = tables["studies"].to_pylist()
        if len(studies) != 1:
            raise BadDicom(f"rows of one study expected, got {len(studies)} study rows")
        study = {col: studies[0].get(col) for col in _STUDY_ATTRS}
        series = {r["series_uid"]: {col: r.get(col) for col in _SERIES_ATTRS} for r in tables["series"].to_pylist()}
        out = cls(studies[0]["study_uid"])
        for inst in tables["instances"].to_pylist():
            sop_uid = inst["sop_instance_uid"]
            if inst["study_uid"] != out.study_uid or inst["series_uid"] not in series:
                raise BadDicom(f"instance {sop_uid} has no series row in study {out.study_uid}")
            out._keep(sop_uid, inst, dict(study), series[inst["series_uid"]])
        return out

    # -- building --------------------------------------------------------------------------
    def tables(self, ingested_at: _dt.datetime | None = None) -> dict[str, pa.Table]:
        """The study's rows as {"studies": 1 row, "series": 1/series, "instances": 1/instance}.

        ``ingested_at`` defaults to now (UTC); a naive datetime is taken as UTC.
        """
        if not self._instances:
            raise ValueError("no instances added")
        if ingested_at is None:
            ingested_at = _dt.datetime.now(_dt.timezone.utc)
        elif ingested_at.tzinfo is None:
            ingested_at = ingested_at.replace(tzinfo=_dt.timezone.utc)

        order = sorted(self._instances, key=lambda s: (self._instances[s]["series_uid"], s))
        study = _first_non_null((self._study_values[s] for s in order), _STUDY_ATTRS)
        study_date = study["study_date"]

        by_series: dict[str, list[str]] = {}
        for sop in order:
            by_series.setdefault(self._instances[sop]["series_uid"], []).append(sop)

        series_rows = []
        for series_uid, sops in by_series.items():  # already in series_uid order
            row = _first_non_null((self._series_values[s] for s in sops), _SERIES_ATTRS, ("laterality",))
            row.update(_summaries([self._instances[s] for s in sops]))
            dates = [d for d in (self._instances[s]["content_date"] for s in sops) if d is not None]
            row.update(
                study_uid=self._study_uid,
                series_uid=series_uid,
                number_of_instances=len(sops),
                total_file_size=sum(self._instances[s]["file_size"] for s in sops),
                min_content_date=min(dates, default=None),
                max_content_date=max(dates, default=None),
                study_date=study_date,
            )
            series_rows.append(row)

        instance_rows = [{**self._instances[s], "study_date": study_date} for s in order]
        all_dates = [r["content_date"] for r in instance_rows if r["content_date"] is not None]
        study.update(
            study_uid=self._study_uid,
            modalities=_distinct(r["modality"] for r in series_rows),
            body_parts=_distinct(r["body_part_examined"] for r in series_rows),
            manufacturers=_distinct(r["manufacturer"] for r in series_rows),
            number_of_series=len(series_rows),
            number_of_instances=len(instance_rows),
            total_file_size=sum(r["file_size"] for r in instance_rows),
            min_content_date=min(all_dates, default=None),
            max_content_date=max(all_dates, default=None),
            ingested_at=ingested_at,
        )
        return {
            "studies": _to_table([study], STUDIES),
            "series": _to_table(series_rows, SERIES),
            "instances": _to_table(instance_rows, INSTANCES),
        }


def _first_non_null(
    rows: Iterable[Mapping[str, Any]], attrs: Mapping[str, Any], extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    out: dict[str, Any] = dict.fromkeys([*attrs, *extra])
    missing = set(out)
    for row in rows:
        for col in list(missing):
            if row.get(col) is not None:
                out[col] = row[col]
                missing.discard(col)
        if not missing:
            break
    return out


def _summaries(instances: list[dict[str, Any]]) -> dict[str, Any]:
    """The series' acquisition summaries from its instances (already in SOP UID order)."""
    out = {}
    for column, (source, summary) in _SERIES_SUMMARIES.items():
        values = [i[source] for i in instances if i[source] is not None]
        out[column] = summary(values)
    return out


def _distinct(values: Iterable[str | None]) -> list[str]:
    return sorted({v for v in values if v is not None})


def _to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    columns = {name: [r.get(name) for r in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)

"""The catalog's Arrow schemas, declared once: one per table.

Every Parquet file the catalog writes, every table the extractor builds and every DuckDB view
has exactly these columns (the views add the hive partition column ``study_month``).
``tests/unit/test_catalog_schema.py`` pins names, types and nullability, so a change here must be
made on purpose: bump :data:`SCHEMA_VERSION`, then run ``CatalogStore.compact()`` so existing files
are rewritten to the new schema (new nullable columns are filled with nulls).

Conventions
-----------
* UIDs are the de-identified ones, as strings.
* Dates (DICOM DA) are ``date32``; malformed or missing dates are null.
* Times (DICOM TM) are kept as the stored string (``HHMMSS.FFFFFF``, possibly truncated, e.g.
  ``"0727"``) with surrounding blanks removed: TM has variable precision and no time zone, and
  keeping the text loses nothing. In DuckDB: ``strptime(study_time[:6], '%H%M%S')``.
* Counts and small integers (IS, US) are ``int32``; out-of-range or malformed values are null.
* Decimal strings (DS) are ``float64``; multi-valued ones (pixel spacing, position, orientation)
  are ``list<float64>``.
* ``study_date`` is repeated on every table so that DuckDB can skip row groups by date without a
  join; the store sets it from the study row and partitions all three tables by it.
"""

from __future__ import annotations

import pyarrow as pa

#: Bump on any change to the schemas below (and say why in the commit message).
SCHEMA_VERSION = 2  # 2: acquisition parameters, patient size/weight, dicom_json (issue 9)

_DOC = b"doc"


def _f(name: str, type_: pa.DataType, doc: str, *, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={_DOC: doc.encode("utf-8")})


_STRINGS = pa.list_(pa.string())
_FLOATS = pa.list_(pa.float64())

# The declared schemas: one field per line, so the lists below look alike by design (they are data).
STUDIES = pa.schema(
    [
        _f("study_uid", pa.string(), "StudyInstanceUID after de-identification", nullable=False),
        _f("patient_pseudo_id", pa.string(), "PatientID after de-identification (a pseudonym)"),
        _f("study_date", pa.date32(), "StudyDate; partition key (study_month)"),
        _f("study_time", pa.string(), "StudyTime as stored (DICOM TM text)"),
        _f("study_id", pa.string(), "StudyID"),
        _f("accession_number", pa.string(), "AccessionNumber after de-identification"),
        _f("study_description", pa.string(), "StudyDescription"),
        _f("modalities", _STRINGS, "Distinct series Modality values, sorted", nullable=False),
        _f("body_parts", _STRINGS, "Distinct series BodyPartExamined values, sorted", nullable=False),
        _f("number_of_series", pa.int32(), "Series seen in this study", nullable=False),
        _f("number_of_instances", pa.int32(), "Instances seen in this study", nullable=False),
        _f("total_file_size", pa.int64(), "Sum of the de-identified files' sizes in bytes", nullable=False),
        _f("min_content_date", pa.date32(), "Earliest instance ContentDate"),
        _f("max_content_date", pa.date32(), "Latest instance ContentDate"),
        _f("patient_sex", pa.string(), "PatientSex (M, F, O)"),
        _f("patient_age", pa.string(), "PatientAge as stored (DICOM AS, e.g. 045Y); 90 or more as 090Y"),
        _f("patient_age_years", pa.float64(), "PatientAge converted to years (D/W/M/Y units); 90 or more as 90"),
        _f("patient_size", pa.float64(), "PatientSize in m (Retain Patient Characteristics)"),
        _f("patient_weight", pa.float64(), "PatientWeight in kg (Retain Patient Characteristics)"),
        _f("institution_name", pa.string(), "InstitutionName"),
        _f("manufacturers", _STRINGS, "Distinct series Manufacturer values, sorted", nullable=False),
        _f("deidentification_method", pa.string(), "DeidentificationMethod; several values joined by '; '"),
        _f("patient_identity_removed", pa.bool_(), "PatientIdentityRemoved == YES"),
        _f("ingested_at", pa.timestamp("us", tz="UTC"), "When this study's rows were built", nullable=False),
    ],
    metadata={b"pacsflow.table": b"studies"},
)

SERIES = pa.schema(
    [
        _f("study_uid", pa.string(), "StudyInstanceUID after de-identification", nullable=False),
        _f("series_uid", pa.string(), "SeriesInstanceUID after de-identification", nullable=False),
        _f("series_number", pa.int32(), "SeriesNumber"),
        _f("modality", pa.string(), "Modality"),
        _f("series_description", pa.string(), "SeriesDescription"),
        _f("body_part_examined", pa.string(), "BodyPartExamined"),
        _f("laterality", pa.string(), "Laterality, else ImageLaterality"),
        _f("series_date", pa.date32(), "SeriesDate"),
        _f("series_time", pa.string(), "SeriesTime as stored (DICOM TM text)"),
        _f("manufacturer", pa.string(), "Manufacturer"),
        _f("manufacturer_model_name", pa.string(), "ManufacturerModelName"),
        _f("station_name", pa.string(), "StationName"),
        _f("protocol_name", pa.string(), "ProtocolName"),
        _f("frame_of_reference_uid", pa.string(), "FrameOfReferenceUID"),
        _f("magnetic_field_strength", pa.float64(), "MR MagneticFieldStrength in T (first instance that has it)"),
        _f("sequence_name", pa.string(), "MR SequenceName (first instance that has it)"),
        _f("scanning_sequence", _STRINGS, "MR ScanningSequence values, e.g. [SE, IR] (first instance)"),
        _f("mr_acquisition_type", pa.string(), "MR MRAcquisitionType: 2D or 3D (first instance)"),
        _f("repetition_times", _FLOATS, "Distinct instance RepetitionTime values in ms, sorted"),
        _f("echo_times", _FLOATS, "Distinct instance EchoTime values in ms, sorted (several: multi-echo)"),
        _f("inversion_times", _FLOATS, "Distinct instance InversionTime values in ms, sorted"),
        _f("flip_angles", _FLOATS, "Distinct instance FlipAngle values in degrees, sorted"),
        _f("kvps", _FLOATS, "Distinct instance KVP values, sorted (several: dual energy)"),
        _f("convolution_kernel", pa.string(), "CT ConvolutionKernel (first instance; several values joined by '; ')"),
        _f("contrast_bolus_agent", pa.string(), "ContrastBolusAgent after Clean Descriptors (first instance)"),
        _f("contrast_present", pa.bool_(), "Some instance names a contrast agent; null when none says"),
        _f("view_positions", _STRINGS, "Distinct instance ViewPosition values (MG/DX: CC, MLO...), sorted"),
        _f("slice_thickness", pa.float64(), "SliceThickness in mm (first instance that has it)"),
        _f("spacing_between_slices", pa.float64(), "SpacingBetweenSlices in mm (first instance that has it)"),
        _f("number_of_instances", pa.int32(), "Instances seen in this series", nullable=False),
        _f("total_file_size", pa.int64(), "Sum of the de-identified files' sizes in bytes", nullable=False),
        _f("min_content_date", pa.date32(), "Earliest instance ContentDate"),
        _f("max_content_date", pa.date32(), "Latest instance ContentDate"),
        _f("study_date", pa.date32(), "The study's StudyDate (denormalized for row-group skipping)"),
    ],
    metadata={b"pacsflow.table": b"series"},
)

INSTANCES = pa.schema(
    [
        _f("study_uid", pa.string(), "StudyInstanceUID after de-identification", nullable=False),
        _f("series_uid", pa.string(), "SeriesInstanceUID after de-identification", nullable=False),
        _f("sop_instance_uid", pa.string(), "SOPInstanceUID after de-identification; primary key", nullable=False),
        _f("sop_class_uid", pa.string(), "SOPClassUID"),
        _f("instance_number", pa.int32(), "InstanceNumber"),
        _f("transfer_syntax_uid", pa.string(), "File meta TransferSyntaxUID"),
        _f("image_type", _STRINGS, "ImageType values"),
        _f("rows", pa.int32(), "Rows"),
        _f("columns", pa.int32(), "Columns"),
        _f("number_of_frames", pa.int32(), "NumberOfFrames"),
        _f("samples_per_pixel", pa.int32(), "SamplesPerPixel"),
        _f("bits_allocated", pa.int32(), "BitsAllocated"),
        _f("bits_stored", pa.int32(), "BitsStored"),
        _f("photometric_interpretation", pa.string(), "PhotometricInterpretation"),
        _f("pixel_spacing", _FLOATS, "PixelSpacing (row, column) in mm"),
        _f("slice_thickness", pa.float64(), "SliceThickness in mm"),
        _f("slice_location", pa.float64(), "SliceLocation in mm"),
        _f("image_position_patient", _FLOATS, "ImagePositionPatient (x, y, z) in mm"),
        _f("image_orientation_patient", _FLOATS, "ImageOrientationPatient direction cosines"),
        _f("acquisition_date", pa.date32(), "AcquisitionDate"),
        _f("content_date", pa.date32(), "ContentDate"),
        _f("content_time", pa.string(), "ContentTime as stored (DICOM TM text)"),
        _f("burned_in_annotation", pa.bool_(), "BurnedInAnnotation: YES -> true, NO -> false, else null"),
        _f("spacing_between_slices", pa.float64(), "SpacingBetweenSlices in mm"),
        _f("imager_pixel_spacing", _FLOATS, "ImagerPixelSpacing (row, column) in mm at the detector (MG, DX, CR)"),
        _f("magnetic_field_strength", pa.float64(), "MR MagneticFieldStrength in T"),
        _f("scanning_sequence", _STRINGS, "MR ScanningSequence values (SE, IR, GR, EP, RM)"),
        _f("sequence_variant", _STRINGS, "MR SequenceVariant values (SK, MTC, SS, TRSS, SP, MP, OSP, NONE)"),
        _f("sequence_name", pa.string(), "MR SequenceName"),
        _f("mr_acquisition_type", pa.string(), "MR MRAcquisitionType: 2D or 3D"),
        _f("repetition_time", pa.float64(), "MR RepetitionTime in ms"),
        _f("echo_time", pa.float64(), "MR EchoTime in ms"),
        _f("inversion_time", pa.float64(), "MR InversionTime in ms"),
        _f("flip_angle", pa.float64(), "FlipAngle in degrees"),
        _f("kvp", pa.float64(), "KVP: peak kilovoltage (CT, MG, DX)"),
        _f("exposure_mas", pa.float64(), "Exposure in mAs: Exposure, else ExposureInuAs/1000, else current x time"),
        _f("convolution_kernel", pa.string(), "CT ConvolutionKernel; several values joined by '; '"),
        _f("contrast_bolus_agent", pa.string(), "ContrastBolusAgent after Clean Descriptors"),
        _f("contrast_present", pa.bool_(), "ContrastBolusAgent names an agent (not NONE/NO...); null when absent"),
        _f("view_position", pa.string(), "ViewPosition (MG/DX: CC, MLO, PA, AP, LL...)"),
        _f("image_laterality", pa.string(), "ImageLaterality (R, L, U, B)"),
        _f("dicom_json", pa.large_string(), "Every de-identified attribute as DICOM JSON (PS3.18 F.2) without "
           "pixel data and binary elements"),
        _f("file_path", pa.string(), "Path or URL of the de-identified Part 10 file", nullable=False),
        _f("file_size", pa.int64(), "Size of the de-identified file in bytes", nullable=False),
        _f("file_sha256", pa.string(), "SHA-256 of the de-identified file, hex", nullable=False),
        _f("study_date", pa.date32(), "The study's StudyDate (denormalized for row-group skipping)"),
    ],
    metadata={b"pacsflow.table": b"instances"},
)

SCHEMAS: dict[str, pa.Schema] = {"studies": STUDIES, "series": SERIES, "instances": INSTANCES}

#: Sort keys per table: files are sorted by these, which DuckDB's row-group statistics exploit.
SORT_KEYS: dict[str, tuple[str, ...]] = {
    "studies": ("study_uid",),
    "series": ("study_uid", "series_uid"),
    "instances": ("study_uid", "series_uid", "sop_instance_uid"),
}

#: Primary keys per table (unique within a commit).
PRIMARY_KEYS: dict[str, tuple[str, ...]] = {
    "studies": ("study_uid",),
    "series": ("study_uid", "series_uid"),
    "instances": ("sop_instance_uid",),
}


def column_doc(table: str, column: str) -> str:
    """The documentation string of one column."""
    meta: dict[bytes, bytes] = SCHEMAS[table].field(column).metadata or {}
    return meta.get(_DOC, b"").decode("utf-8")


def empty_table(table: str) -> pa.Table:
    """A zero-row table with the declared schema."""
    return SCHEMAS[table].empty_table()

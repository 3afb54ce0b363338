"""Pins the catalog schemas: any change here must be deliberate (and bump SCHEMA_VERSION)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pacsflow.catalog import schema

STR, DATE, I32, I64, F64, BOOL = pa.string(), pa.date32(), pa.int32(), pa.int64(), pa.float64(), pa.bool_()
STRS, F64S = pa.list_(pa.string()), pa.list_(pa.float64())
TS = pa.timestamp("us", tz="UTC")
NOT_NULL, NULL = False, True

PINNED = {
    "studies": [
        ("study_uid", STR, NOT_NULL),
        ("patient_pseudo_id", STR, NULL),
        ("study_date", DATE, NULL),
        ("study_time", STR, NULL),
        ("study_id", STR, NULL),
        ("accession_number", STR, NULL),
        ("study_description", STR, NULL),
        ("modalities", STRS, NOT_NULL),
        ("body_parts", STRS, NOT_NULL),
        ("number_of_series", I32, NOT_NULL),
        ("number_of_instances", I32, NOT_NULL),
        ("total_file_size", I64, NOT_NULL),
        ("min_content_date", DATE, NULL),
        ("max_content_date", DATE, NULL),
        ("patient_sex", STR, NULL),
        ("patient_age", STR, NULL),
        ("patient_age_years", F64, NULL),
        ("patient_size", F64, NULL),
        ("patient_weight", F64, NULL),
        ("institution_name", STR, NULL),
        ("manufacturers", STRS, NOT_NULL),
        ("deidentification_method", STR, NULL),
        ("patient_identity_removed", BOOL, NULL),
        ("ingested_at", TS, NOT_NULL),
    ],
    "series": [
        ("study_uid", STR, NOT_NULL),
        ("series_uid", STR, NOT_NULL),
        ("series_number", I32, NULL),
        ("modality", STR, NULL),
        ("series_description", STR, NULL),
        ("body_part_examined", STR, NULL),
        ("laterality", STR, NULL),
        ("series_date", DATE, NULL),
        ("series_time", STR, NULL),
        ("manufacturer", STR, NULL),
        ("manufacturer_model_name", STR, NULL),
        ("station_name", STR, NULL),
        ("protocol_name", STR, NULL),
        ("frame_of_reference_uid", STR, NULL),
        ("magnetic_field_strength", F64, NULL),
        ("sequence_name", STR, NULL),
        ("scanning_sequence", STRS, NULL),
        ("mr_acquisition_type", STR, NULL),
        ("repetition_times", F64S, NULL),
        ("echo_times", F64S, NULL),
        ("inversion_times", F64S, NULL),
        ("flip_angles", F64S, NULL),
        ("kvps", F64S, NULL),
        ("convolution_kernel", STR, NULL),
        ("contrast_bolus_agent", STR, NULL),
        ("contrast_present", BOOL, NULL),
        ("view_positions", STRS, NULL),
        ("slice_thickness", F64, NULL),
        ("spacing_between_slices", F64, NULL),
        ("number_of_instances", I32, NOT_NULL),
        ("total_file_size", I64, NOT_NULL),
        ("min_content_date", DATE, NULL),
        ("max_content_date", DATE, NULL),
        ("study_date", DATE, NULL),
    ],
    "instances": [
        ("study_uid", STR, NOT_NULL),
        ("series_uid", STR, NOT_NULL),
        ("sop_instance_uid", STR, NOT_NULL),
        ("sop_class_uid", STR, NULL),
        ("instance_number", I32, NULL),
        ("transfer_syntax_uid", STR, NULL),
        ("image_type", STRS, NULL),
        ("rows", I32, NULL),
        ("columns", I32, NULL),
        ("number_of_frames", I32, NULL),
        ("samples_per_pixel", I32, NULL),
        ("bits_allocated", I32, NULL),
        ("bits_stored", I32, NULL),
        ("photometric_interpretation", STR, NULL),
        ("pixel_spacing", F64S, NULL),
        ("slice_thickness", F64, NULL),
        ("slice_location", F64, NULL),
        ("image_position_patient", F64S, NULL),
        ("image_orientation_patient", F64S, NULL),
        ("acquisition_date", DATE, NULL),
        ("content_date", DATE, NULL),
        ("content_time", STR, NULL),
        ("burned_in_annotation", BOOL, NULL),
        ("spacing_between_slices", F64, NULL),
        ("imager_pixel_spacing", F64S, NULL),
        ("magnetic_field_strength", F64, NULL),
        ("scanning_sequence", STRS, NULL),
        ("sequence_variant", STRS, NULL),
        ("sequence_name", STR, NULL),
        ("mr_acquisition_type", STR, NULL),
        ("repetition_time", F64, NULL),
        ("echo_time", F64, NULL),
        ("inversion_time", F64, NULL),
        ("flip_angle", F64, NULL),
        ("kvp", F64, NULL),
        ("exposure_mas", F64, NULL),
        ("convolution_kernel", STR, NULL),
        ("contrast_bolus_agent", STR, NULL),
        ("contrast_present", BOOL, NULL),
        ("view_position", STR, NULL),
        ("image_laterality", STR, NULL),
        ("dicom_json", pa.large_string(), NULL),
        ("file_path", STR, NOT_NULL),
        ("file_size", I64, NOT_NULL),
        ("file_sha256", STR, NOT_NULL),
        ("study_date", DATE, NULL),
    ],
}


def test_schema_version_is_pinned():
    assert schema.SCHEMA_VERSION == 2


def test_table_set():
    assert list(schema.SCHEMAS) == ["studies", "series", "instances"]
    assert schema.SCHEMAS["studies"] is schema.STUDIES
    assert schema.SCHEMAS["series"] is schema.SERIES
    assert schema.SCHEMAS["instances"] is schema.INSTANCES


@pytest.mark.parametrize("table", list(PINNED))
def test_columns_types_nullability_are_pinned(table):
    actual = [(f.name, f.type, f.nullable) for f in schema.SCHEMAS[table]]
    assert actual == PINNED[table]


@pytest.mark.parametrize("table", list(PINNED))
def test_every_column_is_documented(table):
    for name in schema.SCHEMAS[table].names:
        assert schema.column_doc(table, name), f"{table}.{name} has no doc"


@pytest.mark.parametrize("table", list(PINNED))
def test_keys_are_non_null_columns(table):
    s = schema.SCHEMAS[table]
    for key in (*schema.SORT_KEYS[table], *schema.PRIMARY_KEYS[table]):
        assert not s.field(key).nullable
    # every table carries study_date so DuckDB can skip row groups by date without a join
    assert s.field("study_date").type == pa.date32()


def test_empty_table_has_schema():
    for table in PINNED:
        empty = schema.empty_table(table)
        assert empty.num_rows == 0
        assert empty.schema.equals(schema.SCHEMAS[table], check_metadata=True)

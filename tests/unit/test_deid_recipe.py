"""A site's deid recipe on top of the PS3.15 profile: deid's own example recipes, and small site
recipes that remove, replace, jitter, add and try to keep."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import deid
import pydicom
import pytest
from pydicom.data import get_testdata_file

from pacsflow.tasks.core.errors import DeidentificationError
from pacsflow.tasks.deid.deidentifier import DeidReport, Deidentifier
from pacsflow.tasks.deid.folder import run_deidentify
from pacsflow.tasks.deid.instance import encode
from pacsflow.tasks.deid.manifest import MANIFEST_NAME
from pacsflow.tasks.deid.recipe import SiteRecipe, load_recipe
from pacsflow.tasks.settings import DeidSettings

KEY = b"recipe-test-key-0123456789"
DEID_RECIPES = sorted((Path(deid.__file__).parent / "data").glob("deid.dicom*"))
SAMPLES = ("CT_small.dcm", "MR_small.dcm", "US1_J2KR.dcm", "rtplan.dcm")


def _recipe(tmp_path: Path, body: str, may_keep: bool = False, name: str = "site.deid") -> SiteRecipe:
    path = tmp_path / name
    path.write_text("FORMAT dicom\n\n" + body)
    return load_recipe(path, may_keep)


def _run(recipe: SiteRecipe | None, sample: str = "CT_small.dcm", **changes: str):
    """The sample through the profile (and recipe): the re-read output, its bytes and the report."""
    ds = pydicom.dcmread(get_testdata_file(sample))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    report = DeidReport()
    data = encode(ds, Deidentifier(KEY, recipe=recipe).apply(ds, report))
    return pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)), data, report.actions


def test_deid_ships_the_example_recipes_we_test_with():
    assert {p.name for p in DEID_RECIPES} >= {"deid.dicom", "deid.dicom.ultrasound", "deid.dicom.xray.chest"}


@pytest.mark.parametrize("recipe_path", DEID_RECIPES, ids=lambda p: p.name)
@pytest.mark.parametrize("sample", SAMPLES)
def test_deids_example_recipes_apply_on_top_of_the_profile(recipe_path, sample):
    recipe = load_recipe(recipe_path)
    out, data, actions = _run(recipe, sample)
    plain, plain_data, _ = _run(None, sample)
    assert out.PatientIdentityRemoved == "YES" and out.StudyInstanceUID.startswith("2.25.")
    assert out.PatientID == plain.PatientID and out.SOPInstanceUID == plain.SOPInstanceUID  # keys protected
    assert f"site recipe {recipe_path.name[:24]} sha256:{recipe.sha256[:16]}" in out.DeidentificationMethod
    # the recipe only takes away: every element it left was in the profile's output too
    assert {e.tag for e in out} - {e.tag for e in plain} <= {pydicom.tag.Tag("IssuerOfPatientID")}
    if recipe.header:
        assert actions.get("recipe REMOVE", 0) > 0 and "StudyDate" not in out  # REMOVE endswith:Date
        assert "PatientBirthDate" not in out  # removed; its ADD with a var: value is skipped, never read
        assert actions["recipe ADD skipped (computed value)"] == 3
    again, again_data, _ = _run(pickle.loads(pickle.dumps(recipe)), sample)
    assert again_data == data


def test_remove_of_a_retained_attribute_removes_it(tmp_path):
    plain, _, _ = _run(None)
    assert plain.Manufacturer == "GE MEDICAL SYSTEMS"  # the profile keeps it
    out, data, actions = _run(_recipe(tmp_path, "%header\nREMOVE Manufacturer\nREMOVE contains:Diameter\n"))
    assert "Manufacturer" not in out and b"GE MEDICAL SYSTEMS" not in data
    assert "ReconstructionDiameter" not in out and "DataCollectionDiameter" not in out
    assert actions["recipe REMOVE"] == 3


def test_replace_blank_jitter_and_add(tmp_path):
    plain, _, _ = _run(None)
    recipe = _recipe(tmp_path, "%header\nREPLACE ManufacturerModelName MODEL-X\nBLANK ContrastBolusRoute\n"
                               "REPLACE ConvolutionKernel func:generate_kernel\nJITTER StudyDate 10\n"
                               "ADD ClinicalTrialProtocolID PROJECT-7\nADD PatientIdentityRemoved NO\n")
    out, _, actions = _run(recipe)
    assert out.ManufacturerModelName == "MODEL-X"
    assert out.ContrastBolusRoute == "" and out.ConvolutionKernel == ""  # a func: value is never computed
    shifted = pydicom.valuerep.DA(plain.StudyDate)
    assert (pydicom.valuerep.DA(out.StudyDate) - shifted).days == 10  # on the profile's shifted date
    assert out.ClinicalTrialProtocolID == "PROJECT-7"
    assert out.PatientIdentityRemoved == "YES"  # protected: the pipeline writes it
    assert actions["recipe computed value blanked"] == 1 and actions["recipe protected: PatientIdentityRemoved"] == 1


def test_remove_is_not_applied_to_a_field_the_recipe_replaces(tmp_path):
    out, _, _ = _run(_recipe(tmp_path, "%header\nREMOVE startswith:Manufacturer\n"
                                       "REPLACE ManufacturerModelName MODEL-X\n"))
    assert "Manufacturer" not in out and out.ManufacturerModelName == "MODEL-X"  # deid's precedence


def test_keep_without_the_option_is_ignored_and_recorded(tmp_path):
    recipe = _recipe(tmp_path, "%header\nKEEP PatientName\nKEEP InstitutionName\nKEEP StudyDescription\n"
                               "KEEP Manufacturer\n")
    out, data, actions = _run(recipe, StudyDescription="HEAD 20040119")
    plain, plain_data, _ = _run(None, StudyDescription="HEAD 20040119")
    assert out.PatientName == plain.PatientName
    assert b"CompressedSamples" not in data and b"JFK IMAGING CENTER" not in data and b"20040119" not in data
    assert out.StudyDescription == plain.StudyDescription
    assert actions["recipe KEEP ignored: InstitutionName"] == 1
    assert actions["recipe KEEP ignored: StudyDescription"] == 1
    assert actions["recipe protected: PatientName"] == 1
    assert "recipe KEEP ignored: Manufacturer" not in actions  # the profile keeps it anyway
    assert "site recipe KEEP allowed" not in out.DeidentificationMethod


def test_keep_with_the_option_spares_the_attribute_from_the_profile(tmp_path):
    recipe = _recipe(tmp_path, "%header\nKEEP StudyDescription\nKEEP InstitutionName\nKEEP PatientName\n"
                               "REMOVE StudyDescription\n", may_keep=True)
    out, data, actions = _run(recipe, StudyDescription="HEAD 20040119")
    assert out.StudyDescription == "HEAD 20040119" and out.InstitutionName == "JFK IMAGING CENTER"
    assert b"CompressedSamples" not in data  # PatientName is never kept
    assert actions["recipe KEEP: StudyDescription"] == 1 and actions["recipe KEEP: InstitutionName"] == 1
    assert "site recipe KEEP allowed" in out.DeidentificationMethod


def test_values_lists_are_read_from_the_original(tmp_path):
    recipe = _recipe(tmp_path, "%values places\nFIELD InstitutionName\n\n%header\nREMOVE values:places\n")
    changes = {"SoftwareVersions": "JFK IMAGING CENTER 05"}
    with pytest.raises(DeidentificationError):
        _run(None, **changes)  # the audit finds the institution in a retained attribute
    out, data, _ = _run(recipe, **changes)
    assert "SoftwareVersions" not in out and b"JFK IMAGING" not in data


@pytest.mark.parametrize("body, expect", [
    ("%header\nREMOVE\n", "(line 5)"),  # REMOVE without a field
    ("%bogus\nREMOVE PatientName\n", "(line 4)"),  # no such section
    ("%header\nFROBNICATE PatientName\n", "(line 5)"),  # a line deid would skip
    ("%header\nJITTER StudyDate soon\n", "needs a whole number of days"),
    ("%header\nADD contains:Name X\n", "needs a standard attribute"),
])
def test_a_broken_recipe_is_one_line_naming_the_setting(tmp_path, body, expect):
    with pytest.raises(DeidentificationError) as err:
        _recipe(tmp_path, "\n" + body)
    message = str(err.value)
    assert message.startswith("deid.recipe_file: site.deid") and expect in message and "\n" not in message


def test_a_missing_or_formatless_recipe_is_refused(tmp_path):
    with pytest.raises(DeidentificationError, match="deid.recipe_file: cannot read nowhere.deid"):
        load_recipe(tmp_path / "nowhere.deid")
    (tmp_path / "plain.deid").write_text("%header\nREMOVE Manufacturer\n")
    with pytest.raises(DeidentificationError, match="deid.recipe_file: plain.deid .*FORMAT dicom"):
        load_recipe(tmp_path / "plain.deid")


def test_filters_are_deids_parsed_structure():
    recipe = load_recipe(next(p for p in DEID_RECIPES if p.name == "deid.dicom.ultrasound"))
    graylist = recipe.filters()["graylist"]
    assert [0, "all"] in graylist[0]["coordinates"]
    assert any(c[0] == 1 and c[1].startswith("from:") for g in graylist for c in g["coordinates"])
    assert recipe.deid_recipe().get_filters("graylist") == graylist
    recipe.filters()["graylist"].clear()  # a copy
    assert recipe.filters()["graylist"] == graylist


def test_settings_build_the_recipe_and_the_manifest_records_it(tmp_path):
    path = tmp_path / "site.deid"
    path.write_text("FORMAT dicom\n%header\nREMOVE Manufacturer\nKEEP InstitutionName\n")
    settings = DeidSettings(recipe_file=path, pixel_policy="allow")
    deid_ = Deidentifier.from_settings(KEY, settings)
    assert deid_.recipe is not None and not deid_.recipe.may_keep
    assert pickle.loads(pickle.dumps(deid_)).recipe == deid_.recipe
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    run_deidentify(tmp_path / "in", tmp_path / "out", settings.options, KEY, recipe=deid_.recipe)
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["site_recipe"] == {"file": "site.deid", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                       "may_keep": False, "header_actions": 2, "filters": []}
    assert manifest["actions"]["recipe KEEP ignored: InstitutionName"] == 1
    assert str(tmp_path) not in json.dumps(manifest)


def test_the_command_takes_a_recipe(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pacsflow.flows.cli import app

    monkeypatch.delenv("PACSFLOW_CONFIG", raising=False)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    (tmp_path / "key").write_bytes(KEY)
    (tmp_path / "site.deid").write_text("FORMAT dicom\n%header\nREMOVE Manufacturer\n")
    (tmp_path / "broken.deid").write_text("FORMAT dicom\n%header\nREMOVE\n")
    base = ["deidentify", str(tmp_path / "in"), "--key-file", str(tmp_path / "key"), "--pixel-policy", "allow"]
    ok = CliRunner().invoke(app, [*base[:2], str(tmp_path / "out"), *base[2:], "--recipe", str(tmp_path / "site.deid")])
    assert ok.exit_code == 0, ok.output
    written = list((tmp_path / "out").rglob("*.dcm"))
    assert len(written) == 1 and "Manufacturer" not in pydicom.dcmread(written[0])
    assert json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["site_recipe"]["file"] == "site.deid"
    bad = CliRunner().invoke(app, [*base[:2], str(tmp_path / "bad"), *base[2:],
                                   "--recipe", str(tmp_path / "broken.deid")])
    assert bad.exit_code == 2 and "deid.recipe_file: broken.deid" in bad.output
    assert not (tmp_path / "bad").exists()


def test_a_site_recipes_filter_regions_are_blanked_by_the_pixel_policy(tmp_path):
    """A site's %filter rule for its own device: its rectangle is blanked, no mask rule needed."""
    recipe = _recipe(tmp_path, "%filter graylist\n\nLABEL Our ultrasound # site\n  contains Modality US\n"
                               "  coordinates 100,100,180,140\n")
    ds = pydicom.dcmread(get_testdata_file("US1_J2KR.dcm"))
    assert ds.pixel_array[100:140, 100:180].all(axis=-1).any()  # the region shows the image to begin with
    Deidentifier(KEY, pixel_policy="mask", recipe=recipe).apply(ds)
    out = ds.pixel_array
    assert not out[100:140, 100:180].any() and out[140:, 180:].any() and ds.BurnedInAnnotation == "NO"
    with pytest.raises(DeidentificationError, match="no mask rule"):  # without the recipe: nothing to blank
        Deidentifier(KEY, pixel_policy="mask").apply(pydicom.dcmread(get_testdata_file("US1_J2KR.dcm")))

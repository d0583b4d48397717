"""DICOM series in: a series written from a real hippocampus case predicts the mask of its NIfTI twin (oblique and
LPS geometry); a bad series gets one line naming the file and the fault. DICOM SEG out reads back onto the mask."""

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import BasicTextSRStorage, generate_uid
from scipy.spatial.transform import Rotation

from medseg.inference.dicom import check_series
from medseg.predict import CasesFailed, predict
from medseg.train import train

from .conftest import compose_cfg, shared_dataset
from .dicom_series import dicom_and_nifti_twins, write_series
from .helpers import TINY, TINY_UNET


@pytest.fixture(scope="module")
def run_dir(tiny_dataset, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dicom")
    overrides = [*TINY, *TINY_UNET, f"data.root={tiny_dataset}", "++data.synthesize=null", f"data.cache_dir={tmp}"]
    train(compose_cfg([*overrides, "trainer.max_epochs=1"], tmp / "run"))
    return tmp / "run"


def _affine(kind: str) -> np.ndarray:
    affine = np.eye(4)
    if kind == "oblique":  # rotated about three axes, anisotropic voxels
        rotation = Rotation.from_euler("xyz", [20, -10, 35], degrees=True).as_matrix()
        affine[:3, :3] = rotation @ np.diag([1.1, 0.9, 1.4])
    else:  # stored in LPS order (x and y flipped against RAS), as DICOM scanners write it
        affine[:3, :3] = np.diag([-1.0, -1.0, 1.2])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    return affine


def _predict(run_dir: Path, input: Path, output: Path, *overrides: str) -> list[Path]:
    cfg = [f"ckpt_path={run_dir}", f"input={input}", f"output={output}", "device=cpu", "dtype=fp32", *overrides]
    return predict(compose_cfg([*cfg, "progress=false", "num_workers=0"], output, "predict"))


@pytest.mark.parametrize("geometry", ["oblique", "lps"])
def test_dicom_series_predicts_the_mask_of_its_nifti_twin(geometry, run_dir, tmp_path):
    source = shared_dataset("Task04_Hippocampus") / "imagesTr" / "hippocampus_001.nii.gz"  # uint8: exact in DICOM
    series, twin = dicom_and_nifti_twins(source, _affine(geometry), tmp_path / "cases")
    (tmp_path / "nifti").mkdir()
    shutil.move(twin, tmp_path / "nifti" / "case.nii.gz")
    [from_dicom] = _predict(run_dir, tmp_path / "cases", tmp_path / "out_dicom")
    [from_nifti] = _predict(run_dir, tmp_path / "nifti", tmp_path / "out_nifti")
    assert from_dicom.name == "series.nii.gz"
    got, want = nib.load(from_dicom), nib.load(from_nifti)
    np.testing.assert_allclose(got.affine, want.affine, atol=1e-4)
    assert got.shape == want.shape == nib.load(source).shape
    mask = np.asarray(want.dataobj)
    assert len(np.unique(mask)) > 1  # not two empty masks agreeing by chance
    np.testing.assert_array_equal(np.asarray(got.dataobj), mask)


def _small_series(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    write_series(rng.integers(0, 100, (8, 7, 6)), _affine("oblique"), folder)
    return folder


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))  # slice_000 ... in space order


def _edit(path: Path, **values) -> None:
    dataset = pydicom.dcmread(path)
    for key, value in values.items():
        setattr(dataset, key, value)
    dataset.save_as(path)


def _missing(folder):
    _files(folder)[3].unlink()
    return ["slice_002.dcm", "slice_004.dcm"], "1 missing slice(s) between"


def _duplicate(folder):
    shutil.copy(_files(folder)[2], folder / "copy.dcm")
    return ["copy.dcm", "slice_002.dcm"], "duplicate slice"


def _mixed(folder):
    write_series(np.zeros((8, 7, 2), int), _affine("oblique"), folder / "other")
    for path in (folder / "other").iterdir():
        path.rename(folder / f"other_{path.name}")
    return ["other_slice_000.dcm"], "mixed with"


def _uneven(folder):
    path = _files(folder)[3]
    position = np.asarray(pydicom.dcmread(path).ImagePositionPatient, dtype=float)
    normal = np.cross(*np.reshape(pydicom.dcmread(path).ImageOrientationPatient, (2, 3)))
    _edit(path, ImagePositionPatient=[round(float(v), 6) for v in position + 0.4 * normal])
    return ["slice_003.dcm"], "uneven slice spacing"


def _non_image(folder):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = BasicTextSRStorage, generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    report = Dataset()
    report.file_meta = meta
    report.SOPClassUID, report.SOPInstanceUID = BasicTextSRStorage, meta.MediaStorageSOPInstanceUID
    report.SeriesInstanceUID = pydicom.dcmread(_files(folder)[0]).SeriesInstanceUID
    report.save_as(folder / "report.dcm", enforce_file_format=True)
    return ["report.dcm"], "Basic Text SR Storage, not an image slice"


def _compressed(folder):
    path = _files(folder)[1]
    syntax = pydicom.uid.JPEGLosslessSV1  # common in archives; pylibjpeg-libjpeg or GDCM decode it
    if pydicom.pixels.get_decoder(syntax).is_available:
        pytest.skip(f"a decoder for {syntax.name} is installed")
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.PixelData = encapsulate([dataset.PixelData])  # the header is what is checked, not the codestream
    dataset.save_as(path)
    return [path.name], f"compressed as {syntax.name}, and no installed decoder reads it"


def _order(folder):
    first, second = _files(folder)[1], _files(folder)[2]
    _edit(first, InstanceNumber=3)
    _edit(second, InstanceNumber=2)
    return ["slice_00"], "does not follow the slices' order in space"


FAULTS = [_missing, _duplicate, _mixed, _uneven, _non_image, _compressed, _order]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_series_is_named_in_one_line(fault, tmp_path):
    folder = _small_series(tmp_path / "series")
    assert check_series(folder) is None
    names, words = fault(folder)
    error = check_series(folder)
    assert error is not None and "\n" not in error and words in error, error
    assert error.startswith(f"{folder}/") and all(name in error for name in names), error


def test_predict_lists_a_bad_series_and_predicts_the_others(run_dir, tmp_path):
    _small_series(tmp_path / "in" / "good")
    _missing(_small_series(tmp_path / "in" / "bad"))
    with pytest.raises(CasesFailed) as failed:
        _predict(run_dir, tmp_path / "in", tmp_path / "out")
    assert [p.name for p in failed.value.written] == ["good.nii.gz"]
    [line] = failed.value.failures
    assert line.startswith(str(tmp_path / "in" / "bad")) and "missing slice" in line


def test_dicom_seg_reads_back_onto_the_nifti_mask(run_dir, tmp_path):
    """output_format=both: the SEG references the series, names one segment per class, and its frames, read back
    by highdicom per source slice, are the NIfTI mask's voxels."""
    import highdicom as hd

    source = shared_dataset("Task04_Hippocampus") / "imagesTr" / "hippocampus_001.nii.gz"
    series, _ = dicom_and_nifti_twins(source, _affine("oblique"), tmp_path / "cases")
    (tmp_path / "cases" / "twin.nii.gz").unlink()
    written = _predict(run_dir, tmp_path / "cases", tmp_path / "out", "output_format=both")
    assert [p.name for p in written] == ["series.nii.gz", "series.seg.dcm"]
    mask = np.asarray(nib.load(written[0]).dataobj)
    assert len(np.unique(mask)) == 3  # both classes present: each segment is checked
    seg = hd.seg.segread(written[1])
    assert [s.segment_label for s in seg.SegmentSequence] == ["organ", "tumour"]
    slices = sorted((pydicom.dcmread(p) for p in series.glob("*.dcm")), key=lambda ds: int(ds.InstanceNumber))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == slices[0].SeriesInstanceUID
    frames = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in slices], combine_segments=True)
    np.testing.assert_array_equal(frames.transpose(2, 1, 0), mask)


def test_dicom_seg_of_a_nifti_input_is_refused_before_predicting(run_dir, tmp_path):
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), tmp_path / "in" / "a.nii.gz")
    with pytest.raises(ValueError, match=r"output_format=dicom_seg: .*a.nii.gz is not a DICOM series"):
        _predict(run_dir, tmp_path / "in", tmp_path / "out", "output_format=dicom_seg")
    assert not (tmp_path / "out").exists()

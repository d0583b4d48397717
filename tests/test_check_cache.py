"""Dataset checks done once per folder and in worker processes (issue 22, part 4)."""

import gzip
import os

from medseg.data.integrity import check_dataset
from medseg.data.integrity_cache import PARALLEL_FROM, cache_file, checked_cases
from medseg.data.synthetic import write_ct_dataset


def test_unchanged_cases_are_not_checked_again(tmp_path):
    root = write_ct_dataset(tmp_path / "Task_ct", num_cases=6, num_classes=5, shape=(16, 16, 12))
    cases = [(f"./imagesTr/ct_{i:04d}.nii.gz", f"./labelsTr/ct_{i:04d}.nii.gz") for i in range(6)]
    seen = []

    def check(case):
        seen.append(case)
        return [[case[0], f"problem {len(seen)}"]], []

    first = checked_cases(root, cases, check, {"a": 1}, tmp_path / "cache")
    assert len(seen) == 6 and cache_file(tmp_path / "cache", root).is_file()
    again = checked_cases(root, cases, check, {"a": 1}, tmp_path / "cache")
    assert len(seen) == 6 and again == first  # nothing read: the stored problems come back
    label = root / cases[2][1]
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))  # touched: checked again
    checked_cases(root, cases, check, {"a": 1}, tmp_path / "cache")
    assert seen[6:] == [cases[2]]
    checked_cases(root, cases, check, {"a": 2}, tmp_path / "cache")  # other settings: everything again
    assert len(seen) == 13
    checked_cases(root, cases, check, {"a": 2}, None)  # no cache folder: everything, every time
    assert len(seen) == 19


def test_workers_and_cache_report_what_a_plain_check_reports(tmp_path):
    root = write_ct_dataset(tmp_path / "Task_ct", num_cases=PARALLEL_FROM, num_classes=5, shape=(16, 16, 12))
    broken = root / "labelsTr" / "ct_0003.nii.gz"
    broken.write_bytes(gzip.compress(gzip.decompress(broken.read_bytes())[:400]))  # header kept, voxels cut
    plain = check_dataset(root)
    assert [p.file for p in plain.errors] == ["./labelsTr/ct_0003.nii.gz"], plain.errors
    pooled = check_dataset(root, cache_dir=tmp_path / "cache", workers=2)
    cached = check_dataset(root, cache_dir=tmp_path / "cache", workers=2)
    assert pooled.errors == plain.errors == cached.errors and pooled.warnings == plain.warnings == cached.warnings


def test_headers_are_read_once_per_folder(tmp_path, monkeypatch):
    """The data module's header geometry (spacing, shape per case) comes from the cache on a second start; a
    rewritten image is read again, and its new geometry is what comes back."""
    import nibabel as nib
    import numpy as np

    from medseg.data import datamodule

    root = write_ct_dataset(tmp_path / "Task_ct", num_cases=4, num_classes=3, shape=(20, 18, 16))
    images = [root / "imagesTr" / f"ct_{i:04d}.nii.gz" for i in range(4)]
    cache = tmp_path / "headers.json"
    first = datamodule.header_geometry(images, cache)
    np.testing.assert_array_equal(first[1], [[20, 18, 16]] * 4)
    read = []
    real_load = nib.load
    monkeypatch.setattr(datamodule.nib, "load", lambda path: read.append(path) or real_load(path))
    again = datamodule.header_geometry(images, cache)
    assert read == [] and all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    img = real_load(images[1])
    nib.save(nib.Nifti1Image(np.zeros((20, 18, 9), np.int16), img.affine), images[1])  # another shape
    zooms, shapes = datamodule.header_geometry(images, cache)
    assert read == [str(images[1])] and shapes[1].tolist() == [20, 18, 9] and np.array_equal(zooms, first[0])
    assert datamodule.header_geometry(images)[1][1].tolist() == [20, 18, 9]  # no cache: every header read


def test_a_damaged_header_cache_is_read_again_not_trusted(tmp_path):
    from medseg.data import datamodule

    root = write_ct_dataset(tmp_path / "Task_ct", num_cases=2, num_classes=3, shape=(20, 18, 16))
    images = [root / "imagesTr" / f"ct_{i:04d}.nii.gz" for i in range(2)]
    cache = tmp_path / "headers.json"
    cache.write_text('{"files": {"' + str(images[0]) + '": [[1, 2], [[9, 9, 9], [1, 1, 1]]]}')  # stale and cut
    zooms, shapes = datamodule.header_geometry(images, cache)
    assert shapes.tolist() == [[20, 18, 16]] * 2 and zooms.min() > 0

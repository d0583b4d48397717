"""Writing a NIfTI volume as a DICOM series (one MR slice per file), for tests of DICOM input and DICOM SEG."""

from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import MRImageStorage, generate_uid
from pydicom.valuerep import DSfloat, format_number_as_ds

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def decimal_strings(values) -> list[DSfloat]:
    """Numbers as DICOM decimal strings (at most 16 characters), valued as a reader parses them."""
    return [DSfloat(format_number_as_ds(float(v))) for v in values]


def write_series(image: np.ndarray, affine: np.ndarray, folder: Path, series_uid: str | None = None) -> np.ndarray:
    """`image` (X, Y, Z) integer voxels with NIfTI `affine` (RAS) as files folder/slice_<k>.dcm, one per Z plane.

    Voxel (i, j, k) is slice k's pixel at column i, row j: each row runs along the affine's first axis (its LPS
    direction is ImageOrientationPatient[:3]), each column along its second; PixelSpacing is [row spacing (j),
    column spacing (i)]; ImagePositionPatient is voxel (0, 0, k) in LPS. Files are written in reverse slice order,
    so a reader must sort them. Returns the RAS affine the headers encode (`affine` to 16 significant characters).
    """
    folder.mkdir(parents=True, exist_ok=True)
    lps = RAS_TO_LPS @ affine[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    study, frame = generate_uid(), generate_uid()
    series = series_uid or generate_uid()
    orientation = decimal_strings((*lps[:, 0] / spacing[0], *lps[:, 1] / spacing[1]))
    positions = [decimal_strings(lps @ [0.0, 0.0, k, 1.0]) for k in range(image.shape[2])]
    pixel_spacing = decimal_strings([spacing[1], spacing[0]])
    for k in reversed(range(image.shape[2])):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"  # explicit VR little endian
        dataset = Dataset()
        dataset.file_meta = meta
        dataset.SOPClassUID, dataset.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.FrameOfReferenceUID = study, series, frame
        dataset.PatientID, dataset.PatientName, dataset.PatientBirthDate, dataset.PatientSex = "t", "T^P", "", "O"
        dataset.StudyDate, dataset.StudyTime, dataset.StudyID = "20260101", "120000", "1"
        dataset.AccessionNumber, dataset.ReferringPhysicianName = "", ""
        dataset.Modality, dataset.SeriesNumber, dataset.InstanceNumber, dataset.Manufacturer = "MR", 1, k + 1, "medseg"
        dataset.ImagePositionPatient, dataset.ImageOrientationPatient = positions[k], orientation
        dataset.PixelSpacing = pixel_spacing
        dataset.SliceThickness = dataset.SpacingBetweenSlices = decimal_strings([spacing[2]])[0]
        pixels = np.ascontiguousarray(image[:, :, k].T.astype(np.int16))  # (rows = Y, columns = X)
        dataset.Rows, dataset.Columns = pixels.shape
        dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1
        dataset.PixelData = pixels.tobytes()
        dataset.save_as(folder / f"slice_{k:03d}.dcm", enforce_file_format=True)
    encoded = np.eye(4)
    encoded[:3, 0] = np.asarray(orientation[:3], dtype=float) * float(pixel_spacing[1])
    encoded[:3, 1] = np.asarray(orientation[3:], dtype=float) * float(pixel_spacing[0])
    first, last = np.asarray(positions[0], dtype=float), np.asarray(positions[-1], dtype=float)
    encoded[:3, 2] = (last - first) / (image.shape[2] - 1)  # as MONAI's PydicomReader derives it
    encoded[:3, 3] = first
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ encoded


def dicom_and_nifti_twins(source: Path, affine: np.ndarray, folder: Path) -> tuple[Path, Path]:
    """`source`'s integer voxels placed by `affine` as a DICOM series (folder/series/) and as NIfTI
    (folder/twin.nii.gz) with the affine the DICOM headers encode: two files of one image. NIfTI-2, whose float64
    affine holds that affine exactly (NIfTI-1's float32 moves an oblique grid by ~1e-8 mm, enough to shift the
    resampled grid's crop by a voxel)."""
    voxels = np.asarray(nib.load(source).dataobj).astype(np.int16)
    encoded = write_series(voxels, affine, folder / "series")
    nib.save(nib.Nifti2Image(voxels, encoded), folder / "twin.nii.gz")
    return folder / "series", folder / "twin.nii.gz"

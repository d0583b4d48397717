"""A predicted mask as DICOM SEG (highdicom): one segment per foreground class, named from dataset.json's labels,
referencing the source series, frame k on source slice k, so viewers (OHIF, 3D Slicer) overlay it on the series."""

from importlib.metadata import version
from pathlib import Path

import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from medseg.inference.dicom import dicom_files
from medseg.reliability.atomic_io import write_atomic


def stacked_sources(series: Path) -> list[pydicom.Dataset]:
    """The series' slices (headers only) in the order MONAI's PydicomReader stacks them: by InstanceNumber."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in dicom_files(series)]
    return sorted(headers, key=lambda ds: int(ds.InstanceNumber))


def write_seg(mask: np.ndarray, series: Path, label_names: list[str], path: Path) -> Path:
    """`mask` (X, Y, Z) uint8 class indices on the series' own grid (voxel (i, j, k): column i, row j of the k-th
    slice stacked, as `medseg.predict` writes it for a series) as a DICOM SEG file at `path`, atomically."""
    import highdicom as hd  # the `dicom` extra; only DICOM SEG output needs it

    sources = stacked_sources(series)
    medseg_version = version("medseg")
    frames = np.ascontiguousarray(mask.transpose(2, 1, 0))  # (slices, rows, columns), frame k on sources[k]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medseg", version=medseg_version, family=codes.cid7162.ArtificialIntelligence
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, name in enumerate(label_names[1:], start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,  # a label map: value n is segment n
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=int(sources[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medseg",
        manufacturer_model_name="medseg",
        software_versions=medseg_version,
        device_serial_number="0",
        omit_empty_frames=False,
    )
    return write_atomic(path, lambda tmp: seg.save_as(tmp))

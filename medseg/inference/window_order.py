"""The order in which `medseg.inference.slab_stitching` visits sliding windows, and where it cuts the volume into
tiles: what sets the memory the stitching holds and how fast a window's logits are added."""

from collections.abc import Sequence

# The spatial axis whose voxels lie next to each other in memory in (B, C, X, Y, Z) tensors: Z.
CONTIGUOUS_AXIS = 2


def tile_axes(shape: Sequence[int]) -> tuple[int, ...]:
    """The spatial axes (0, 1, 2) in the order windows are visited: longest first (the slab axis), the first of
    equals first."""
    return tuple(sorted(range(len(shape)), key=lambda a: (-shape[a], a)))


def slab_axis(shape: Sequence[int]) -> int:
    """The spatial axis (0, 1, 2) the slabs are cut along: the longest (the first of equals)."""
    return tile_axes(shape)[0]


def visit_rows(starts: Sequence[int], interval: int) -> dict[int, int]:
    """Window start along one axis -> its row in the visiting order: starts in the order of the axis, a new row
    wherever a start lies a full scan `interval` past the one before. MONAI moves the window at the image's edge back
    to end there, closer than `interval` to its neighbour; that window shares its neighbour's row, so the two are
    run one after the other, not a row apart (at 667 planes the last two rows start 27 planes apart and overlap in
    101 of 128 planes: run a row apart, those 101 planes' sums of the whole plane were held at once)."""
    rows, row, before = {}, -1, None
    for s in sorted(set(starts)):
        row += before is None or s - before >= interval
        rows[s], before = row, s
    return rows


def cut_axis(axis: int, axes: Sequence[int]) -> bool:
    """Whether tiles are cut along spatial `axis`: all but the last (Z), unless Z is the longest (`axes[0]`). Z's
    voxels lie next to each other in memory; a window's logits added to tiles cut along Z are read in short pieces
    of rows, at several times the time of whole rows (a 118-class 128^3 BF16 window: 0.36 s into 8 tiles, 0.08 s
    into one; benchmarks/RESULTS.md, "Whole-body scale")."""
    return axis != CONTIGUOUS_AXIS or axis == axes[0]


def window_order(window: Sequence[int], axes: Sequence[int], rows: Sequence[dict[int, int]]) -> tuple[int, ...]:
    """The sort key of a window's start: by row along `axes[0]` (the longest), then along `axes[1]`, then by start
    along the axes from the shortest back, so windows that share a row run one after the other."""
    return (rows[0][window[axes[0]]], rows[1][window[axes[1]]], *(window[a] for a in reversed(axes)))

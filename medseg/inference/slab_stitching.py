"""Sliding-window prediction stitched tile by tile: memory that does not grow with the scan's length.

`medseg.models.sliding_window.sliding_window_probs` (MONAI's `sliding_window_inference`) holds the C class channels of
the whole volume, once more per flip: 118 classes on 273 x 273 x 667 voxels (a 512 x 512 x 1000 CT at 1.5 mm) are
11.7 GB in BF16. Here the windows of every pass (one net, one flip) are visited in rows: by their start along the
longest axis, then the next longest, then the shortest (`window_order`). The volume is cut into tiles wherever a
window starts or ends, along every axis but Z unless Z is the longest (`cut_axis`). A tile is finished as soon as
the last window that touches it has run, and leaves (softmax, flips and models averaged, then argmax, and the
probabilities only when asked for) before the next window runs. Each pass sums its windows into chunks, one per
tile, made when a window first reaches them and dropped when their tile leaves. What is held at once is about one
window-overlap of planes along the longest axis (the planes the rows before and after both reach) plus the part of
the next planes the current row has reached, whatever the scan's length (benchmarks/RESULTS.md, "Whole-body scale").

MONAI's own `buffer_steps`/`buffer_dim` option buffers slabs on the window device but still writes into a
whole-volume output and count map on `device` (monai/inferers/utils.py, MONAI 1.6): it bounds GPU memory, not the
total, so it is not used.

The arithmetic is `sliding_window_probs`'s: MONAI's window grid (`dense_patch_slices`, its scan interval), its
gaussian weights (`compute_importance_map`) and padding, sums in the image's dtype (or `sum_dtype`), each flip's
windows laid on the flipped image; per tile, logits / weights -> softmax per pass -> mean over flips -> mean over
models, in that order. Only the order in which overlapping windows are added differs (MONAI adds them in order of
their first axis): probabilities differ by rounding, and masks only where two classes tie to rounding. BF16 sums
round at 2^-8; FP16 sums (nnU-Net keeps its sums in FP16) at 2^-11 in the same memory, so with BF16 windows they
tie far less often (benchmarks/RESULTS.md, "Whole-body scale").
"""

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers.utils import _get_scan_interval  # the grid sliding_window_inference uses, not a copy of it
from monai.utils import ensure_tuple_rep, fall_back_tuple

from medseg.inference.stitch_device import release_freed_memory
from medseg.inference.window_order import CONTIGUOUS_AXIS, cut_axis, slab_axis, tile_axes, visit_rows, window_order
from medseg.models.sliding_window import mirror_flips, softmax_

Net = Callable[[torch.Tensor], torch.Tensor]
Block = tuple[int, ...]  # a tile: its block index along each axis of `tile_axes`


def live_shape(
    shape: Sequence[int], rois: Sequence[Sequence[int]], mirror_axes: Sequence[Sequence[int]]
) -> tuple[int, ...]:
    """A bound on the voxels of the sums `SlabStitcher` holds at once for an image of spatial `shape`, as a shape:
    along the slab axis, one window's depth per pass (net and flip)."""
    axis = slab_axis(shape)
    passes = [(len(mirror_flips(axes)), roi[axis]) for roi, axes in zip(rois, mirror_axes, strict=True)]
    planes = sum(n * min(int(shape[axis]), int(r)) for n, r in passes)
    return tuple(planes if a == axis else int(s) for a, s in enumerate(shape))


def in_dtype(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`out` in `dtype`; from one 16-bit dtype to the other in its own memory (each element read, then written in
    its place): a new tensor the size of a 118-class window's logits cost more in page faults than the conversion
    itself (0.32 s against 0.13 s at 118 x 128^3; benchmarks/RESULTS.md, "Whole-body scale")."""
    if out.dtype == dtype:
        return out
    dense = out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last_3d)
    if dense and out.element_size() == torch.empty((), dtype=dtype).element_size():
        return out.view(dtype).copy_(out)
    return out.to(dtype)


def label_dtype(num_classes: int) -> torch.dtype:
    """uint8 class indices up to 256 classes, int16 beyond."""
    return torch.uint8 if num_classes <= 256 else torch.int16


@dataclass
class Tile:
    """Finished voxels: the box [lo, hi) (spatial, per axis) and its `probs` (1, C, *box)."""

    lo: tuple[int, ...]
    hi: tuple[int, ...]
    probs: torch.Tensor

    def region(self) -> tuple[slice, ...]:
        """Where the tile lies in a (B, C, X, Y, Z) tensor of the whole volume."""
        return (slice(None), slice(None), *(slice(a, b) for a, b in zip(self.lo, self.hi, strict=True)))


class _Pass:
    """One sliding-window pass (one net, one flip) in the original image's coordinates, padded as MONAI pads it,
    summing its windows into one chunk per tile.

    Args:
        axes: the spatial axes in the order windows are visited (`tile_axes`); `cuts` (set by `set_cuts`): per axis
            of `axes` the blocks' ends (original coordinates), the last the image's size. A tile is a tuple of
            block indices, one per axis of `axes`.
    """

    def __init__(self, net: Net, image: torch.Tensor, roi: Sequence[int], dims: tuple[int, ...], overlap: float,
                 mode: str, axes: tuple[int, ...], sw_device: torch.device, device: torch.device,
                 sum_dtype: torch.dtype) -> None:  # fmt: skip
        self.net, self.dims, self.axes, self.sw_device, self.device = net, dims, axes, sw_device, device
        self.sum_dtype = sum_dtype
        self.spatial = tuple(image.shape[2:])
        self.roi = roi = tuple(fall_back_tuple(roi, self.spatial))
        # MONAI pads the (flipped) image symmetrically, the odd voxel after; after a flip "after" is "before" here
        diff = [max(r - s, 0) for r, s in zip(roi, self.spatial, strict=True)]
        flipped = {d - 2 for d in dims}
        self.pad = [(d - d // 2, d // 2) if a in flipped else (d // 2, d - d // 2) for a, d in enumerate(diff)]
        if any(diff):
            image = F.pad(image, [p for lo_hi in reversed(self.pad) for p in lo_hi], mode="constant", value=0.0)
        self.image = image
        padded = tuple(image.shape[2:])
        interval = _get_scan_interval(padded, roi, len(padded), ensure_tuple_rep(overlap, len(padded)))
        starts = [tuple(int(lo) for lo, _ in w) for w in dense_patch_slices(padded, roi, interval, return_slice=False)]
        # a window at g on the flipped image covers padded - g - roi .. padded - g here
        starts = [tuple(padded[a] - s - roi[a] if a in flipped else s for a, s in enumerate(w)) for w in starts]
        self.rows = rows = [visit_rows([w[a] for w in starts], interval[a]) for a in axes]
        starts.sort(key=lambda w: window_order(w, axes, rows))  # stable: ties keep MONAI's order
        self.windows: list[tuple[int, ...]] = starts
        weight = compute_importance_map(roi, mode=mode, device=sw_device, dtype=sum_dtype)[None, None]
        self.weight = weight.flip(dims) if dims else weight
        self.done = 0  # windows run so far
        self.cuts: list[list[int]] = []
        self.touched: list[list[Block]] = []
        self.needed: dict[Block, int] = {}  # tile -> windows to run before it is finished
        self.chunks: dict[Block, tuple[torch.Tensor, torch.Tensor]] = {}  # tile -> (sums, weights)

    def edges(self, k: int) -> set[int]:
        """Where windows start and end along `axes[k]`, in original coordinates; along Z (`cut_axis`) only where
        they end or a row of windows (`visit_rows`) starts, so the window moved back to the image's edge adds no
        short block inside its row."""
        a = self.axes[k]
        starts = {w[a] for w in self.windows}
        ends = {s + self.roi[a] for s in starts}
        if a == CONTIGUOUS_AXIS:
            starts = {min(s for s in starts if self.rows[k][s] == row) for row in set(self.rows[k].values())}
        return {edge - self.pad[a][0] for edge in starts | ends}

    def set_cuts(self, cuts: list[list[int]]) -> None:
        self.cuts = cuts
        self.touched = [self._tiles(window) for window in self.windows]  # per window, the tiles it reaches
        for n, tiles in enumerate(self.touched):
            for tile in tiles:
                self.needed[tile] = n + 1

    def block_range(self, k: int, index: int) -> tuple[int, int]:
        """Block `index`'s planes along `axes[k]` in padded coordinates; the first and last also take the
        padding planes."""
        a, cuts = self.axes[k], self.cuts[k]
        lo = self.pad[a][0]
        start = cuts[index - 1] + lo if index else 0
        stop = cuts[index] + lo if index < len(cuts) - 1 else self.image.shape[2 + a]
        return start, stop

    def _blocks(self, k: int, begin: int, end: int) -> range:
        """The blocks along `axes[k]` that padded planes [begin, end) reach."""
        n = len(self.cuts[k])
        first = next(i for i in range(n) if self.block_range(k, i)[1] > begin)
        stop = first
        while stop < n and self.block_range(k, stop)[0] < end:
            stop += 1
        return range(first, stop)

    def _tiles(self, window: tuple[int, ...]) -> list[Block]:
        blocks = [self._blocks(k, window[a], window[a] + self.roi[a]) for k, a in enumerate(self.axes)]
        return list(itertools.product(*blocks))

    def run_for(self, tile: Block, batch_size: int) -> None:
        """Run the windows (in order, `batch_size` at a time: the batch that holds the last window reaching `tile`
        runs whole) up to the last that reaches `tile`, and add them to the chunks."""
        need = self.needed.get(tile, 0)
        while self.done < need:
            first = self.done
            self.done = min(len(self.windows), first + batch_size)
            self._run(first, self.done)

    def _run(self, first: int, stop: int) -> None:
        """Windows [first, stop) through the net, added to the chunks. A method of its own so that their logits
        (C x roi voxels: 472 MiB at 118 classes and 128^3 in BF16) are gone before the next batch's forward."""
        batch = self.windows[first:stop]
        regions = [tuple(slice(s, s + r) for s, r in zip(w, self.roi, strict=True)) for w in batch]
        x = torch.cat([self.image[(slice(None), slice(None), *region)] for region in regions]).to(self.sw_device)
        x = x.flip(self.dims) if self.dims else x
        if self.device.type == "cpu":
            release_freed_memory()  # before the forward, where prediction peaks
        out = in_dtype(self.net(x), self.sum_dtype)
        out *= self.weight
        out = (out.flip(self.dims) if self.dims else out).to(self.device)
        weight = self.weight.to(self.device)
        for n, (window, o) in enumerate(zip(batch, out, strict=True)):
            for tile in self.touched[first + n]:
                self._add(tile, window, o[None], weight)

    def _add(self, tile: Block, window: tuple[int, ...], out: torch.Tensor, weight: torch.Tensor) -> None:
        """Add the part of one weighted window (1, C, *roi) and its weights (1, 1, *roi) that lies in `tile`."""
        ranges = [self.block_range(k, i) for k, i in enumerate(tile)]
        if tile not in self.chunks:
            shape = list(self.image.shape[2:])
            for a, (lo, hi) in zip(self.axes, ranges, strict=True):
                shape[a] = hi - lo
            self.chunks[tile] = (
                torch.zeros(1, out.shape[1], *shape, dtype=out.dtype, device=self.device),
                torch.zeros(1, 1, *shape, dtype=out.dtype, device=self.device),
            )
        sums, weights = self.chunks[tile]
        target = [slice(None), slice(None), *(slice(s, s + r) for s, r in zip(window, self.roi, strict=True))]
        source = [slice(None)] * 5
        for a, (lo, hi) in zip(self.axes, ranges, strict=True):
            begin = window[a]
            first, last = max(begin, lo), min(begin + self.roi[a], hi)
            target[2 + a], source[2 + a] = slice(first - lo, last - lo), slice(first - begin, last - begin)
        sums[tuple(target)] += out[tuple(source)]
        weights[tuple(target)] += weight[tuple(source)]

    def finish(self, tile: Block) -> torch.Tensor:
        """The tile's logits (1, C, ...) in original coordinates (sums / weights, padding cropped); the chunk
        leaves the pass, the returned tensor is the caller's."""
        sums, weights = self.chunks.pop(tile)
        sums /= weights  # as MONAI normalises: in the sums' dtype, padding cropped after
        # aminmax: one pass, no temporaries (isfinite().all() took 50x longer on FP16 here); NaN and inf show in it
        if sums.dtype == torch.float16 and not all(math.isfinite(v) for v in torch.aminmax(sums)):
            raise FloatingPointError(
                "the float16 sums of the windows' logits overflowed (beyond 65504): predict with sum_dtype=fp32 "
                "(or bf16)"
            )
        crop = [slice(None)] * 5
        for k, a in enumerate(self.axes):
            (lo, hi), before = self.block_range(k, tile[k]), self.pad[a][0]
            crop[2 + a] = slice(max(lo, before) - lo, min(hi, before + self.spatial[a]) - lo)
        return sums[tuple(crop)]


class SlabStitcher:
    """Gaussian-blended sliding windows of one or several nets (an ensemble, their softmax averaged), each with
    test-time flips (softmax averaged over the image and its flips along every subset of its `mirror_axes`),
    stitched tile by tile (see the module's docstring).

    Args:
        nets: callables mapping windows (N, C_in, *roi) to logits (N, C, *roi), in `dtype` (see
            `medseg.precision.convert.convert_net`).
        rois: one window size per net.
        mirror_axes: per net, the spatial axes (0, 1, 2) whose flips are averaged.
        dtype: windows, sums and probabilities (None: the image's dtype; probabilities float32), as
            `sliding_window_probs` has them.
        sum_dtype: the windows' weighted logits are summed, and the probabilities kept, in this dtype instead
            (None: as `dtype` says). float16 sums raise FloatingPointError where a sum overflows.
        sw_device: where windows go through the nets (None: the image's device).
        device: where the sums and the results live (None: the image's device).
    """

    def __init__(
        self,
        nets: Sequence[Net],
        rois: Sequence[Sequence[int]],
        mirror_axes: Sequence[Sequence[int]],
        sw_batch_size: int = 4,
        overlap: float = 0.5,
        mode: str = "gaussian",
        dtype: torch.dtype | None = None,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        sum_dtype: torch.dtype | None = None,
    ) -> None:
        if not (len(nets) == len(rois) == len(mirror_axes)) or not nets:
            raise ValueError(f"one roi and one mirror_axes per net: {len(nets)} nets, {len(rois)} rois, "
                             f"{len(mirror_axes)} mirror_axes")  # fmt: skip
        self.nets, self.rois = list(nets), [tuple(r) for r in rois]
        self.flips = [mirror_flips(axes) for axes in mirror_axes]
        self.sw_batch_size, self.overlap, self.mode, self.dtype = sw_batch_size, overlap, mode, dtype
        self.sw_device, self.device, self.sum_dtype = sw_device, device, sum_dtype
        self._passes: list[list[_Pass]] = []  # the passes of the image being stitched

    def held(self) -> int:
        """Elements of the sums held now, over all passes (what the stitching's memory grows with)."""
        return sum(t.numel() for model in self._passes for p in model for c in p.chunks.values() for t in c)

    @torch.no_grad()
    def tiles(self, image: torch.Tensor) -> Iterator[Tile]:
        """The finished tiles of an image (1, C_in, X, Y, Z), each as soon as the windows that reach it have run
        (roughly in order along the longest axis, `tile_axes`); each `Tile.probs` (1, C, ...) is the ensemble-mean
        probability in `sum_dtype`, else `dtype` (float32 when both are None)."""
        image = image.as_tensor() if hasattr(image, "as_tensor") else image
        if image.shape[0] != 1:
            raise ValueError(f"one image at a time, got a batch of {image.shape[0]}")
        if self.dtype is not None:
            image = image.to(self.dtype)
        out_dtype = self.sum_dtype or self.dtype or torch.float32
        sum_dtype = self.sum_dtype or image.dtype
        spatial = tuple(image.shape[2:])
        axes = tile_axes(spatial)
        sw_device = torch.device(self.sw_device or image.device)
        device = torch.device(self.device or image.device)
        self._passes = passes = [
            [
                _Pass(net, image, roi, dims, self.overlap, self.mode, axes, sw_device, device, sum_dtype)
                for dims in flips
            ]
            for net, roi, flips in zip(self.nets, self.rois, self.flips, strict=True)
        ]
        # cut where any window starts (a tile is finished as soon as the windows reaching it have run) or ends (so
        # no chunk reaches past the windows run so far)
        cuts = []
        for k, a in enumerate(axes):
            edges = set().union(*(p.edges(k) for model in passes for p in model)) if cut_axis(a, axes) else set()
            cuts.append(sorted(s for s in edges if 0 < s < spatial[a]) + [spatial[a]])
        for model in passes:
            for p in model:
                p.set_cuts(cuts)

        def last_window(tile: Block) -> tuple:  # how far through its windows the slowest pass must be
            return max(p.needed[tile] / len(p.windows) for model in passes for p in model), tile

        for tile in sorted(itertools.product(*(range(len(c)) for c in cuts)), key=last_window):
            total: torch.Tensor | None = None
            for model in passes:  # the order and dtypes of sliding_window_probs and Predictor.probs
                mean: torch.Tensor | None = None
                for p in model:
                    p.run_for(tile, self.sw_batch_size)
                    probs = softmax_(p.finish(tile)).to(out_dtype)
                    mean = probs if mean is None else mean.add_(probs)
                assert mean is not None
                mean = mean.div_(len(model)) if len(model) > 1 else mean
                total = mean if total is None else total.add_(mean)
            assert total is not None
            lo, hi = [0, 0, 0], list(spatial)
            for a, cut, n in zip(axes, cuts, tile, strict=True):
                lo[a], hi[a] = cut[n - 1] if n else 0, cut[n]
            yield Tile(tuple(lo), tuple(hi), total.div_(len(passes)) if len(passes) > 1 else total)
            del total, mean, probs  # before the next tile's chunks are made

    def labels_and_probs(
        self, image: torch.Tensor, keep_probs: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class indices (1, 1, X, Y, Z) (`label_dtype`) of the most probable class, on `device`; with
        `keep_probs` also the probabilities (1, C, X, Y, Z) (dtype as `tiles` says), gathered tile by tile."""
        labels, probs = None, None
        for tile in self.tiles(image):
            if labels is None:
                spatial = tuple(image.shape[2:])
                num_classes, where = tile.probs.shape[1], tile.probs.device
                labels = torch.empty((1, 1, *spatial), dtype=label_dtype(num_classes), device=where)
                if keep_probs:
                    probs = torch.empty((1, num_classes, *spatial), dtype=tile.probs.dtype, device=where)
            labels[tile.region()] = tile.probs.argmax(1, keepdim=True)
            if probs is not None:
                probs[tile.region()] = tile.probs
        assert labels is not None
        return labels, probs

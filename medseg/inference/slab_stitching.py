"""Sliding-window prediction stitched slab by slab along the longest axis: memory that does not grow with the
scan's length.

`medseg.models.sliding_window.sliding_window_probs` (MONAI's `sliding_window_inference`) holds the C class channels of
the whole volume, once more per flip: 118 classes on 273 x 273 x 667 voxels (a 512 x 512 x 1000 CT at 1.5 mm) are
11.7 GB in BF16. Here the windows of every pass (one net, one flip) are visited in the order of their start along
the longest axis. The axis is cut wherever a window starts or ends; a slab between two cuts is finished when no
remaining window touches it, and leaves (softmax, flips and models averaged, then argmax, and the probabilities only
when asked for) before the windows of the next slab run. Each pass sums its windows into chunks, one per slab, made when
a window first reaches them and dropped when their slab leaves: at most one window's depth of planes of
(C + 1) channels per pass, whatever the scan's length.

MONAI's own `buffer_steps`/`buffer_dim` option buffers slabs on the window device but still writes into a
whole-volume output and count map on `device` (monai/inferers/utils.py, MONAI 1.6): it bounds GPU memory, not the
total, so it is not used.

The arithmetic is `sliding_window_probs`'s: MONAI's window grid (`dense_patch_slices`, its scan interval), its
gaussian weights (`compute_importance_map`) and padding, sums in the image's dtype, each flip's windows laid on the
flipped image; per slab, logits / weights -> softmax per pass -> mean over flips -> mean over models, in that order.
Only the order in which overlapping windows are added differs (MONAI adds them in order of their first axis):
probabilities differ by rounding, and masks only where two classes tie to rounding.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers.utils import _get_scan_interval  # the grid sliding_window_inference uses, not a copy of it
from monai.utils import ensure_tuple_rep, fall_back_tuple

from medseg.models.sliding_window import mirror_flips, softmax_

Net = Callable[[torch.Tensor], torch.Tensor]


def slab_axis(shape: Sequence[int]) -> int:
    """The spatial axis (0, 1, 2) the slabs are cut along: the longest (the first of equals)."""
    return max(range(len(shape)), key=lambda a: (shape[a], -a))


def live_shape(
    shape: Sequence[int], rois: Sequence[Sequence[int]], mirror_axes: Sequence[Sequence[int]]
) -> tuple[int, ...]:
    """A bound on the voxels of the sums `SlabStitcher` holds at once for an image of spatial `shape`, as a shape:
    along the slab axis, one window's depth per pass (net and flip)."""
    axis = slab_axis(shape)
    passes = [(len(mirror_flips(axes)), roi[axis]) for roi, axes in zip(rois, mirror_axes, strict=True)]
    planes = sum(n * min(int(shape[axis]), int(r)) for n, r in passes)
    return tuple(planes if a == axis else int(s) for a, s in enumerate(shape))


def label_dtype(num_classes: int) -> torch.dtype:
    """uint8 class indices up to 256 classes, int16 beyond."""
    return torch.uint8 if num_classes <= 256 else torch.int16


@dataclass
class Slab:
    """Finished planes [start, stop) along spatial `axis`: `probs` (1, C, X, Y, Z) with that axis cut to them."""

    axis: int
    start: int
    stop: int
    probs: torch.Tensor

    def region(self) -> tuple[slice, ...]:
        """Where the slab lies in a (B, C, X, Y, Z) tensor of the whole volume."""
        index = [slice(None)] * 5
        index[2 + self.axis] = slice(self.start, self.stop)
        return tuple(index)


class _Pass:
    """One sliding-window pass (one net, one flip) in the original image's coordinates, padded as MONAI pads it,
    summing its windows into one chunk per slab.

    Args:
        axis: the slab axis; `cuts`: the slabs' ends along it (original coordinates), the last the image's size.
    """

    def __init__(self, net: Net, image: torch.Tensor, roi: Sequence[int], dims: tuple[int, ...], overlap: float,
                 mode: str, axis: int, sw_device: torch.device, device: torch.device) -> None:  # fmt: skip
        self.net, self.dims, self.axis, self.sw_device, self.device = net, dims, axis, sw_device, device
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
        starts.sort(key=lambda w: w[axis])  # stable: ties keep MONAI's order
        self.windows: list[tuple[int, ...]] = starts
        weight = compute_importance_map(roi, mode=mode, device=sw_device, dtype=image.dtype)[None, None]
        self.weight = weight.flip(dims) if dims else weight
        self.done = 0  # windows run so far
        self.cuts: list[int] = []
        self.chunks: dict[
            int, tuple[torch.Tensor, torch.Tensor]
        ] = {}  # slab -> (sums (1, C, ...), weights (1, 1, ...))

    def edges(self) -> set[int]:
        """Where windows start and end along the slab axis, in original coordinates."""
        starts = {w[self.axis] - self.pad[self.axis][0] for w in self.windows}
        return starts | {s + self.roi[self.axis] for s in starts}

    def chunk_range(self, index: int) -> tuple[int, int]:
        """Slab `index`'s planes in padded coordinates; the first and last also take the padding planes."""
        lo = self.pad[self.axis][0]
        start = self.cuts[index - 1] + lo if index else 0
        stop = self.cuts[index] + lo if index < len(self.cuts) - 1 else self.image.shape[2 + self.axis]
        return start, stop

    def run_until(self, stop: int, batch_size: int) -> None:
        """Run the windows starting before plane `stop` (original coordinates), `batch_size` at a time, and add
        them to the chunks."""
        limit = stop + self.pad[self.axis][0]
        weight = self.weight.to(self.device)
        while self.done < len(self.windows) and self.windows[self.done][self.axis] < limit:
            batch = []
            while (
                len(batch) < batch_size and self.done < len(self.windows) and self.windows[self.done][self.axis] < limit
            ):
                batch.append(self.windows[self.done])
                self.done += 1
            regions = [tuple(slice(s, s + r) for s, r in zip(w, self.roi, strict=True)) for w in batch]
            x = torch.cat([self.image[(slice(None), slice(None), *region)] for region in regions]).to(self.sw_device)
            x = x.flip(self.dims) if self.dims else x
            out = self.net(x).to(x.dtype)
            out *= self.weight
            out = (out.flip(self.dims) if self.dims else out).to(self.device)
            for window, o in zip(batch, out, strict=True):
                self._add(window, o[None], weight)

    def _add(self, window: tuple[int, ...], out: torch.Tensor, weight: torch.Tensor) -> None:
        """Add one weighted window (1, C, *roi) and its weights (1, 1, *roi) into the chunks it overlaps."""
        axis = self.axis
        begin, end = window[axis], window[axis] + self.roi[axis]
        index = min(i for i in range(len(self.cuts)) if self.chunk_range(i)[1] > begin)
        while index < len(self.cuts) and (lo_hi := self.chunk_range(index))[0] < end:
            lo, hi = lo_hi
            if index not in self.chunks:
                shape = list(self.image.shape[2:])
                shape[axis] = hi - lo
                self.chunks[index] = (
                    torch.zeros(1, out.shape[1], *shape, dtype=out.dtype, device=self.device),
                    torch.zeros(1, 1, *shape, dtype=out.dtype, device=self.device),
                )
            sums, weights = self.chunks[index]
            a, b = max(begin, lo), min(end, hi)
            target = [slice(None), slice(None), *(slice(s, s + r) for s, r in zip(window, self.roi, strict=True))]
            source = [slice(None)] * 5
            target[2 + axis], source[2 + axis] = slice(a - lo, b - lo), slice(a - begin, b - begin)
            sums[tuple(target)] += out[tuple(source)]
            weights[tuple(target)] += weight[tuple(source)]
            index += 1

    def finish(self, index: int) -> torch.Tensor:
        """Slab `index`'s logits (1, C, ...) in original coordinates (sums / weights, padding cropped); the chunk
        leaves the pass, the returned tensor is the caller's."""
        sums, weights = self.chunks.pop(index)
        sums /= weights  # as MONAI normalises: in the sums' dtype, padding cropped after
        lo, hi = self.chunk_range(index)
        crop = [slice(None), slice(None)]
        for a, (before, _) in enumerate(self.pad):
            if a == self.axis:
                crop.append(slice(max(lo, before) - lo, min(hi, before + self.spatial[a]) - lo))
            else:
                crop.append(slice(before, before + self.spatial[a]))
        return sums[tuple(crop)]


class SlabStitcher:
    """Gaussian-blended sliding windows of one or several nets (an ensemble, their softmax averaged), each with
    test-time flips (softmax averaged over the image and its flips along every subset of its `mirror_axes`),
    stitched slab by slab along the longest axis.

    Args:
        nets: callables mapping windows (N, C_in, *roi) to logits (N, C, *roi), in `dtype` (see
            `medseg.precision.convert.convert_net`).
        rois: one window size per net.
        mirror_axes: per net, the spatial axes (0, 1, 2) whose flips are averaged.
        dtype: windows, sums and probabilities (None: the image's dtype; probabilities float32), as
            `sliding_window_probs` has them.
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
    ) -> None:
        if not (len(nets) == len(rois) == len(mirror_axes)) or not nets:
            raise ValueError(f"one roi and one mirror_axes per net: {len(nets)} nets, {len(rois)} rois, "
                             f"{len(mirror_axes)} mirror_axes")  # fmt: skip
        self.nets, self.rois = list(nets), [tuple(r) for r in rois]
        self.flips = [mirror_flips(axes) for axes in mirror_axes]
        self.sw_batch_size, self.overlap, self.mode, self.dtype = sw_batch_size, overlap, mode, dtype
        self.sw_device, self.device = sw_device, device
        self._passes: list[list[_Pass]] = []  # the passes of the image being stitched

    def held(self) -> int:
        """Elements of the sums held now, over all passes (what the stitching's memory grows with)."""
        return sum(t.numel() for model in self._passes for p in model for c in p.chunks.values() for t in c)

    @torch.no_grad()
    def slabs(self, image: torch.Tensor) -> Iterator[Slab]:
        """The finished slabs of an image (1, C_in, X, Y, Z), in order along `slab_axis`; each `Slab.probs`
        (1, C, ...) is the ensemble-mean probability in `dtype` (float32 when `dtype` is None)."""
        image = image.as_tensor() if hasattr(image, "as_tensor") else image
        if image.shape[0] != 1:
            raise ValueError(f"one image at a time, got a batch of {image.shape[0]}")
        if self.dtype is not None:
            image = image.to(self.dtype)
        out_dtype = self.dtype or torch.float32
        spatial = tuple(image.shape[2:])
        axis = slab_axis(spatial)
        sw_device = torch.device(self.sw_device or image.device)
        device = torch.device(self.device or image.device)
        self._passes = passes = [
            [_Pass(net, image, roi, dims, self.overlap, self.mode, axis, sw_device, device) for dims in flips]
            for net, roi, flips in zip(self.nets, self.rois, self.flips, strict=True)
        ]
        # cut where any window starts (a slab is finished as soon as the windows reaching it have run) or ends (so
        # no chunk reaches past the windows run so far: at most one window's depth is held per pass)
        edges = set().union(*(p.edges() for model in passes for p in model))
        cuts = sorted(s for s in edges if 0 < s < spatial[axis]) + [spatial[axis]]
        for model in passes:
            for p in model:
                p.cuts = cuts
        for index, stop in enumerate(cuts):
            total: torch.Tensor | None = None
            for model in passes:  # the order and dtypes of sliding_window_probs and Predictor.probs
                mean: torch.Tensor | None = None
                for p in model:
                    p.run_until(stop, self.sw_batch_size)
                    probs = softmax_(p.finish(index)).to(out_dtype)
                    mean = probs if mean is None else mean.add_(probs)
                assert mean is not None
                mean = mean.div_(len(model)) if len(model) > 1 else mean
                total = mean if total is None else total.add_(mean)
            assert total is not None
            yield Slab(
                axis, cuts[index - 1] if index else 0, stop, total.div_(len(passes)) if len(passes) > 1 else total
            )
            del total, mean, probs  # before the next slab's chunks are made

    def labels_and_probs(
        self, image: torch.Tensor, keep_probs: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class indices (1, 1, X, Y, Z) (`label_dtype`) of the most probable class, on `device`; with
        `keep_probs` also the probabilities (1, C, X, Y, Z) in `dtype` (float32 when None), gathered slab by slab."""
        labels, probs = None, None
        for slab in self.slabs(image):
            if labels is None:
                spatial = tuple(image.shape[2:])
                num_classes, where = slab.probs.shape[1], slab.probs.device
                labels = torch.empty((1, 1, *spatial), dtype=label_dtype(num_classes), device=where)
                if keep_probs:
                    probs = torch.empty((1, num_classes, *spatial), dtype=slab.probs.dtype, device=where)
            labels[slab.region()] = slab.probs.argmax(1, keepdim=True)
            if probs is not None:
                probs[slab.region()] = slab.probs
        assert labels is not None
        return labels, probs

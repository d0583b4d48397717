"""Slab-by-slab stitching (medseg.inference.slab_stitching) against the whole-volume path it replaces in
prediction (`sliding_window_probs`, MONAI's `sliding_window_inference`): same masks, memory independent of length."""

import pytest
import torch

from medseg.inference.slab_stitching import SlabStitcher, in_dtype, label_dtype, live_shape
from medseg.inference.window_order import cut_axis, tile_axes
from medseg.models.sliding_window import probs_to_labels, sliding_window_probs

CLASSES = 6


def _net(seed: int, classes: int = CLASSES) -> torch.nn.Module:
    """A random conv net: not symmetric, so flips and window positions change its output."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, classes, 3, padding=1)
    )
    return net.eval()


def _old(nets, image, roi, axes, dtype=None, sw_batch_size=3, overlap=0.5):
    """Today's path: whole-volume probabilities per model (`sliding_window_probs`), averaged as Predictor did."""
    probs = [sliding_window_probs(n, image, roi, sw_batch_size, overlap, mirror_axes=axes, dtype=dtype) for n in nets]
    total = probs[0]
    for p in probs[1:]:
        total = total.add_(p)
    return total.div_(len(nets)) if len(nets) > 1 else total


# [image shape (X, Y, Z), roi, mirror axes]: anisotropic volumes whose longest axis is each of the three; windows
# deeper than the slabs (cut at every window start), so every window crosses slab edges; flips along the slab axis;
# an image thinner than the roi (MONAI pads it, the odd voxel after, before a flip after the flip).
CASES = [
    [(20, 18, 45), (12, 10, 16), ()],
    [(16, 14, 37), (12, 10, 16), (0, 2)],
    [(41, 12, 11), (16, 16, 8), (0,)],
    [(9, 30, 13), (12, 16, 16), (0, 1, 2)],
]


@pytest.mark.parametrize(
    ("shape", "roi", "axes", "models"), [[*c, m] for c, m in zip(CASES, [1, 1, 2, 2], strict=True)]
)
def test_slab_masks_equal_whole_volume_masks(shape, roi, axes, models):
    nets = [_net(seed) for seed in range(models)]
    image = torch.randn(1, 1, *shape)
    with torch.no_grad():
        want = _old(nets, image, roi, axes)
    stitcher = SlabStitcher(nets, [roi] * models, [axes] * models, sw_batch_size=3, overlap=0.5)
    covered = torch.zeros(shape, dtype=torch.int64)
    tiles = [(t.lo, t.hi) for t in stitcher.tiles(image)]
    for lo, hi in tiles:
        covered[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] += 1
    assert bool((covered == 1).all())  # the tiles partition the volume
    axes = tile_axes(shape)
    for axis in axes:  # windows reach across tile edges along each cut axis longer than a window
        if not cut_axis(axis, axes) or shape[axis] <= roi[axis]:
            continue
        assert len({lo[axis] for lo, _ in tiles}) > 2
        assert min(hi[axis] - lo[axis] for lo, hi in tiles) < roi[axis]
    labels, probs = stitcher.labels_and_probs(image, keep_probs=True)
    assert labels.dtype == torch.uint8 and labels.shape == (1, 1, *shape)
    torch.testing.assert_close(probs, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(labels, probs_to_labels(want))
    assert len(labels.unique()) >= 3  # several classes won somewhere: not a constant mask by chance


@pytest.mark.parametrize(("shape", "roi", "axes"), CASES[:2])
def test_bf16_masks_differ_only_where_classes_tie_to_rounding(shape, roi, axes):
    """BF16 sums: MONAI adds overlapping windows in order of their first axis, the slabs in order of the longest,
    so sums round differently; a voxel's class may change only where today's two best probabilities were within
    rounding (2 bf16 steps) of each other."""
    nets = [_net(0).to(torch.bfloat16)]
    image = 3 * torch.randn(1, 1, *shape)
    with torch.no_grad():
        want = _old(nets, image, roi, axes, dtype=torch.bfloat16)[0].float()
    labels, _ = SlabStitcher(nets, [roi], [axes], 3, 0.5, dtype=torch.bfloat16).labels_and_probs(image)
    differ = labels[0, 0].long() != want.argmax(0)
    best = want.max(0).values
    chosen = want.gather(0, labels[0].long())[0]
    assert differ.float().mean() < 0.01
    assert torch.all((best - chosen)[differ] <= best[differ] * 2**-6)


def _exact_sums(net, image, roi, axes):
    """The whole-volume path with FP32 sums of the same BF16 windows (each window rounded to BF16 exactly as the
    tiles path rounds it): the reference for low-precision sums."""
    return _old([lambda w: net(w.to(torch.bfloat16))], image.to(torch.bfloat16).float(), roi, axes)[0]


@pytest.mark.parametrize(("shape", "roi", "axes"), CASES[:2])
def test_fp16_sums_of_bf16_windows_round_less_than_bf16_sums(shape, roi, axes):
    """BF16 windows summed in FP16 (`sum_dtype`, nnU-Net keeps FP16 sums): probabilities about 8x closer to
    exact (FP32) sums, and far fewer classes changed by rounding than with BF16 sums, in the same memory. A
    32-class random net makes near-ties common: BF16 sums change about 115 voxels here, FP16 sums 7-17, FP32
    sums (`sum_dtype=fp32`, twice the memory) none."""
    net = _net(0, classes=32).to(torch.bfloat16)
    image = 3 * torch.randn(1, 1, *shape)
    with torch.no_grad():
        exact = _exact_sums(net, image, roi, axes)
    changed, error = {}, {}
    for sums in (torch.bfloat16, torch.float16, torch.float32):
        stitcher = SlabStitcher([net], [roi], [axes], 3, 0.5, dtype=torch.bfloat16, sum_dtype=sums)
        labels, probs = stitcher.labels_and_probs(image, keep_probs=True)
        assert probs.dtype == sums
        changed[sums] = int((labels[0, 0].long() != exact.argmax(0)).sum())
        error[sums] = float((probs[0].float() - exact).abs().mean())
    assert changed[torch.bfloat16] > 50 and changed[torch.float16] * 4 < changed[torch.bfloat16], changed
    assert error[torch.float16] * 4 < error[torch.bfloat16], error  # 2^-11 against 2^-8: about 8x
    assert changed[torch.float32] == 0 and error[torch.float32] < 1e-6, (changed, error)  # FP32 sums: exact


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_logits_change_dtype_in_their_own_memory_as_to_would(layout):
    logits = (100 * torch.randn(2, 5, 6, 7, 8)).to(torch.bfloat16).contiguous(memory_format=layout)
    logits[0, 0, 0, 0, :3] = torch.tensor([1e30, -1e30, 1e-30])  # past FP16's range both ways
    want, where = logits.to(torch.float16), logits.data_ptr()
    got = in_dtype(logits, torch.float16)
    assert got.dtype == torch.float16 and got.data_ptr() == where and torch.equal(got, want)
    assert torch.equal(in_dtype(got, torch.float32), want.float())  # another size: a new tensor


def test_fp16_sums_that_overflow_raise():
    """Logits past FP16's range (BF16 holds them) end in a clear error, not in NaN probabilities."""
    net = torch.nn.Conv3d(1, 3, 1).to(torch.bfloat16).eval()
    with torch.no_grad():
        net.weight.fill_(1e5)
    stitcher = SlabStitcher([net], [(8, 8, 8)], [()], 2, dtype=torch.bfloat16, sum_dtype=torch.float16)
    with pytest.raises(FloatingPointError, match="sum_dtype=fp32"):
        stitcher.labels_and_probs(torch.ones(1, 1, 8, 8, 20))
    labels, _ = SlabStitcher([net], [(8, 8, 8)], [()], 2, dtype=torch.bfloat16).labels_and_probs(
        torch.ones(1, 1, 8, 8, 20)
    )
    assert labels.shape == (1, 1, 8, 8, 20)


def test_held_sums_do_not_grow_with_length():
    """The sums held at once (seen before every window batch and at every slab) are the same for a scan three
    times longer, and within one window's depth per pass (`live_shape`)."""
    conv, roi = _net(0), (12, 10, 16)
    watch: dict = {}

    def net(x):
        watch["most"] = max(watch["most"], watch["stitcher"].held())
        return conv(x)

    held = {}
    for depth in (48, 144):
        watch["most"], watch["stitcher"] = 0, SlabStitcher([net], [roi], [(2,)], 1, 0.5)
        for _ in watch["stitcher"].tiles(torch.randn(1, 1, 20, 18, depth)):
            watch["most"] = max(watch["most"], watch["stitcher"].held())
        held[depth] = watch["most"]
        bound = torch.Size(live_shape((20, 18, depth), [roi], [(2,)])).numel() * (CLASSES + 1)
        assert 0 < held[depth] <= bound < 20 * 18 * depth * (CLASSES + 1)
    assert held[48] == held[144]


@pytest.mark.parametrize("depth", [96, 99])
def test_tiles_leave_as_soon_as_their_last_window_ran(depth):
    """Tiles along all three axes, each gone as soon as the last window reaching it has run: at overlap 0.5 the sums
    held stay under 0.6 of one window's depth of planes (the overlap, 0.5, plus the part of the next planes the
    current row has reached). Also where the last window along the slab axis is moved back to end at the image's
    edge (depth 99: it starts 3 planes after the one before, not 8): run a row apart, the 13 planes the two share
    were held whole (0.86 of a window's depth; a slab at a time, 0.625 at depth 96; benchmarks/RESULTS.md,
    "Whole-body scale", for a 512 x 512 CT at 118 classes)."""
    conv, roi, shape = _net(0), (16, 16, 16), (64, 64, depth)
    watch: dict = {"most": 0}

    def net(x):
        watch["most"] = max(watch["most"], stitcher.held())
        return conv(x)

    stitcher = SlabStitcher([net], [roi], [()], 1, 0.5)
    for _ in stitcher.tiles(torch.randn(1, 1, *shape)):
        watch["most"] = max(watch["most"], stitcher.held())
    window_depth = torch.Size(live_shape(shape, [roi], [()])).numel() * (CLASSES + 1)
    assert watch["most"] <= 0.6 * window_depth


def test_windows_run_sw_batch_size_at_a_time():
    """Finishing each tile after its last window must not cut the batches short: every batch but the last holds
    `sw_batch_size` windows (a few-class net runs faster per window in batches)."""
    conv, sizes = _net(0), []

    def net(x):
        sizes.append(x.shape[0])
        return conv(x)

    for _ in SlabStitcher([net], [(12, 10, 16)], [()], sw_batch_size=3).tiles(torch.randn(1, 1, 20, 18, 45)):
        pass
    assert len(sizes) > 3 and set(sizes[:-1]) == {3}


def test_labels_take_int16_beyond_256_classes():
    assert label_dtype(256) == torch.uint8 and label_dtype(257) == torch.int16
    net = torch.nn.Conv3d(1, 300, 1).eval()
    with torch.no_grad():
        net.bias.copy_(torch.arange(300.0) / 300)  # the last class wins everywhere
        net.weight.zero_()
    labels, _ = SlabStitcher([net], [(8, 8, 8)], [()], 2).labels_and_probs(torch.randn(1, 1, 8, 8, 20))
    assert labels.dtype == torch.int16 and bool((labels == 299).all())


def test_refuses_mismatched_settings_and_batches():
    with pytest.raises(ValueError, match="one roi and one mirror_axes per net"):
        SlabStitcher([_net(0)], [(8, 8, 8)] * 2, [()])
    with pytest.raises(ValueError, match="one image at a time"):
        next(SlabStitcher([_net(0)], [(8, 8, 8)], [()]).tiles(torch.randn(2, 1, 8, 8, 8)))

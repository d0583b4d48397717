"""`python -m medseg.predict` on a tiny trained run, stitched slab by slab, against the whole-volume path it
replaced (`sliding_window_probs` per model, averaged, argmax, Invertd), computed here."""

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.inference import postprocess
from medseg.models.inference import probs_to_labels, sliding_window_probs
from medseg.precision.plugin import saved_state
from medseg.predict import Predictor, net_input
from medseg.train import train

from .conftest import compose_cfg
from .helpers import TINY, TINY_UNET, output, run_cli


@pytest.fixture(scope="module")
def two_checkpoints(tiny_dataset, tmp_path_factory):
    """A tiny trained run's best checkpoint, and a perturbed copy of it (a second model, same preprocessing)."""
    tmp = tmp_path_factory.mktemp("slab")
    overrides = [*TINY, *TINY_UNET, f"data.root={tiny_dataset}", "++data.synthesize=null",
                 f"data.cache_dir={tmp / 'cache'}", "trainer.max_epochs=1", "+precision=mixed"]  # fmt: skip
    train(compose_cfg(overrides, tmp / "run"))
    [best] = [p for p in (tmp / "run" / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    state = saved_state(ckpt)  # the FP32 masters, which predict loads
    for name, masters in zip(state["names"][0], state["masters"][0], strict=True):
        if name.endswith("conv.weight"):
            masters.add_(0.2 * masters.std() * torch.randn_like(masters))
    other = tmp / "other.ckpt"
    torch.save(ckpt, other)
    return [best, other]


def _long_scan(folder):
    """An LPS, anisotropic (1.1 x 0.9 x 1.2 mm) scan, longest along Z: several slabs at the run's spacing."""
    from medseg.data.synthetic import make_case

    image, _ = make_case(np.random.default_rng(3), (30, 26, 110))
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(image, np.diag([-1.1, -0.9, 1.2, 1.0])), folder / "long.nii.gz")
    return folder / "long.nii.gz"


def _whole_volume_mask(predictor: Predictor, path) -> np.ndarray:
    """The mask as `Predictor.predict_case` made it before slab stitching."""
    data = predictor.preprocess({"image": str(path)})
    x = net_input(data, predictor.dtype, predictor.device)
    with torch.no_grad():
        probs = [
            sliding_window_probs(
                net, x, roi, predictor.sw_batch_size, predictor.overlap, mirror_axes=axes, dtype=predictor.dtype
            )  # fmt: skip
            for net, roi, axes in zip(predictor.nets, predictor.rois, predictor.mirror_axes, strict=True)
        ]
    total = probs[0]
    for p in probs[1:]:
        total = total.add_(p)
    total = total.div_(len(probs)) if len(probs) > 1 else total
    labels = probs_to_labels(total)[0]
    pred = predictor.invert({"image": data["image"], "pred": predictor._with_record(labels.float(), data["image"])})
    return np.asarray(postprocess.keep_largest(pred["pred"], [])[0]).round().astype(np.uint8)


@pytest.mark.parametrize(
    ("dtype", "models", "mirror"),
    [("fp32", 1, "[2]"), pytest.param("fp32", 2, "[0,1,2]", marks=pytest.mark.slow), ("bf16", 1, "[2]")],
)
def test_cli_masks_equal_whole_volume_masks(two_checkpoints, tmp_path, dtype, models, mirror):
    """fp32, a 2-checkpoint ensemble with 8 flips: the same mask. bf16: sums round in another order, so a voxel
    may change class only where two classes tied; the masks' Dice stays >= 0.999."""
    src = _long_scan(tmp_path / "in")
    ckpts = two_checkpoints[:models]
    ckpt_arg = f"[{','.join(map(str, ckpts))}]"
    settings = {"sw_batch_size": 2, "overlap": 0.5}
    result = run_cli(f"ckpt_path={ckpt_arg}", f"input={src.parent}", f"output={tmp_path / 'out'}", "device=cpu",
                     f"dtype={dtype}", f"mirror_axes={mirror}", "postprocessing=none", "num_workers=0",
                     "progress=false", *(f"{k}={v}" for k, v in settings.items()), module="medseg.predict")  # fmt: skip
    assert result.returncode == 0, output(result)
    mask = np.asarray(nib.load(tmp_path / "out" / "long.nii.gz").dataobj)

    predictor = Predictor([str(c) for c in ckpts], "cpu", mirror_axes=[int(a) for a in mirror[1:-1].split(",")],
                          dtype=dtype, **settings)  # fmt: skip
    data = predictor.preprocess({"image": str(src)})
    assert max(data["image"].shape[1:]) > 2 * max(predictor.rois[0])  # several slabs along Z
    want = _whole_volume_mask(predictor, src)
    assert mask.shape == want.shape == (30, 26, 110) and len(np.unique(want)) == 3
    if dtype == "fp32":
        np.testing.assert_array_equal(mask, want)
    else:
        differ = (mask != want).mean()
        dice = [2 * ((mask == c) & (want == c)).sum() / ((mask == c).sum() + (want == c).sum()) for c in (1, 2)]
        print(f"bf16: {differ:.2e} of the voxels differ; Dice per class {dice}")
        assert differ < 1e-3 and min(dice) >= 0.999, (differ, dice)

"""`python -m medseg.predict` on a tiny trained run, stitched slab by slab, against the whole-volume path it
replaced (`sliding_window_probs` per model, averaged, argmax, Invertd), computed here."""

import importlib.util

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg import REPO_ROOT
from medseg.inference.predictor import Predictor
from medseg.precision.state import saved_state
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
    """An LPS, anisotropic (1.1 x 0.9 x 1.2 mm) scan, longest along Z: several slabs at the run's spacing; its
    label, of the same name, in folder/labels."""
    from medseg.data.synthetic import make_case

    image, label = make_case(np.random.default_rng(3), (30, 26, 110))
    (folder / "labels").mkdir(parents=True)
    affine = np.diag([-1.1, -0.9, 1.2, 1.0])
    nib.save(nib.Nifti1Image(image, affine), folder / "long.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / "labels" / "long.nii.gz")
    return folder / "long.nii.gz"


def _scale():
    """benchmarks/scale.py as a module: its `whole_volume_mask` is the path before slab stitching."""
    spec = importlib.util.spec_from_file_location("bench_scale", REPO_ROOT / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("dtype", "models", "mirror"),
    [
        ("fp32", 1, "[2]"),
        pytest.param("fp32", 2, "[0,1,2]", marks=pytest.mark.slow),
        pytest.param("bf16", 1, "[2]", marks=pytest.mark.slow),
    ],
)
def test_cli_masks_equal_whole_volume_masks(two_checkpoints, tmp_path, dtype, models, mirror):
    """fp32, a 2-checkpoint ensemble with 8 flips: the same mask. bf16: the tiles' FP16 sums (`sum_dtype=auto`)
    round less than MONAI's BF16 ones, so the mask is closer to the exact sums' mask (the whole-volume path with FP32
    buffers) than that path's own, and its Dice against it stays >= 0.999 on this barely trained net."""
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
    want = _scale().whole_volume_mask(predictor, data, torch.float32)  # exact sums (of BF16 windows for bf16)
    assert mask.shape == want.shape == (30, 26, 110) and len(np.unique(want)) == 3
    if dtype == "fp32":
        np.testing.assert_array_equal(mask, want)
    else:
        monai_bf16 = _scale().whole_volume_mask(predictor, predictor.preprocess({"image": str(src)}))
        differ, before = (mask != want).mean(), (monai_bf16 != want).mean()
        dice = [2 * ((mask == c) & (want == c)).sum() / ((mask == c).sum() + (want == c).sum()) for c in (1, 2)]
        print(f"bf16: {differ:.2e} of the voxels differ from exact sums (MONAI's BF16 sums: {before:.2e}); {dice}")
        assert differ < before and min(dice) >= 0.999, (differ, before, dice)


@pytest.mark.slow  # two fresh processes: ~20 s alone, minutes on a loaded machine
def test_scale_benchmark_prints_whole_and_slab_rows(tmp_path, capsys):
    """The prediction table at a tiny size: both paths, identical masks in fp32, a peak for each."""
    rows = _scale().main(["predict", "--smoke", "--classes", "5", "--dtypes", "fp32", "--work", str(tmp_path)])
    assert [r["path"] for r in rows] == ["whole", "slab"] and all(r["peak_mib"] > 0 for r in rows), rows
    assert rows[-1]["differ"] == f"0 of {64 * 64 * 80}"
    assert "| 80 | 35x35x54 | 5 | fp32 | slab |" in capsys.readouterr().out


@pytest.mark.slow  # four fresh processes
def test_agreement_table_on_a_trained_checkpoint(two_checkpoints, tmp_path, capsys):
    """`scale.py agree`: a trained run on a scan stacked twice along Z: FP32's two paths agree to the voxel; BF16 rows
    are scored against both references; the stacked scan is twice as long and keeps the first copy as it was."""
    scan = _long_scan(tmp_path / "in")
    args = ["agree", "--ckpt", str(two_checkpoints[0]), "--images", str(scan), "--stack-z", "2"]
    args += ["--labels", str(scan.parent / "labels")]
    rows = _scale().main([*args, "--dtypes", "bf16", "fp32", "--work", str(tmp_path / "agree")])
    by = {(r["dtype"], r["path"]): r for r in rows}
    assert set(by) == {(d, p) for d in ("bf16", "fp32") for p in ("whole", "slab")}, rows
    assert by["fp32", "slab"]["differ vs whole"] == 0 and "differ vs whole" not in by["fp32", "whole"]
    assert {"Dice vs whole (mean / min)", "Dice vs fp32 whole (mean / min)"} <= set(by["bf16", "slab"])
    # scored against the label stacked as the scan is (a label left unstacked would fail to compare at all)
    assert all("Dice vs truth (mean / min)" in r and 0 <= r["differ vs truth"] < 30 * 26 * 220 for r in rows), rows
    stacked = nib.load(tmp_path / "agree" / "stack2_long.nii.gz")
    assert stacked.shape == (30, 26, 220)
    np.testing.assert_array_equal(stacked.get_fdata()[..., :110], nib.load(scan).get_fdata())
    assert "| stack2_long.nii.gz |" in capsys.readouterr().out


def test_agreement_refuses_a_stack_of_no_copies(capsys):
    with pytest.raises(SystemExit):
        _scale().main(["agree", "--ckpt", "x.ckpt", "--images", "x.nii.gz", "--stack-z", "0"])
    assert "--stack-z must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["predict", "agree"])
def test_scale_refuses_an_unknown_path_or_sums_dtype(command, capsys):
    args = ["--ckpt", "x.ckpt", "--images", "x.nii.gz"] if command == "agree" else ["--smoke"]
    with pytest.raises(SystemExit):
        _scale().main([command, *args, "--paths", "whole", "slab:int8"])
    assert "a path is whole or slab, with :fp32, :bf16 or :fp16 or not, got 'slab:int8'" in capsys.readouterr().err


def test_agreement_names_a_missing_label_before_predicting(tmp_path):
    scan = _long_scan(tmp_path / "in")
    (scan.parent / "labels" / "long.nii.gz").unlink()
    with pytest.raises(SystemExit, match=f"no label file for these images: {scan.parent / 'labels' / 'long.nii.gz'}"):
        _scale().main(["agree", "--ckpt", "x.ckpt", "--images", str(scan), "--labels", str(scan.parent / "labels")])


@pytest.mark.parametrize("planes", [64, 7])
def test_label_inversion_plane_by_plane_equals_invertd(two_checkpoints, tmp_path, planes):
    """Random class indices on the net's grid of an LPS, anisotropic scan (every voxel a different test of the
    nearest-neighbour mapping), mapped back by `invert_labels` a few planes at a time and by MONAI's whole-volume
    `Invertd`: the same map, in the labels' own dtype."""
    from monai.transforms import Invertd

    from medseg.inference.label_inversion import invert_labels

    predictor = Predictor([str(two_checkpoints[0])], "cpu", mirror_axes=[])
    record = predictor.preprocess({"image": str(_long_scan(tmp_path / "in"))})["image"]
    generator = torch.Generator().manual_seed(planes)
    labels = torch.randint(0, 3, (1, *record.shape[1:]), generator=generator).to(torch.uint8)
    invert = Invertd("pred", transform=predictor.preprocess, orig_keys="image", nearest_interp=True)
    want = invert({"image": record, "pred": predictor._with_record(labels.float(), record)})["pred"]
    got = invert_labels(labels, record, predictor.preprocess, planes=planes)
    assert got.dtype == np.uint8 and got.shape == (30, 26, 110)
    np.testing.assert_array_equal(got, np.asarray(want[0]).round().astype(np.uint8))

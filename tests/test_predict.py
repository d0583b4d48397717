"""Inference round trip and scoring: masks on the input's own grid; evaluate against hand-computed Dice."""

import csv
from pathlib import Path

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from monai.inferers import sliding_window_inference

from medseg.checkpoint import CheckpointError
from medseg.config_check import ConfigError
from medseg.evaluate import evaluate
from medseg.inference import postprocess
from medseg.inference.cases import save_mask
from medseg.inference.stitch_device import WINDOW_BATCH_BYTES, stitch_device, window_batch
from medseg.models.sliding_window import mirror_flips, sliding_window_probs
from medseg.precision.dtypes import accumulation_dtype
from medseg.precision.state import saved_state
from medseg.predict import CasesFailed, Predictor, predict
from medseg.reliability.atomic_io import write_atomic
from medseg.train import build_model, train

from .conftest import compose_cfg
from .helpers import TINY, TINY_UNET, output, run_cli


@pytest.fixture(scope="module")
def checkpoint(tiny_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    cfg = compose_cfg(
        [
            *TINY,
            *TINY_UNET,
            f"data.root={tiny_dataset}",
            "++data.synthesize=null",
            f"data.cache_dir={tmp / 'cache'}",
            "trainer.max_epochs=1",
            "+precision=mixed",
        ],
        tmp / "run",
    )
    train(cfg)  # its test pass writes the postprocessing decision beside the best checkpoint
    [best] = [p for p in (tmp / "run" / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    return best


def predict_cfg(checkpoint, input, output, *overrides: str):
    """The real conf/predict.yaml for a CPU run without progress bar or worker processes, plus `overrides`."""
    ckpt = f"[{','.join(map(str, checkpoint))}]" if isinstance(checkpoint, list) else str(checkpoint)
    base = [f"ckpt_path={ckpt}", f"input={input}", f"output={output}", "device=cpu", "sw_batch_size=2"]
    cfg = compose_cfg([*base, "overlap=0.25", "progress=false", "num_workers=0", *overrides], output, "predict")
    return cfg


def _odd_input(folder, shape=(30, 26, 22)):
    """An LPS-oriented, anisotropic (1.3 x 2.9 x 2.1 mm), shifted volume: nothing like the training grid."""
    rng = np.random.default_rng(0)
    from medseg.data.synthetic import make_case

    image, _ = make_case(rng, shape)
    affine = np.diag([-1.3, -2.9, 2.1, 1.0])
    affine[:3, 3] = [12.5, -40.0, 7.0]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "odd.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), path)
    return path


def test_predict_mask_has_input_shape_and_affine(checkpoint, tmp_path):
    src = _odd_input(tmp_path / "in")
    # the 8 mirrored passes must invert exactly like one
    [written] = predict(predict_cfg(checkpoint, tmp_path / "in", tmp_path / "out", "mirror_axes=[0,1,2]"))
    mask, image = nib.load(written), nib.load(src)
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-6)
    values = np.unique(np.asarray(mask.dataobj))
    assert set(values.tolist()) <= {0, 1, 2} and mask.get_data_dtype() == np.uint8


def test_predict_refuses_bad_mirror_axes_before_writing(checkpoint, tmp_path):
    _odd_input(tmp_path / "in")
    cfg = predict_cfg(checkpoint, tmp_path / "in", tmp_path / "out", "mirror_axes=[0,4]")
    with pytest.raises(ValueError, match=r"mirror_axes: must list spatial axes 0, 1 or 2, got \[0, 4\]"):
        predict(cfg)
    assert not (tmp_path / "out").exists()


def test_predict_refuses_an_unknown_sum_dtype_before_writing(checkpoint, tmp_path):
    _odd_input(tmp_path / "in")
    cfg = predict_cfg(checkpoint, tmp_path / "in", tmp_path / "out", "sum_dtype=fp64")
    with pytest.raises(ValueError, match="sum_dtype must be fp32, bf16, fp16 or auto, got 'fp64'"):
        predict(cfg)
    assert not (tmp_path / "out").exists()


def test_sum_dtype_auto_is_fp16_for_bf16_windows_only():
    assert accumulation_dtype("auto", torch.bfloat16) == torch.float16
    assert accumulation_dtype("auto", torch.float16) == torch.float16
    assert accumulation_dtype("auto", torch.float32) == torch.float32
    assert accumulation_dtype("fp32", torch.bfloat16) == torch.float32


@pytest.mark.parametrize("where", ["same", "inside"])
def test_predict_refuses_output_in_input_folder(checkpoint, tmp_path, where):
    src = _odd_input(tmp_path / "in")
    out = tmp_path / "in" if where == "same" else tmp_path / "in" / "masks"
    cfg = predict_cfg(checkpoint, src, out)
    before = src.read_bytes()
    with pytest.raises(ValueError, match="inside the input folder"):
        predict(cfg)
    assert src.read_bytes() == before and not (tmp_path / "in" / "masks").exists()


def test_evaluate_matches_hand_computed_dice(tmp_path):
    shape = (10, 10, 10)
    label = np.zeros(shape, np.uint8)
    label[2:6, 2:6, 2:6] = 1  # 64 voxels
    label[7:9, 7:9, 7:9] = 2  # 8 voxels
    pred = np.zeros(shape, np.uint8)
    pred[3:7, 2:6, 2:6] = 1  # 64 voxels, 48 overlapping
    pred[7:9, 7:9, 7:8] = 2  # 4 voxels, all inside
    for folder, data in (("labels", label), ("pred", pred)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 1.5, 1])), tmp_path / folder / "case.nii.gz")
    summary = evaluate(tmp_path / "pred", tmp_path / "labels", tmp_path / "eval.csv", ["bg", "a", "b"])
    assert summary["dice/a"] == pytest.approx(2 * 48 / (64 + 64))
    assert summary["dice/b"] == pytest.approx(2 * 4 / (8 + 4))
    assert summary["dice"] == pytest.approx((0.75 + 2 / 3) / 2)
    # Organ shifted by one voxel: the farthest boundary voxel is 1 voxel = 1.5 mm away.
    assert summary["hd95/a"] == pytest.approx(1.5)
    rows = list(csv.DictReader((tmp_path / "eval.csv").open()))
    assert rows[0]["case"] == "case.nii.gz" and float(rows[0]["dice/a"]) == pytest.approx(0.75)


def test_evaluate_names_missing_label(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "labels").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), tmp_path / "pred" / "x.nii.gz")
    with pytest.raises(FileNotFoundError, match="x.nii.gz"):
        evaluate(tmp_path / "pred", tmp_path / "labels", tmp_path / "e.csv")


def test_mirrored_prediction_averages_flipped_passes():
    """Mirroring = the mean of the softmax over the flipped inputs, each flipped back; no axes = one plain pass."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 3, padding=1)  # random kernels: not symmetric, so flips change the output
    image = torch.randn(1, 1, 10, 12, 9)
    window = {"roi_size": (8, 8, 8), "sw_batch_size": 2, "overlap": 0.5, "mode": "gaussian"}

    def plain(x):
        return torch.softmax(sliding_window_inference(x, predictor=net, **window), dim=1)

    with torch.no_grad():
        torch.testing.assert_close(sliding_window_probs(net, image, **window), plain(image))
        by_hand = (plain(image) + plain(image.flip(3)).flip(3)) / 2  # axis 1 = Y = tensor dim 3
        mirrored = sliding_window_probs(net, image, mirror_axes=[1], **window)
        torch.testing.assert_close(mirrored, by_hand)
        assert not torch.allclose(mirrored, plain(image), atol=1e-3)
        torch.testing.assert_close(mirrored.sum(1), torch.ones(1, 10, 12, 9))
    assert len(mirror_flips([0, 1, 2])) == 8 and mirror_flips([]) == [()]
    with pytest.raises(ValueError, match="spatial axes"):
        mirror_flips([3])


def _folder(folder, n=2, shapes=((30, 26, 22), (34, 30, 24))):
    """`n` synthetic cases (different shapes and contents) as case<i>.nii.gz in `folder`."""
    from medseg.data.synthetic import make_case

    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, _ = make_case(rng, shapes[i % len(shapes)])
        nib.save(nib.Nifti1Image(image, np.diag([1.1, 0.9, 1.2, 1.0])), folder / f"case{i}.nii.gz")
    return folder


def test_low_precision_net_keeps_norms_fp32_and_agrees_with_fp32(checkpoint, tmp_path):
    """bf16: convs converted as the training plugin does (norms FP32), sums and probabilities in fp16
    (`sum_dtype=auto`); masks nearly equal."""
    fp32, bf16 = (
        Predictor(str(checkpoint), "cpu", dtype="fp32"),
        Predictor(str(checkpoint), "cpu", dtype="bf16"),
    )
    net = bf16.nets[0]
    assert {p.dtype for n, p in net.named_parameters() if n.endswith("conv.weight")} == {torch.bfloat16}
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
    assert norms and all(b.dtype == torch.float32 for m in norms for b in m.parameters())
    data = fp32.preprocess({"image": str(_odd_input(tmp_path / "in"))})
    p32, p16 = fp32.probs(data["image"].unsqueeze(0)), bf16.probs(data["image"].unsqueeze(0))
    assert p32.dtype == torch.float32 and p16.dtype == torch.float16
    assert not torch.equal(p32, p16.float())  # really another computation
    agree = (p32.argmax(1) == p16.argmax(1)).float().mean().item()
    assert agree > 0.99, agree


def _predict_case_keeping_the_image(predictor, data, with_probs):
    """`Predictor.predict_case` as it was before it released the FP32 image: the whole image kept for Invertd."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    from medseg.models.sliding_window import probs_to_labels

    image = data["image"]
    probs = predictor.probs(image.unsqueeze(0))
    labels = probs_to_labels(probs)[0].cpu()
    data["pred"] = MetaTensor(labels.float(), meta=image.meta, applied_operations=image.applied_operations)
    pred = Invertd("pred", transform=predictor.preprocess, orig_keys="image", nearest_interp=True)(data)["pred"]
    mask = np.asarray(postprocess.keep_largest(pred, predictor.keep_largest)[0]).round().astype(np.uint8)
    data["probs"] = MetaTensor(probs[0].float().cpu(), meta=image.meta, applied_operations=image.applied_operations)
    return mask, predictor.invert_probs(data)["probs"].as_tensor().to(torch.float16)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_predict_case_frees_the_image_before_stitching_and_predicts_the_same(checkpoint, tmp_path, dtype):
    """The preprocessed FP32 image is gone while the net runs (only its transform record is left for Invertd); the
    mask and probabilities on the input's LPS, anisotropic grid are bit-identical to those of the old path."""
    import weakref

    predictor = Predictor(str(checkpoint), "cpu", dtype=dtype, postprocessing="auto")
    assert predictor.keep_largest  # the checkpoint's test pass decided postprocessing: applied in both paths
    src = _odd_input(tmp_path / "in")
    want_mask, want_probs = _predict_case_keeping_the_image(predictor, predictor.preprocess({"image": str(src)}), True)

    data = predictor.preprocess({"image": str(src)})
    image = weakref.ref(data["image"])
    alive_in_forward = []
    hook = predictor.nets[0].register_forward_hook(lambda *_: alive_in_forward.append(image() is not None))
    try:
        mask, probs = predictor.predict_case(data, with_probs=True)
    finally:
        hook.remove()
    assert alive_in_forward and not any(alive_in_forward)
    assert data["image"].numel() == 0 and data["image"].applied_operations
    assert mask.shape == nib.load(src).shape and len(np.unique(mask)) > 1  # not an empty mask by chance
    np.testing.assert_array_equal(mask, want_mask)
    assert torch.equal(probs, want_probs)
    # and without probabilities (they are no longer computed beside the mask)
    mask_only, none = predictor.predict_case(predictor.preprocess({"image": str(src)}))
    assert none is None
    np.testing.assert_array_equal(mask_only, want_mask)


def test_ensemble_averages_softmax_of_its_models(checkpoint, tmp_path):
    """Two checkpoints: the ensemble's probabilities are the mean of each model's; a list and a folder of runs
    name the same checkpoints."""
    other = tmp_path / "other"  # the same weights, perturbed: another model with the same preprocessing
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    state = saved_state(ckpt)  # the FP32 masters, which predict loads (this fixture trains +precision=mixed)
    for name, masters in zip(state["names"][0], state["masters"][0], strict=True):
        if name.endswith("conv.weight"):
            masters.add_(0.2 * masters.std() * torch.randn_like(masters))
    (other / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, other / "checkpoints" / "epoch000-dice0.5000.ckpt")
    image = Predictor(str(checkpoint), "cpu").preprocess({"image": str(_odd_input(tmp_path / "in"))})["image"][None]
    single = [Predictor(str(p), "cpu", dtype="fp32").probs(image) for p in (checkpoint, other)]
    assert not torch.allclose(single[0], single[1], atol=1e-2)
    both = Predictor([str(checkpoint), str(other)], "cpu", dtype="fp32")
    torch.testing.assert_close(both.probs(image), (single[0] + single[1]) / 2)

    runs = tmp_path / "runs"  # a multirun-like folder: <runs>/0, <runs>/1
    runs.mkdir()
    (runs / "0").symlink_to(checkpoint.parent.parent)
    (runs / "1").symlink_to(other)
    assert Predictor(str(runs), "cpu").paths == [runs / "0" / "checkpoints" / checkpoint.name,
                                                 runs / "1" / "checkpoints" / "epoch000-dice0.5000.ckpt"]  # fmt: skip


@pytest.mark.parametrize(("key", "value"), [("spacing", [3.0, 2.5, 0.7]), ("label_names", ["bg", "a", "b"])])
def test_ensemble_refuses_checkpoints_that_differ(checkpoint, tmp_path, key, value):
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["inference"][key] = value
    torch.save(ckpt, tmp_path / "b.ckpt")
    _odd_input(tmp_path / "in")
    cfg = predict_cfg([checkpoint, tmp_path / "b.ckpt"], tmp_path / "in", tmp_path / "out")
    with pytest.raises(CheckpointError) as err:
        predict(cfg)
    message = str(err.value)
    assert "\n" not in message and str(checkpoint) in message and str(tmp_path / "b.ckpt") in message
    assert f"differ in {key}" in message and not (tmp_path / "out").exists()


def test_test_pass_decides_postprocessing_beside_checkpoint(checkpoint):
    record = postprocess.load(postprocess.decision_path(checkpoint))
    assert record["cases"] == 2 and record["label_names"] == ["background", "organ", "tumour"]
    dice = {n: (c["dice"], c["dice_lcc"]) for n, c in record["classes"].items()}
    assert record["keep_largest"] == [i for i, n in enumerate(record["label_names"]) if i and dice[n][1] > dice[n][0]]


def test_postprocessing_decision_and_fold_combination():
    names = ["bg", "a", "b"]
    one = postprocess.decide(names, [0.80, 0.50], [0.82, 0.49], cases=10)
    assert one["keep_largest"] == [1]
    # fold 2 (30 cases) loses more on class a than fold 1 gains; class b has no cases in fold 2
    two = postprocess.decide(names, [0.70, float("nan")], [0.69, float("nan")], cases=30)
    both = postprocess.combine([one, two])
    assert both["cases"] == 40 and both["keep_largest"] == []
    assert both["classes"]["a"]["dice"] == pytest.approx((10 * 0.80 + 30 * 0.70) / 40)
    assert both["classes"]["b"]["dice_lcc"] == pytest.approx(0.49)


def test_predict_applies_stored_postprocessing(checkpoint, tmp_path):
    """keep_largest for both classes leaves one connected component per class, and only removes voxels."""
    from scipy import ndimage

    _odd_input(tmp_path / "in")
    decision = postprocess.save(
        postprocess.decide(["background", "organ", "tumour"], [0.5, 0.5], [0.6, 0.6], 2), tmp_path / "pp.json"
    )
    [plain] = predict(predict_cfg(checkpoint, tmp_path / "in", tmp_path / "plain", "postprocessing=none"))
    [kept] = predict(predict_cfg(checkpoint, tmp_path / "in", tmp_path / "kept", f"postprocessing={decision}"))
    plain, kept = np.asarray(nib.load(plain).dataobj), np.asarray(nib.load(kept).dataobj)
    components = {c: ndimage.label(plain == c, np.ones((3, 3, 3)))[1] for c in (1, 2)}
    assert max(components.values()) > 1  # an untrained net leaves specks: something to remove
    for c in (1, 2):
        assert ndimage.label(kept == c, np.ones((3, 3, 3)))[1] <= 1
    assert np.all((kept == plain) | (kept == 0))


def test_folder_with_workers_skips_existing_and_saves_probs(checkpoint, tmp_path):
    _folder(tmp_path / "in", n=3)
    out = tmp_path / "out"
    cfg = predict_cfg(
        checkpoint, tmp_path / "in", out, "num_workers=2", "save_probs=true", "progress=true", "postprocessing=none"
    )
    written = predict(cfg)
    assert [p.name for p in written] == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    mask = nib.load(out / "case1.nii.gz")
    probs = np.load(out / "case1.npz")["probs"]
    assert probs.dtype == np.float16 and probs.shape == (3, *mask.shape)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=0.02)
    # the same grid as the mask: where the (barely trained) net is confident, its argmax is the mask; bilinear vs
    # nearest inversion may differ where classes are near-tied
    confident = probs.max(0) > 0.6
    assert confident.mean() > 0.1 and (probs.argmax(0) == np.asarray(mask.dataobj))[confident].mean() > 0.95
    assert not list(out.glob(".partial-*"))

    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "case2.npz").unlink()  # the only output missing: only case2 is predicted again
    assert [p.name for p in predict(cfg)] == ["case2.nii.gz"]
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in out.iterdir() if not p.name.startswith("case2"))
    assert len(predict(predict_cfg(checkpoint, tmp_path / "in", out, "overwrite=true"))) == 3


def test_atomic_write_leaves_nothing_under_the_final_name(tmp_path):
    final = tmp_path / "case.nii.gz"

    def dies_halfway(tmp):
        tmp.write_bytes(b"half a mask")
        raise KeyboardInterrupt  # as a killed run would stop

    with pytest.raises(KeyboardInterrupt):
        write_atomic(final, dies_halfway)
    assert not final.exists() and not list(tmp_path.iterdir())
    save_mask(final, np.ones((4, 4, 4), np.uint8), np.eye(4))
    assert np.asarray(nib.load(final).dataobj).sum() == 64 and [p.name for p in tmp_path.iterdir()] == [final.name]


def test_bad_cases_are_named_and_the_others_predicted(checkpoint, tmp_path):
    """A 2-channel image, a 2D image and a damaged file each get one line; the good cases are still written, and
    the command exits 1 listing the three."""
    folder = _folder(tmp_path / "in", n=2)
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20, 2), np.float32), np.eye(4)), folder / "two_channels.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((20, 20), np.float32), np.eye(4)), folder / "flat.nii.gz")
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(CasesFailed) as err:
        predict(predict_cfg(checkpoint, folder, tmp_path / "out", "num_workers=1"))
    failures = err.value.failures
    assert len(failures) == 3 and all("\n" not in f for f in failures)
    by_file = {Path(f.split(":")[0]).name: f for f in failures}
    assert "2 channel(s)" in by_file["two_channels.nii.gz"] and "expects 1" in by_file["two_channels.nii.gz"]
    assert "2D image" in by_file["flat.nii.gz"] and "not a readable NIfTI" in by_file["broken.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case0.nii.gz", "case1.nii.gz"]

    run = run_cli(
        f"ckpt_path={checkpoint}", f"input={folder}", f"output={tmp_path / 'cli'}", "device=cpu", "dtype=bf16",
        "overlap=0.25", "progress=false", "num_workers=0", f"hydra.run.dir={tmp_path / 'hydra'}",
        module="medseg.predict",
    )  # fmt: skip
    assert run.returncode == 1, output(run)
    assert "3 case(s) not predicted" in run.stderr
    for name in ("two_channels.nii.gz", "flat.nii.gz", "broken.nii.gz"):
        assert name in run.stderr
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["case0.nii.gz", "case1.nii.gz"]


@pytest.fixture(scope="module")
def planned_checkpoint(tiny_dataset, tmp_path_factory):
    """A `+precision=mixed` run whose precision plan keeps the net's first block (`net.model.0`) in FP32, tested
    right after fit in bf16 (`model.test_dtype`, converting the net again under the running plugin)."""
    tmp = tmp_path_factory.mktemp("planned")
    overrides = [*TINY, *TINY_UNET, f"data.root={tiny_dataset}", "++data.synthesize=null"]
    overrides += [f"data.cache_dir={tmp / 'cache'}", "trainer.max_epochs=1", "+precision=mixed"]
    overrides += ["precision.plugin.fp32_modules=[net.model.0]", "model.test_dtype=bf16"]
    train(compose_cfg(overrides, tmp / "run"))
    [best] = [p for p in (tmp / "run" / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    return best


def _dtypes(net: torch.nn.Module, kept: str) -> tuple[set, set]:
    """dtypes of the weights inside the module named `kept`, and of the conv weights outside it."""
    inside = {p.dtype for p in net.get_submodule(kept).parameters()}
    outside = {
        m.weight.dtype
        for n, m in net.named_modules()
        if isinstance(m, torch.nn.Conv3d) and not (n == kept or n.startswith(kept + "."))
    }
    return inside, outside


def test_low_precision_prediction_keeps_the_checkpoint_plans_fp32_modules(planned_checkpoint, tmp_path):
    from medseg.precision.precision_plan import saved_fp32_modules

    ckpt = torch.load(planned_checkpoint, map_location="cpu", weights_only=True)
    assert saved_fp32_modules(ckpt) == ["net.model.0"]
    predictor = Predictor(str(planned_checkpoint), "cpu", dtype="bf16")
    assert _dtypes(predictor.nets[0], "model.0") == ({torch.float32}, {torch.bfloat16})
    fp32 = Predictor(str(planned_checkpoint), "cpu", dtype="fp32")
    image = fp32.preprocess({"image": str(_odd_input(tmp_path / "in"))})["image"][None]
    p16, p32 = predictor.probs(image), fp32.probs(image)  # the FP32 block hands BF16 on to the rest
    assert p16.dtype == torch.float16 and (p16.argmax(1) == p32.argmax(1)).float().mean() > 0.99


def test_test_pass_keeps_the_checkpoint_plans_fp32_modules(planned_checkpoint, tiny_cfg):
    """A test-only run (no precision plugin) of the planned checkpoint with model.test_dtype=bf16."""
    cfg = tiny_cfg("model.test_dtype=bf16")
    model = build_model(cfg, instantiate(cfg.data))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.test(model, datamodule=instantiate(cfg.data), ckpt_path=str(planned_checkpoint))
    assert model.saved_fp32_modules == ["net.model.0"]
    assert _dtypes(model.net, "model.0") == ({torch.float32}, {torch.bfloat16})
    assert 0.0 <= trainer.callback_metrics["test/dice"] <= 1.0


def test_fp32_after_low_precision_hands_fp32_on():
    """`model.test_dtype=fp32` after a mixed fit: the casting hooks the plugin left on a module kept in FP32 and on a
    GroupNorm must hand FP32 on, not the low dtype the net had."""
    from medseg.precision.convert import convert_net, to_low_precision

    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Conv3d(4, 2, 3))
    to_low_precision(net, torch.bfloat16, fp32_modules=["0"])
    x = torch.randn(1, 1, 8, 8, 8)
    assert net(x.bfloat16()).dtype == torch.bfloat16 and net[0].weight.dtype == torch.float32
    convert_net(net, torch.float32)
    assert {p.dtype for p in net.parameters()} == {torch.float32} and net(x).dtype == torch.float32


def test_stitch_device_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert stitch_device(cpu, (512, 512, 256), 3, torch.float16) == cpu
    need = 2 * 4 * 512 * 512 * 256 * 2  # (3 classes + 1) channels, twice, of fp16
    assert stitch_device(cuda, (512, 512, 256), 3, torch.float16, free_bytes=4 * need + 1) == cuda
    assert stitch_device(cuda, (512, 512, 256), 3, torch.float16, free_bytes=4 * need - 1) == cpu
    assert stitch_device(cuda, (512, 512, 256), 3, torch.float32, free_bytes=4 * need + 1) == cpu  # twice the bytes


def test_window_batch_shrinks_only_for_many_class_windows():
    # 118 classes x 128^3 in BF16: 495 MB of logits a window, so one at a time; 3 classes keep the batch asked for
    assert window_batch(4, 118, [(128, 128, 128)], torch.bfloat16) == 1
    assert window_batch(4, 3, [(128, 128, 128)], torch.bfloat16) == 4
    assert window_batch(4, 26, [(128, 128, 128)], torch.float32) == WINDOW_BATCH_BYTES // (26 * 128**3 * 4) == 2
    assert window_batch(4, 118, [(64, 64, 64), (128, 128, 128)], torch.float16) == 1  # an ensemble: its largest roi


def test_test_dtype_converts_the_net_for_the_test_pass(tiny_cfg):
    cfg = tiny_cfg("trainer.max_epochs=1", "model.test_dtype=bf16")
    model = build_model(cfg, instantiate(cfg.data))
    datamodule = instantiate(cfg.data)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.test(model, datamodule=datamodule)
    convs = [m.weight.dtype for m in model.net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and set(convs) == {torch.bfloat16}
    assert 0.0 <= trainer.callback_metrics["test/dice"] <= 1.0
    assert {"test/dice_lcc/organ", "test/dice_lcc/tumour"} <= set(trainer.callback_metrics)
    with pytest.raises(ConfigError, match="model.test_dtype must be fp32, bf16, fp16 or auto"):
        build_model(tiny_cfg("model.test_dtype=half"), datamodule)

"""Inference round trip and scoring: masks on the input's own grid; evaluate against hand-computed Dice."""

import csv

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from medseg.evaluate import evaluate
from medseg.models.inference import mirror_flips, sliding_window_probs
from medseg.predict import predict
from medseg.train import train

from .conftest import TINY, TINY_UNET, compose_cfg


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

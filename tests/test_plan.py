"""The planner: valid plans for awkward datasets (small, anisotropic, 4D multi-channel, CT), its rules checked
independently of how it reached them, and its place under the command line (`plan=auto|<file>`)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from medseg import CONF_DIR
from medseg.config_check import ConfigError
from medseg.data.datamodule import MSDDataModule
from medseg.data.synthetic import LABELS, make_case
from medseg.models.dynunet import build_dynunet
from medseg.plan import main as plan_main
from medseg.planning.apply import planned_config
from medseg.planning.auto import make_budget, parse_bytes, parse_duration, plan_dataset
from medseg.planning.fingerprint import read_fingerprint
from medseg.planning.memory import step_cost
from medseg.planning.plan_file import plan_config, plan_yaml
from medseg.planning.planner import (
    MAX_COARSEN,
    MIN_AXIS,
    TIME_FLOOR,
    Budget,
    TrainingPlan,
    choose_patch_and_batch,
    coarser,
    deep_enough,
    make_plan,
    stride_factors,
    target_spacing,
    training_length,
)

from .helpers import output, run_cli


def write_msd(root: Path, shapes, spacings, channels: int = 1, ct: bool = False, seed: int = 0) -> Path:
    """An MSD folder of `make_case` volumes with these shapes and spacings; `channels` > 1 writes 4D
    channels-last images (as BraTS), `ct` writes Hounsfield-like intensities and modality CT."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i, (shape, spacing) in enumerate(zip(shapes, spacings, strict=True)):
        image, label = make_case(rng, tuple(shape))
        if ct:  # air around, soft tissue, a brighter lesion, noise: foreground spans about -60..260 HU
            image = np.where(label == 0, -900.0, np.where(label == 1, 60.0, 180.0)) + rng.normal(0, 30, shape)
        if channels > 1:
            image = np.stack([image * (c + 1) for c in range(channels)], axis=-1)
        affine = np.diag([*spacing, 1.0])
        name = f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    modality = {str(c): "CT" if ct else f"MR{c}" for c in range(channels)}
    meta = {"name": root.name, "modality": modality, "labels": LABELS, "training": training, "numTraining": len(shapes)}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _small(root):  # smaller than any sensible default patch (96^3) on every axis, 12 slices on one
    shapes = [(28 + i % 3 * 4, 36 - i % 2 * 4, 12 + i % 2 * 2) for i in range(8)]
    return write_msd(root, shapes, [(1.0, 1.0, 1.0)] * 8)


def _anisotropic(root):  # 0.8 mm in-plane, 4-6 mm slices: the thick axis gets its 10th-percentile spacing
    spacings = [(0.8, 0.8, [4.0, 5.0, 5.0, 6.0][i % 4]) for i in range(8)]
    return write_msd(root, [(96, 80, 12)] * 8, spacings)


def _multichannel(root):  # 4D channels-last, 2 channels, as BraTS
    return write_msd(root, [(40 + i, 44, 36) for i in range(6)], [(1.5, 1.5, 1.5)] * 6, channels=2)


def _ct(root):
    return write_msd(root, [(48, 48, 40 + 2 * i) for i in range(6)], [(1.0, 1.0, 2.0)] * 6, ct=True)


DATASETS = {"small": _small, "anisotropic": _anisotropic, "multichannel": _multichannel, "ct": _ct}
BUDGET = Budget(memory=160 * 2**20, time_seconds=600)  # tight enough that every dataset's plan is cut by it


@pytest.fixture(scope="module", params=list(DATASETS))
def dataset(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, DATASETS[request.param](tmp_path_factory.mktemp(request.param) / "Task_x")


def test_plans_follow_the_rules(dataset):
    name, root = dataset
    fp = read_fingerprint(root)
    for precision in ("fp32", "mixed"):
        plan = make_plan(fp, precision, BUDGET)
        patch, spacing = np.asarray(plan.patch), np.asarray(plan.spacing)
        factors = stride_factors(plan.patch, plan.spacing)
        assert (patch % factors == 0).all(), (name, plan.patch, factors)  # the net's strides divide the patch
        median = np.asarray(plan.median_shape)
        assert (patch <= np.maximum(np.ceil(median / factors) * factors, MIN_AXIS)).all(), (name, plan.patch, median)
        # the budget, counted again from scratch for the planned net and batch
        dtype = None if precision == "fp32" else torch.bfloat16
        cost = step_cost(len(fp.modalities), fp.num_classes, plan.patch, plan.spacing, plan.filters, dtype)
        assert cost.bytes(plan.batch) <= BUDGET.memory and plan.batch >= 2
        # the data module takes the patch (no "larger than every image" error) and the planned net runs on it
        MSDDataModule(str(root), patch_size=plan.patch, spacing=plan.spacing.copy(), validate=False)
        net = build_dynunet(len(fp.modalities), fp.num_classes, plan.patch, spacing, filters=plan.filters).eval()
        with torch.no_grad():
            assert net(torch.zeros(1, len(fp.modalities), *plan.patch)).shape == (1, 3, *plan.patch)


def test_mixed_gets_more_than_fp32_when_memory_binds(dataset):
    name, root = dataset
    fp = read_fingerprint(root)
    roomy = make_plan(fp, "fp32", Budget(memory=2**40, time_seconds=600))
    budget = Budget(memory=int(0.7 * roomy.memory), time_seconds=600)  # 70 % of what fp32 takes unbounded
    fp32, mixed = make_plan(fp, "fp32", budget), make_plan(fp, "mixed", budget)
    voxels = {k: np.prod(p.patch) * p.batch for k, p in [("roomy", roomy), ("fp32", fp32), ("mixed", mixed)]}
    assert voxels["fp32"] < voxels["roomy"], voxels  # the budget really binds (else the comparison says nothing)
    assert voxels["mixed"] > voxels["fp32"], voxels
    assert "fp32 would plan" in mixed.notes[0]


def test_time_budget_shrinks_the_patch_to_its_floor_then_coarsens_the_spacing(dataset):
    """An impossible time per patch (1 s per FLOP, 1 ns budget) shrinks to batch 2 and half the median shape per
    side, no further, then coarsens the spacing (nnU-Net's low-resolution stage) for MAX_COARSEN rounds and says
    so; memory is a hard limit, time is not. A budget the full-resolution floor meets keeps the spacing."""
    _, root = dataset
    fp = read_fingerprint(root)
    roomy = make_plan(fp, "mixed", Budget(memory=2**40, time_seconds=600))
    hurried = make_plan(fp, "mixed", Budget(memory=2**40, time_seconds=600, patch_seconds=1e-9), seconds_per_flop=1.0)
    spacing = np.asarray(roomy.spacing)
    for _ in range(MAX_COARSEN):  # as far as the net keeps 3 levels at the median shape
        if not deep_enough(fp, coarser(spacing)):
            break
        spacing = coarser(spacing)
    assert hurried.spacing == pytest.approx(spacing.tolist(), rel=1e-3)
    if hurried.spacing != roomy.spacing:
        assert any(note.startswith("low resolution") for note in hurried.notes), hurried.notes
    # at the coarse spacing, the patch stops at the floor
    start, _, _, on_time = choose_patch_and_batch(fp, spacing, Budget(2**40, 600), torch.bfloat16, "cpu", None)
    floor = np.minimum(start, TIME_FLOOR * np.asarray(hurried.median_shape))
    assert hurried.batch == 2 and (np.asarray(hurried.patch) >= floor).all(), (hurried.patch, floor)
    # a budget the full-resolution patch meets (1 s per FLOP, as many seconds as it has FLOPs): no coarsening
    met = make_plan(fp, "mixed", Budget(2**40, 600, patch_seconds=float(roomy.flops)), seconds_per_flop=1.0)
    assert met.spacing == roomy.spacing and met.patch == roomy.patch
    assert not any("low resolution" in n for n in met.notes)


def _brats_like_plan(step_seconds: float) -> TrainingPlan:
    """A measured 9-minute plan of a BraTS 2 mm-like folder (10 cases)."""
    plan = TrainingPlan(
        root="x", precision="mixed", device="cpu", spacing=[2.0] * 3, median_shape=[68, 85, 69], min_shape=[68, 85, 69],
        patch=[80, 96, 64], batch=2, filters=[16, 32, 64, 128, 256], strides=[[1] * 3] + [[2] * 3] * 4, memory=0,
        budget=Budget(memory=2**30, time_seconds=540), flops=1, step_seconds=step_seconds,
    )  # fmt: skip
    training_length(plan, num_cases=10, val_fraction=0.2)
    return plan


@pytest.mark.parametrize("step_seconds", [0.05, 0.3, 1.33, 7.0])
def test_training_length_ends_on_a_validation_epoch(step_seconds):
    """The last epoch is validated (Lightning validates every val_every-th epoch), >= 2 rounds, inside the budget."""
    plan = _brats_like_plan(step_seconds)
    assert plan.epochs % plan.val_every == 0, plan  # the last epoch is a validation epoch
    assert plan.epochs // plan.val_every >= 2, plan  # at least two rounds, whatever the step time
    assert plan.epochs * (8 // plan.batch) * step_seconds <= 540, plan


def test_max_time_leaves_the_planning_and_the_final_test_inside_the_budget():
    """`trainer.max_time` bounds `fit` alone: a 9-minute run that planned for 40 s and tests for a while after
    fitting must stop fitting that much earlier (a BraTS peer run took 10 min of a 9-minute budget)."""
    plan = _brats_like_plan(1.33)
    plan.planning_seconds = 40.0
    h, m, s = map(int, plan_config(plan)["trainer"]["max_time"].split(":")[1:])
    assert plan.test_seconds > 0 and h * 3600 + m * 60 + s == int(540 - 40 - plan.test_seconds)
    plan.planning_seconds = 600.0  # planning outran the budget: fit still gets half of it
    assert plan_config(plan)["trainer"]["max_time"] == "00:00:04:30"


def test_coarser_makes_anisotropic_spacing_less_so():
    assert coarser(np.array([0.8, 0.8, 5.0])) == pytest.approx([1.0, 1.0, 5.0])
    assert coarser(np.array([4.5, 4.5, 5.0])) == pytest.approx([5.0, 5.0, 5.0])
    assert coarser(np.array([2.0, 2.0, 2.0])) == pytest.approx([2.5, 2.5, 2.5])


def test_shapes_are_measured_after_cropping_to_the_nonzero_region(tmp_path):
    """Images with a zero border (as a skull-stripped brain MRI in its field of view): the data module crops it
    away, so the fingerprint's median shape, and the patch, follow the cropped region, not the header."""
    root = write_msd(tmp_path / "Task_pad", [(32, 40, 24)] * 4, [(1.0, 1.0, 1.0)] * 4)
    for path in sorted((root / "imagesTr").glob("*.nii.gz")) + sorted((root / "labelsTr").glob("*.nii.gz")):
        img = nib.load(path)
        padded = np.pad(np.asanyarray(img.dataobj), ((16, 16), (8, 32), (0, 24)))
        nib.save(nib.Nifti1Image(padded, img.affine), path)
    fp = read_fingerprint(root)
    assert fp.shapes[0].tolist() == [64, 80, 48]
    # the synthetic volumes are nonzero almost everywhere (noise), so the crop is about the unpadded size
    assert fp.crop == pytest.approx([32 / 64, 40 / 80, 24 / 48], abs=0.05), fp.crop
    plan = make_plan(fp, "mixed", Budget(memory=2**40, time_seconds=600))
    assert plan.median_shape == pytest.approx([32, 40, 24], abs=2) and max(plan.patch) <= 48, plan


def test_anisotropic_axis_keeps_thick_slices(tmp_path):
    fp = read_fingerprint(_anisotropic(tmp_path / "aniso"))
    spacing = target_spacing(fp.spacings, fp.shapes)
    assert spacing[2] == pytest.approx(np.percentile([4.0, 5.0, 5.0, 6.0] * 2, 10))  # not the median 5.0
    assert spacing[:2] == pytest.approx([0.8, 0.8])
    plan = make_plan(fp, "mixed", BUDGET)
    assert plan.strides[1][2] == 1  # the thick axis is not halved while in-plane resolution is much finer
    # an isotropic dataset keeps its median spacing
    iso = np.array([[1.0, 1.0, 1.0], [1.2, 1.2, 1.2], [1.1, 1.0, 0.9]])
    assert target_spacing(iso, np.full((3, 3), 64.0)) == pytest.approx(np.median(iso, axis=0))


def test_ct_window_from_foreground_percentiles(tmp_path):
    root = _ct(tmp_path / "ct")
    plan = make_plan(read_fingerprint(root), "mixed", BUDGET)
    foreground = np.concatenate([
        np.asarray(nib.load(p).dataobj)[np.asarray(nib.load(str(p).replace("imagesTr", "labelsTr")).dataobj) > 0]
        for p in sorted((root / "imagesTr").glob("*.nii.gz"))
    ])  # fmt: skip
    lo, hi = np.percentile(foreground, [0.5, 99.5])
    # sampled voxels: within a few HU of the exact percentiles, far from the fixed [-1000, 1000]
    assert plan.ct_window == pytest.approx([lo, hi], abs=15)
    assert -200 < plan.ct_window[0] < 0 < 200 < plan.ct_window[1] < 400


def test_impossible_budget_and_missing_root_are_one_line_errors(tmp_path, dataset):
    _, root = dataset
    with pytest.raises(ConfigError, match=r"^plan: the smallest patch .* over the memory budget") as err:
        make_plan(read_fingerprint(root), "fp32", Budget(memory=2**20, time_seconds=60))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=f"^plan: no dataset.json in {tmp_path / 'nowhere'}$"):
        plan_dataset(tmp_path / "nowhere", measure=False)


def test_budget_parsing():
    assert parse_duration("1h30m") == 5400 and parse_duration("45s") == 45 and parse_duration(12) == 12
    assert parse_bytes("8G") == 8 * 2**30 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes(1000) == 1000
    with pytest.raises(ConfigError, match="time budget"):
        parse_duration("soon")
    assert make_budget("cpu", "10m", "1G", None, train_cases=8).patch_seconds == pytest.approx(600 * 0.9 / 800)
    for bad in (0, -1.0):
        with pytest.raises(ConfigError, match="^planner.patch_seconds must be a positive number"):
            make_budget("cpu", "10m", "1G", bad, train_cases=8)


# --- under the command line: plan=auto / plan=<file>, inside a real Hydra app context -------------------------------


def _planned(overrides: list[str], out: Path):
    """`planned_config` as `python -m medseg.train <overrides>` runs it: composed with the real conf/ and the
    Hydra runtime (choices, command-line overrides) set as in a running app."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(out)
            cfg.hydra.job.config_name = "train"
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg.hydra
        before = cfg.copy()
        return before, planned_config(cfg)


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> tuple[Path, dict]:
    root = _multichannel(tmp_path_factory.mktemp("planfile") / "Task_mc")
    plan = plan_dataset(root, "mixed", time="20m", memory="200M", measure=False)
    path = tmp_path_factory.mktemp("plans") / "plan.yaml"
    path.write_text(plan_yaml(plan))
    return path, yaml.safe_load(path.read_text())


def test_plan_file_round_trip(plan_file, tmp_path):
    path, written = plan_file
    _, cfg = _planned([f"plan={path}"], tmp_path)
    assert cfg.model.net._target_ == "medseg.models.dynunet.build_dynunet"
    for section in ("data", "trainer"):
        for key, value in written[section].items():
            assert cfg[section][key] == value, f"{section}.{key}"
    assert list(cfg.model.net.filters) == written["model"]["net"]["filters"] and cfg.model.loss.batch is True
    assert (tmp_path / "training_plan.yaml").read_text() == path.read_text()  # the run directory keeps the plan it ran


def test_plan_file_is_an_experiment(plan_file, tmp_path):
    """Saved under an experiment folder the same file is `experiment=<name>`, and is not planned again."""
    path, written = plan_file
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "mine.yaml").write_text(path.read_text())
    before, cfg = _planned([f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=mine"], tmp_path / "run")
    assert cfg == before and cfg.model.net._target_ == "medseg.models.dynunet.build_dynunet"
    assert list(cfg.data.patch_size) == written["data"]["patch_size"] and cfg.data.root == written["data"]["root"]
    assert cfg.trainer.max_time == written["trainer"]["max_time"] and cfg.model.loss.batch is True


def test_command_line_wins_over_the_plan(plan_file, tmp_path):
    path, written = plan_file
    _, cfg = _planned([f"plan={path}", "data.batch_size=5", "trainer.max_epochs=3", "+precision=mixed"], tmp_path)
    assert cfg.data.batch_size == 5 and cfg.trainer.max_epochs == 3 and cfg.precision.name == "mixed"
    assert list(cfg.data.patch_size) == written["data"]["patch_size"]  # keys not given still come from the plan
    _, cfg = _planned([f"plan={path}", "model=unet"], tmp_path)  # a model group on the command line: its own keys
    assert cfg.model.net._target_ == "monai.networks.nets.UNet" and "filters" not in cfg.model.net
    assert list(cfg.data.patch_size) == written["data"]["patch_size"]


@pytest.mark.parametrize(
    "overrides",
    [[], ["+precision=mixed"], ["data=hippocampus"], ["experiment=brats"], ["data=msd", "data.root=x", "plan=none"]],
)
def test_presets_are_not_planned(overrides, tmp_path):
    before, after = _planned(overrides, tmp_path)
    assert after == before and not (tmp_path / "training_plan.yaml").exists()


def test_plan_auto_plans_a_generic_folder(plan_file, tmp_path):
    root = yaml.safe_load(plan_file[0].read_text())["data"]["root"]
    base = ["data=msd", f"data.root={root}", "planner.measure=false", "planner.memory=200M", "+precision=mixed"]
    _, cfg = _planned([*base, "data.patch_size=[16,16,16]"], tmp_path)
    saved = yaml.safe_load((tmp_path / "training_plan.yaml").read_text())
    assert list(cfg.data.patch_size) == [16, 16, 16] != saved["data"]["patch_size"]  # the command line won
    assert cfg.data.batch_size == saved["data"]["batch_size"] and cfg.plan == "none"
    assert cfg.model.net._target_ == "medseg.models.dynunet.build_dynunet"
    with pytest.raises(ConfigError, match="^plan: no plan file at"):
        _planned(["plan=/no/such/plan.yaml"], tmp_path)
    with pytest.raises(ConfigError, match="^plan=auto with ckpt_path"):
        _planned([*base, "ckpt_path=x.ckpt"], tmp_path / "fresh")  # (a run directory with its plan keeps it)


def test_a_job_started_again_in_its_run_directory_keeps_its_plan(plan_file, tmp_path):
    """Lightning resumes a job started again in its own directory (a requeue) from that directory's newest
    checkpoint, so `plan=auto` must not plan again there: the saved plan is used, even where a new plan differs."""
    root = yaml.safe_load(plan_file[0].read_text())["data"]["root"]
    base = ["data=msd", f"data.root={root}", "planner.measure=false", "+precision=mixed"]
    _, first = _planned([*base, "planner.memory=200M"], tmp_path)
    saved = (tmp_path / "training_plan.yaml").read_text()
    _, other = _planned([*base, "planner.memory=120M"], tmp_path / "elsewhere")  # what planning again would give
    assert list(other.data.patch_size) != list(first.data.patch_size) or other.data.batch_size != first.data.batch_size
    _, again = _planned([*base, "planner.memory=120M"], tmp_path)
    assert list(again.data.patch_size) == list(first.data.patch_size) and again.data.batch_size == first.data.batch_size
    assert (tmp_path / "training_plan.yaml").read_text() == saved


def test_plan_command_writes_the_file(plan_file, tmp_path, capsys):
    root = yaml.safe_load(plan_file[0].read_text())["data"]["root"]
    out = plan_main([root, "--no-measure", "--precision", "fp32", "--out", str(tmp_path / "p.yaml")])
    assert yaml.safe_load(out.read_text())["data"]["root"] == root and "plan written to" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        plan_main([str(tmp_path / "nowhere"), "--no-measure"])
    assert capsys.readouterr().err.strip() == f"medseg: plan: no dataset.json in {tmp_path / 'nowhere'}"


@pytest.mark.slow
def test_train_plans_measures_and_trains_a_new_folder(tmp_path):
    root = _small(tmp_path / "Task_small")
    result = run_cli(
        "data=msd", f"data.root={root}", "+precision=mixed", "planner.time=1m", "logger=csv",
        "data.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}", f"paths.log_dir={tmp_path / 'logs'}",
        "trainer.enable_progress_bar=false", "++callbacks.progress_bar=null", timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, output(result)
    (plan,) = (tmp_path / "logs").glob("train/runs/*/training_plan.yaml")
    written = yaml.safe_load(plan.read_text())
    assert "measured" in plan.read_text() and written["trainer"]["max_time"] < "00:00:01:00"  # planning took some
    assert written["trainer"]["max_epochs"] >= 1
    assert list(plan.parent.glob("checkpoints/*.ckpt")), output(result)

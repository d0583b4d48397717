"""Exported models: a MONAI bundle that predicts, where medseg cannot be imported, the masks `medseg.predict` does;
TorchScript per model; the bundle's preprocessing and inferer against medseg's own."""

import ast
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from monai.bundle import ConfigParser

from medseg.data.synthetic import make_case, write_synthetic_dataset
from medseg.data.transforms import preprocess
from medseg.deploy import bundle_runtime
from medseg.deploy.bundle import inference_config
from medseg.deploy.onnx_model import ATOL as ONNX_ATOL
from medseg.deploy.onnx_model import run_onnx, to_onnx
from medseg.deploy.torchscript import to_torchscript
from medseg.deploy.trained import TrainedModel, load_trained
from medseg.export import main as export_main
from medseg.models.sliding_window import sliding_window_probs
from medseg.predict import predict
from medseg.train import train

from .conftest import compose_cfg, shared_dataset
from .helpers import TINY, TINY_UNET, output

# The bundle specification's required metadata keys (docs.monai.io, "MONAI Bundle Specification").
REQUIRED_META = {
    "version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version", "task",
    "description", "authors", "copyright", "network_data_format",
}  # fmt: skip


def _train(dataset: Path, tmp: Path, *extra: str) -> Path:
    """A real tiny +precision=mixed run, tested mirrored over two axes (its test pass decides keep-largest)."""
    overrides = [*extra, *TINY, *TINY_UNET, f"data.root={dataset}", "++data.synthesize=null"]
    overrides.append(f"data.cache_dir={tmp / 'c'}")
    train(compose_cfg([*overrides, "trainer.max_epochs=1", "+precision=mixed", "model.test_mirror_axes=[0,1]"], tmp))
    return tmp


def _two_channel_dataset(root: Path) -> Path:
    """The synthetic dataset with a second, differently contrasted channel: 4D (X, Y, Z, 2) images, BraTS-like."""
    write_synthetic_dataset(root, num_cases=8, min_size=32, max_size=36, seed=3)
    for path in sorted((root / "imagesTr").glob("*.nii.gz")):
        image = nib.load(path)
        first = np.asarray(image.dataobj, dtype=np.float32)
        second = np.sqrt(np.abs(first)) * 10.0 + (first > 150) * 40.0
        nib.save(nib.Nifti1Image(np.stack([first, second], axis=-1), image.affine), path)
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(modality={"0": "FLAIR", "1": "T1"}, tensorImageSize="4D")
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def one_channel_run(tiny_dataset, tmp_path_factory):
    return tiny_dataset, _train(tiny_dataset, tmp_path_factory.mktemp("export1") / "run")


@pytest.fixture(scope="module")
def two_channel_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export2")
    dataset = _two_channel_dataset(tmp / "data")
    return dataset, _train(dataset, tmp / "run")


@pytest.fixture(scope="module")
def python_without_medseg(tmp_path_factory) -> Path:
    """A virtual environment that sees this one's packages (torch, MONAI, nibabel, fire) but not medseg: its
    site-packages holds a .pth naming ours, so our editable-install hook (another .pth there) never runs."""
    env = tmp_path_factory.mktemp("env") / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make a virtual environment: {made.stderr.strip()}")
    python = env / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(purelib, "medseg_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    check = _run([python, "-c", "import monai, nibabel, fire\ntry:\n import medseg\nexcept ImportError: print('no')"])
    assert check.returncode == 0 and check.stdout.strip() == "no", output(check)
    return python


def _run(command: list, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`command` from a folder outside the repository (`python -m` puts the working folder on sys.path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env, timeout=600,
                          cwd=cwd or Path(sysconfig.get_paths()["purelib"]).anchor)  # fmt: skip


def _odd_case(folder: Path, channels: int) -> Path:
    """An LPS, anisotropic (1.3 x 2.9 x 2.1 mm), shifted case: nothing like the training grid; negative values
    at one border (air in CT HU), which the nonzero crop keeps and a positive-only crop would cut."""
    image, _ = make_case(np.random.default_rng(5), (30, 26, 22))
    image[:4] = -40.0
    if channels > 1:
        image = np.stack([image] * channels, axis=-1) * np.arange(1, channels + 1, dtype=np.float32)
    affine = np.diag([-1.3, -2.9, 2.1, 1.0])
    affine[:3, 3] = [12.5, -40.0, 7.0]
    nib.save(nib.Nifti1Image(image, affine), folder / "odd.nii.gz")
    return folder / "odd.nii.gz"


def _dice(a: np.ndarray, b: np.ndarray, labels: int) -> float:
    """Mean Dice over the foreground classes present in either mask."""
    scores = [2 * ((a == c) & (b == c)).sum() / ((a == c).sum() + (b == c).sum()) for c in range(1, labels)
              if (a == c).any() or (b == c).any()]  # fmt: skip
    return float(np.mean(scores))


def _inputs(dataset: Path, folder: Path, channels: int) -> Path:
    """One of the dataset's images and an odd case, in `folder`."""
    folder.mkdir()
    for path in sorted((dataset / "imagesTr").glob("*.nii.gz"))[:1]:
        (folder / path.name).symlink_to(path)
    _odd_case(folder, channels)
    return folder


def _export(run_dir: Path, bundle: Path, channels: int, fmt: str = "bundle", dtype: str = "fp32") -> Path:
    export_main([str(run_dir), "--format", fmt, "--out", str(bundle), "--dtype", dtype])
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert REQUIRED_META <= set(meta), REQUIRED_META - set(meta)
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == channels
    names = load_trained(run_dir).label_names
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {str(i): n for i, n in enumerate(names)}
    return bundle


def _bundle_args(bundle: Path, inputs: Path, out: Path) -> dict[str, Path]:
    """`monai.bundle run`'s arguments, the model zoo's way."""
    return {"bundle_root": bundle, "config_file": bundle / "configs" / "inference.json",
            "meta_file": bundle / "configs" / "metadata.json", "dataset_dir": inputs, "output_dir": out}  # fmt: skip


def _medseg_masks(run_dir: Path, inputs: Path, out: Path, dtype: str) -> Path:
    cfg = [f"ckpt_path={run_dir}", f"input={inputs}", f"output={out}", "device=cpu", f"dtype={dtype}"]
    predict(compose_cfg([*cfg, "progress=false", "num_workers=0"], out, "predict"))
    return out


def _assert_same_masks(run_dir: Path, inputs: Path, bundle_out: Path, tmp: Path) -> None:
    """The bundle's masks against `medseg.predict dtype=fp32`'s: per-case Dice >= 0.999 (they are identical)."""
    _medseg_masks(run_dir, inputs, tmp / "medseg_out", "fp32")
    labels = len(load_trained(run_dir).label_names)
    for image in sorted(inputs.iterdir()):
        want, got = nib.load(tmp / "medseg_out" / image.name), nib.load(bundle_out / image.name)
        want_mask, got_mask = np.asarray(want.dataobj), np.asarray(got.dataobj)
        assert got_mask.dtype == np.uint8 and got_mask.shape == nib.load(image).shape[:3]
        np.testing.assert_allclose(got.affine, want.affine, atol=1e-5)
        assert len(np.unique(want_mask)) > 1  # not two empty masks agreeing by chance
        assert _dice(got_mask, want_mask, labels) >= 0.999, image.name
        assert (got_mask != want_mask).mean() < 1e-3, image.name


@pytest.mark.parametrize(
    ("fmt", "dtype"), [("bundle", "fp32"), ("bundle", "bf16"), pytest.param("onnx", "fp32", marks=pytest.mark.slow)]
)
def test_bundle_predicts_like_medseg(fmt, dtype, one_channel_run, tmp_path):
    """The exported bundle (TorchScript, or ONNX run by ONNX Runtime) run by MONAI's `run` (in this process; the test
    below runs it where medseg is not installed) writes `medseg.predict`'s masks: mirrored over two axes,
    keep-largest, on an LPS anisotropic case."""
    from monai.bundle import run

    dataset, run_dir = one_channel_run
    model = load_trained(run_dir)
    assert model.mirror_axes == [0, 1] and model.keep_largest  # both exercised
    inputs = _inputs(dataset, tmp_path / "in", 1)
    bundle = _export(run_dir, tmp_path / "bundle", 1, fmt, dtype)
    assert (bundle / "models" / ("model.onnx" if fmt == "onnx" else "model.ts")).is_file()
    path = list(sys.path)
    try:
        run(**{k: str(v) for k, v in _bundle_args(bundle, inputs, tmp_path / "bundle_out").items()})
    finally:  # run() put the bundle root on sys.path and imported its scripts package
        sys.path[:] = path
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]
    if dtype == "fp32":
        _assert_same_masks(run_dir, inputs, tmp_path / "bundle_out", tmp_path)
    else:
        # medseg.predict dtype=bf16 sums the windows in FP16 (sum_dtype=auto), the bundle in FP32: they may part at
        # near-ties, which this barely trained net has many of. The bundle must stay as close to medseg's BF16 masks
        # as BF16 itself moves them from FP32's (and the net must really compute in BF16).
        bf16, fp32 = (_medseg_masks(run_dir, inputs, tmp_path / d, d) for d in ("bf16", "fp32"))
        for image in sorted(inputs.iterdir()):
            got, want, full = (
                np.asarray(nib.load(f / image.name).dataobj) for f in (tmp_path / "bundle_out", bf16, fp32)
            )
            assert (got != want).mean() <= max((want != full).mean(), 1e-3), image.name
            assert (got != full).mean() > 0 or (want != full).mean() == 0  # BF16 arithmetic, not FP32 in disguise
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())
        assert f"({dtype})" in json.dumps(meta["medseg"])
        weights = [t for t in torch.jit.load(str(bundle / "models" / "model.ts")).state_dict().values()]
        assert any(t.dtype == torch.bfloat16 for t in weights)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["one_channel_run", "two_channel_run"])
def test_bundle_predicts_like_medseg_where_medseg_is_not_installed(run, request, python_without_medseg, tmp_path):
    dataset, run_dir = request.getfixturevalue(run)
    channels = 2 if run == "two_channel_run" else 1
    inputs = _inputs(dataset, tmp_path / "in", channels)
    bundle = _export(run_dir, tmp_path / "bundle", channels)
    args = [x for k, v in _bundle_args(bundle, inputs, tmp_path / "bundle_out").items() for x in (f"--{k}", v)]
    result = _run([python_without_medseg, "-m", "monai.bundle", "run", *args], cwd=tmp_path)
    assert result.returncode == 0, output(result)
    _assert_same_masks(run_dir, inputs, tmp_path / "bundle_out", tmp_path)


def test_onnx_logits_within_tolerance_of_pytorch(tmp_path):
    """Dynamic batch and spatial axes: a size other than the export example's runs, within 1e-4 of PyTorch."""
    torch.manual_seed(0)
    net = instantiate({**NETS["unet"][0], "in_channels": 2, "out_channels": 3}).eval()
    path = to_onnx(net, torch.randn(2, 2, 32, 32, 32), tmp_path / "model.onnx")
    x = torch.randn(3, 2, 48, 40, 24)
    with torch.no_grad():
        want = net(x).numpy()
    got = run_onnx(path, x)
    assert got.shape == want.shape and np.abs(got - want).max() <= ONNX_ATOL == 1e-4


def _real_subset(name: str, root: Path, cases: int = 8) -> Path:
    """The first `cases` training cases of a real MSD dataset (linked, not copied)."""
    source = shared_dataset(name)
    meta = json.loads((source / "dataset.json").read_text())
    meta["training"], meta["numTraining"] = meta["training"][:cases], cases
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
        for case in meta["training"]:
            path = source / folder / Path(case["image"]).name
            (root / folder / path.name).symlink_to(path)
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Task04_Hippocampus", "BraTS2018_WT_2mm"])
def test_bundle_of_a_real_run_predicts_like_medseg_where_medseg_is_not_installed(name, python_without_medseg, tmp_path):
    """Real data: hippocampus (1 channel, 3 classes) and BraTS at 2 mm (FLAIR + T1, whole tumour)."""
    dataset = _real_subset(name, tmp_path / "data")
    run_dir = _train(dataset, tmp_path / "run", "data=msd")  # the dataset's median spacing
    channels = len(json.loads((dataset / "dataset.json").read_text())["modality"])
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in sorted((dataset / "imagesTr").iterdir())[-2:]:
        (inputs / path.name).symlink_to(path)
    bundle = _export(run_dir, tmp_path / "bundle", channels)
    args = [x for k, v in _bundle_args(bundle, inputs, tmp_path / "bundle_out").items() for x in (f"--{k}", v)]
    result = _run([python_without_medseg, "-m", "monai.bundle", "run", *args], cwd=tmp_path)
    assert result.returncode == 0, output(result)
    _assert_same_masks(run_dir, inputs, tmp_path / "bundle_out", tmp_path)


@pytest.mark.parametrize("modality", ["MRI", "CT"])
def test_bundle_preprocessing_equals_medseg(modality, tmp_path):
    """The bundle's MONAI transforms give the tensors and transform records medseg's `preprocess` gives."""
    src = _odd_case(tmp_path, 1)
    info = {"net": {"in_channels": 1}, "spacing": [1.7, 1.5, 2.4], "modality": modality, "patch_size": [32, 24, 16],
            "ct_window": [20.0, 150.0], "label_names": ["background", "a"]}  # fmt: skip
    model = TrainedModel(tmp_path / "x.ckpt", torch.nn.Identity(), info, [], [], 4, 0.5)
    parser = ConfigParser(inference_config(model))
    ours = parser.get_parsed_content("preprocessing")({"image": str(src)})["image"]
    theirs = preprocess(info["spacing"], modality, info["patch_size"], info["ct_window"], with_label=False)
    want = theirs({"image": str(src)})["image"]
    assert torch.equal(ours.as_tensor(), want.as_tensor()) and torch.equal(ours.affine, want.affine)
    assert [op["class"] for op in ours.applied_operations] == [op["class"] for op in want.applied_operations]


def test_bundle_inferer_computes_medseg_sliding_window_probs_bit_for_bit():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, 3, 3, padding=1)  # random kernels: flips change the output
    image = torch.randn(1, 2, 21, 17, 12)
    for axes in ([], [0, 2]):
        inferer = bundle_runtime.MirroredSlidingWindowInferer((8, 8, 8), sw_batch_size=2, overlap=0.5, mirror_axes=axes)
        with torch.no_grad():
            want = sliding_window_probs(net, image, (8, 8, 8), 2, 0.5, mirror_axes=axes, dtype=torch.float32)
            assert torch.equal(inferer(image, net), want)
    with pytest.raises(ValueError, match="spatial axes"):
        bundle_runtime.MirroredSlidingWindowInferer((8, 8, 8), mirror_axes=[3])


def test_bundle_runtime_imports_only_torch_and_monai():
    """scripts/runtime.py runs inside the bundle, where medseg is not installed (ONNX Runtime: ONNX bundles only)."""
    tree = ast.parse(Path(bundle_runtime.__file__).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"torch", "monai", "itertools", "collections", "onnxruntime"}, roots


NETS = {  # conf/model/*.yaml nets, shrunk
    "unet": (
        {
            "_target_": "monai.networks.nets.UNet",
            "spatial_dims": 3,
            "channels": [8, 16, 32],
            "strides": [2, 2],
            "num_res_units": 1,
            "norm": "INSTANCE",
        },
        "script",
        32,
    ),  # fmt: skip
    "dynunet": (
        {
            "_target_": "medseg.models.dynunet.build_dynunet",
            "patch_size": [32] * 3,
            "spacing": [1, 1, 1],
            "filters": [8, 16, 32, 64],
        },
        "trace",
        32,
    ),  # fmt: skip
    "segresnet": (
        {"_target_": "monai.networks.nets.SegResNet", "spatial_dims": 3, "init_filters": 8, "norm": "INSTANCE"},
        "script",
        32,
    ),  # fmt: skip
    "swinunetr": (
        {
            "_target_": "monai.networks.nets.SwinUNETR",
            "spatial_dims": 3,
            "feature_size": 12,
            "depths": [1, 1, 1, 1],
            "window_size": 4,
            "use_v2": False,
        },
        "trace",
        64,
    ),  # fmt: skip
}


SLOW = pytest.mark.slow


@pytest.mark.parametrize("name", ["unet", pytest.param("dynunet", marks=SLOW), pytest.param("segresnet", marks=SLOW),
                                  pytest.param("swinunetr", marks=SLOW)])  # fmt: skip
def test_torchscript_scripts_or_traces_each_model(name):
    """UNet and SegResNet script; DynUNet and SwinUNETR (MONAI #6823) only trace; the module equals the net."""
    config, how, size = NETS[name]
    net = instantiate({**config, "in_channels": 2, "out_channels": 3}).eval()
    example = torch.randn(2, 2, size, size, size)
    module, used = to_torchscript(net, example)
    assert used == how
    with torch.no_grad():
        torch.testing.assert_close(module(example[1:]), net(example[1:]), atol=1e-4, rtol=0)


def test_export_refuses_a_folder_that_is_not_empty_and_an_ensemble(one_channel_run, tmp_path, capsys):
    _, run_dir = one_channel_run
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        export_main([str(run_dir), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 1 and "not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    runs = tmp_path / "runs"
    runs.mkdir()
    for fold in ("0", "1"):
        (runs / fold).symlink_to(run_dir)
    with pytest.raises(SystemExit):
        export_main([str(runs), "--out", str(tmp_path / "ensemble")])
    err = capsys.readouterr().err
    assert "2 checkpoints (an ensemble)" in err and err.count("\n") == 1 and not (tmp_path / "ensemble").exists()
    # a low-precision net is a TorchScript export; ONNX stays FP32: one line, nothing written
    with pytest.raises(SystemExit):
        export_main([str(run_dir), "--format", "onnx", "--dtype", "bf16", "--out", str(tmp_path / "onnx_bf16")])
    err = capsys.readouterr().err
    assert "--dtype bf16 is for --format bundle" in err and err.count("\n") == 1
    assert not (tmp_path / "onnx_bf16").exists()

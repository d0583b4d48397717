"""Precision telemetry and run review: PrecisionMonitor under each precision, the W&B offline files of a real
run with an injected overflow, the W&B failure fallback, medseg.report and the review notebook."""

import math
import warnings

import lightning.pytorch as pl
import nbformat
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader

from medseg import REPO_ROOT
from medseg.data.synthetic import write_synthetic_dataset
from medseg.precision.advisor import PrecisionAdvisor
from medseg.precision.masters import Masters
from medseg.precision.monitor import PrecisionMonitor
from medseg.precision.plugin import MasterWeightPrecision
from medseg.precision.scaler import DynamicLossScaler
from medseg.report import main as report_main
from medseg.tracking.loggers import SafeWandbLogger, make_loggers
from medseg.tracking.offline import read_offline_run
from medseg.tracking.runs import load_run, summary_rows

from .helpers import TINY, TINY_UNET, on_dataset, output, run_cli

NOTEBOOK = REPO_ROOT / "notebooks" / "review_runs.ipynb"
INJECTED_STEP = 2
SECRET = "secret-value-0123456789abcdef"


class InjectOverflow(pl.Callback):
    """Multiplies the loss of global step `step` by 1e30: still finite in FP32 (so not a NaN-loss step), but
    its gradients overflow FP16 at any loss scale above ~1e-26."""

    def __init__(self, step: int = INJECTED_STEP) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        original = pl_module.training_step

        def huge_loss(*args, **kwargs):
            del pl_module.training_step  # back to the class's method after this one call
            return original(*args, **kwargs) * 1e30

        pl_module.training_step = huge_loss


class TinySeg(pl.LightningModule):
    """A two-conv 3D net on random 8^3 volumes: seconds for a few steps in any precision."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.PReLU(),
                                 nn.Conv3d(4, 2, 1))  # fmt: skip
        self.loss_fn = nn.CrossEntropyLoss()

    def training_step(self, batch, batch_idx):
        loss = self.loss_fn(self.net(batch["image"]).float(), batch["label"])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = [{"image": torch.randn(1, 8, 8, 8, generator=g), "label": torch.randint(0, 2, (8, 8, 8), generator=g)}
                for _ in range(16)]  # fmt: skip
        return DataLoader(data, batch_size=2)


def fit_tiny(tmp_path, max_steps=4, callbacks=(), monitor=None, **trainer_kwargs):
    """Fit TinySeg with a PrecisionMonitor (costly metrics every 2nd step); the run as `medseg.report` reads it."""
    monitor = monitor or PrecisionMonitor(every_n_steps=2)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=CSVLogger(tmp_path, name="csv", version=""),
        callbacks=[monitor, *callbacks], log_every_n_steps=2, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, **trainer_kwargs,
    )  # fmt: skip
    torch.manual_seed(0)
    trainer.fit(TinySeg())
    return monitor, load_run(tmp_path)


SCALE_KEYS = ["precision/loss_scale", "precision/overflow", "precision/skipped_steps"]
LOW_KEYS = ["precision/grad_zero_frac", "precision/fp16_headroom_bits"]  # on costly steps
EVERY_STEP = ["precision/grad_norm", "precision/nan_steps", "precision/step_time", "precision/throughput",
              "precision/peak_memory_mb"]  # fmt: skip


def test_monitor_fp32_logs_no_scale_fields_and_warns_near_fp16_max(tmp_path):
    monitor = PrecisionMonitor(every_n_steps=2, warn_headroom_bits=100)  # every layer is "close": must warn
    with pytest.warns(UserWarning, match=r"closest to the FP16 maximum 65504: net\.\d"):
        monitor, run = fit_tiny(tmp_path, monitor=monitor, precision="32-true")
    for key in EVERY_STEP:
        assert list(run.get(key)[0]) == [0, 1, 2, 3], key  # every step, at Lightning's train/loss steps
    assert list(run.get("train/loss")[0]) == [1, 3]
    assert list(run.get("precision/act_absmax")[0]) == [1, 3]  # costly metrics on every 2nd step only
    assert not any(run.has(k) for k in SCALE_KEYS + LOW_KEYS + ["precision/update_lost_frac"])
    assert (run.get("precision/grad_norm")[1] > 0).all() and (run.get("precision/nan_steps")[1] == 0).all()
    assert set(monitor.layer_absmax) == {"net.0", "net.1", "net.2", "net.3"}
    assert all(math.isfinite(a) and math.isfinite(g) for a, g in monitor.layer_absmax.values())


def test_monitor_bf16_amp_has_low_precision_metrics_but_no_scaler(tmp_path):
    _, run = fit_tiny(tmp_path, precision="bf16-mixed")
    assert not any(run.has(k) for k in SCALE_KEYS)  # bf16 autocast runs without a GradScaler
    for key in LOW_KEYS + ["precision/update_lost_frac"]:
        assert list(run.get(key)[0]) == [1, 3], key
    assert ((0 <= run.get("precision/update_lost_frac")[1]) & (run.get("precision/update_lost_frac")[1] <= 1)).all()
    # Adam moves each weight by about lr = 1e-3, close to half a bf16 ulp of weights ~0.1-0.5: a good share of
    # the updates would vanish in bf16 weights, which is what the FP32 weights rescue
    assert 0.05 < run.last("precision/update_lost_frac") < 0.95


def test_monitor_gradscaler_overflow(tmp_path):
    """Lightning's 16-mixed plugin with torch's GradScaler (on CPU, where Lightning would pick bf16 itself)."""
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))
    _, run = fit_tiny(tmp_path, plugins=[plugin], callbacks=[InjectOverflow()])
    steps, scale = run.get("precision/loss_scale")
    assert list(steps) == [0, 1, 2, 3] and list(scale) == [2.0**16, 2.0**16, 2.0**15, 2.0**15]
    assert list(run.get("precision/overflow")[1]) == [0, 0, 1, 0]
    assert list(run.get("precision/skipped_steps")[1]) == [0, 0, 1, 1]


def test_update_lost_frac_counts_updates_a_low_precision_weight_would_not_show():
    """FP16 has 10 mantissa bits: next to 1.0 its spacing is 2^-10, so a step under half of that (4.9e-4)
    leaves an FP16 weight unchanged while the FP32 master keeps it."""
    monitor = PrecisionMonitor()
    monitor._low = torch.float16
    before = torch.ones(4)
    master = torch.tensor([1.0 + 1e-5, 1.0 + 1e-2, 1.0, 1.0 + 4e-4])  # lost, kept, not moved, lost
    assert monitor._update_lost_frac([([master], before)]).item() == pytest.approx(2 / 3)


class PluginGradNorm(pl.Callback):
    """The plugin's own `track_grad_norm` value after each step: the unscaled FP32 norm to compare with."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "grad_norm" in trainer.precision_plugin.last_step:
            self.norms[trainer.global_step - 1] = float(trainer.precision_plugin.last_step["grad_norm"])


def test_monitor_mixed_fp16_plugin(tmp_path):
    plugin = MasterWeightPrecision("float16", scaler=DynamicLossScaler(init_scale=2.0**16), track_grad_norm=True)
    norms = PluginGradNorm()
    monitor, run = fit_tiny(tmp_path, plugins=[plugin], callbacks=[InjectOverflow(), norms], max_steps=6)
    assert list(run.get("precision/loss_scale")[1]) == [2.0**16] * 2 + [2.0**15] * 4
    assert list(run.get("precision/overflow")[1]) == [0, 0, 1, 0, 0, 0]
    assert monitor.skipped_steps == 1 and monitor.totals()["final_loss_scale"] == 2.0**15
    assert run.last("precision/nan_steps") == 0  # the injected loss is huge, not NaN
    # the unscaled norm, as the plugin computes it; no gradient step, so no norm, on the skipped step
    steps, logged = run.get("precision/grad_norm")
    assert INJECTED_STEP not in steps and set(steps) == set(norms.norms)
    np.testing.assert_allclose(logged, [norms.norms[s] for s in steps], rtol=1e-5)
    assert list(run.get("precision/grad_zero_frac")[0]) == [1, 3, 5]
    assert list(run.get("precision/update_lost_frac")[0]) == [1, 3, 5]
    assert ((0 <= run.get("precision/update_lost_frac")[1]) & (run.get("precision/update_lost_frac")[1] < 1)).all()
    headroom = run.get("precision/fp16_headroom_bits")[1]
    assert (headroom > 0).all() and (headroom < 17 + 16).all()


@pytest.mark.parametrize("advisor_every, copied_steps, shared_steps", [(2, [1, 3, 5], 3), (3, [1, 2, 3, 5], 1)])
def test_monitor_and_advisor_copy_the_masters_once_a_step(
    tmp_path, monkeypatch, advisor_every, copied_steps, shared_steps
):
    """The monitor (every 2nd step: 1, 3, 5) and the advisor's lost-update sampling (every `advisor_every`-th)
    read one copy of the masters per step: on a step where both sample, the same tensor, not two copies."""
    copies: list[int] = []
    # the copies themselves, kept alive to the end: a freed copy's address is reused by the next step's copy, so
    # comparing addresses of copies from different steps would find "one copy" where there were two
    monitor_copies: list[torch.Tensor] = []
    advisor_copies: list[list[torch.Tensor]] = []
    snapshot, frac, record = Masters.snapshot, PrecisionMonitor._update_lost_frac, PrecisionAdvisor.record_lost_updates

    def counted(self: Masters):
        copies.append(self.before_step is None)
        return snapshot(self)

    def monitor_frac(self, pairs):
        monitor_copies.extend(before for _, before in pairs)
        return frac(self, pairs)

    def advisor_record(self, names, before, after, dtype):
        advisor_copies.append(list(before))
        return record(self, names, before, after, dtype)

    monkeypatch.setattr(Masters, "snapshot", counted)
    monkeypatch.setattr(PrecisionMonitor, "_update_lost_frac", monitor_frac)
    monkeypatch.setattr(PrecisionAdvisor, "record_lost_updates", advisor_record)
    advisor = PrecisionAdvisor(lost_update_every=advisor_every)
    _, run = fit_tiny(tmp_path, plugins=[MasterWeightPrecision("bfloat16", advisor=advisor)], max_steps=6)
    assert sum(copies) == len(copied_steps)  # a copy on each step someone samples, one only
    # every copy is still alive, so one storage means one copy
    monitor_storages = {b.untyped_storage().data_ptr() for b in monitor_copies}
    advisor_storages = [{b.untyped_storage().data_ptr() for b in a} for a in advisor_copies]
    assert sum(len(a) == 1 and a <= monitor_storages for a in advisor_storages) == shared_steps
    assert list(run.get("precision/update_lost_frac")[0]) == [1, 3, 5]
    assert advisor.lost_updates and all(0 <= share <= 1 for share in advisor.lost_updates.values())


# ---------------------------------------------------------------------------------------- a real CLI run
@pytest.fixture(scope="module")
def wandb_run_dir(tmp_path_factory):
    """`python -m medseg.train` with W&B offline, FP16 weights with FP32 masters, an overflow injected at step 2
    and an API key in the environment: one epoch of 5 steps (16^3 patches of 5 small volumes), one validation
    case. FP16 convolutions are slow on CPU, hence the small sizes."""
    tmp = tmp_path_factory.mktemp("telemetry")
    dataset = write_synthetic_dataset(tmp / "synthetic", num_cases=6, min_size=24, max_size=28)
    run_dir = tmp / "run"
    overrides = [o for o in TINY if not o.startswith(("logger=", "data.patch_size=", "data.batch_size="))]
    result = run_cli(
        *overrides, *TINY_UNET, "logger=wandb", "trainer.max_epochs=1",
        "data.patch_size=[16,16,16]", "data.batch_size=1", *on_dataset(dataset, tmp / "cache"),
        f"hydra.run.dir={run_dir}", "+precision=mixed",
        "precision.plugin.dtype=float16", "trainer.log_every_n_steps=2", "test=false",
        "callbacks.val_images.every_n_val_epochs=1",
        "+callbacks.inject_overflow._target_=tests.test_telemetry.InjectOverflow",
        env={"WANDB_MODE": "offline", "WANDB_API_KEY": SECRET, "WANDB_SILENT": "true"},
        cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, output(result)
    return run_dir


def test_wandb_offline_files_hold_scale_overflow_and_config(wandb_run_dir):
    run = read_offline_run(wandb_run_dir)
    scale = {
        int(r["trainer/global_step"]): r["precision/loss_scale"] for r in run.history if "precision/loss_scale" in r
    }
    overflow = {
        int(r["trainer/global_step"]): r["precision/overflow"] for r in run.history if "precision/overflow" in r
    }
    assert sorted(scale) == list(range(5))
    assert scale[INJECTED_STEP] == scale[INJECTED_STEP - 1] / 2 == 2.0**15
    assert [overflow[s] for s in range(5)] == [0, 0, 1, 0, 0]
    assert run.config["data"]["patch_size"] == [16, 16, 16]
    assert run.config["precision"]["plugin"]["dtype"] == "float16"
    # identity from the Hydra job, one x-axis for the precision metrics
    assert run.group == "train" and run.job_type == "train" and run.name.startswith("run ")
    assert "precision=mixed" in run.tags and "model=UNet" in run.tags
    assert run.metrics["precision/*"] == "trainer/global_step" and run.metrics["val/*"] == "trainer/global_step"
    # summary, the ready-made loss-scale panel, validation images with both masks
    assert run.summary["summary/skipped_steps"] == 1 and run.summary["summary/final_loss_scale"] == 2.0**15
    assert 0 <= run.summary["summary/best_val_dice"] <= 1 and run.summary["summary/mean_step_time_s"] > 0
    assert run.summary["val/dice"]["max"] == pytest.approx(run.summary["summary/best_val_dice"])
    panel = run.config["_wandb"]["visualize"]["precision/loss_scale_chart"]
    assert panel["panel_config"]["panelDefId"] == "wandb/lineseries/v0"
    images = [r for r in run.history if r.get("val/examples/_type") == "images/separated"]
    assert len(images) == 1 and images[0]["val/examples/count"] == 1  # one validation pass of one case
    masks = images[0]["val/examples/all_masks"][0]
    assert set(masks) == {"ground_truth", "prediction"}
    labels = run.config["_wandb"]["mask/class_labels"]
    assert {k: v["value"] for k, v in labels.items()} == {
        f"val/examples_wandb_delimeter_{m}": {"0": "background", "1": "organ", "2": "tumour"} for m in masks
    }
    assert any(r.get("precision/layers/act_absmax_log2/_type") == "histogram" for r in run.history)


def test_api_key_is_never_written(wandb_run_dir):
    leaked = [p for p in wandb_run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_report_from_csv_and_from_wandb_files(wandb_run_dir, tmp_path):
    md = report_main([str(wandb_run_dir), "--out", str(tmp_path)])
    assert {p.name for p in tmp_path.glob("*.png")} == {"loss_scale.png", "training.png", "precision.png",
                                                        "performance.png"}  # fmt: skip
    text = md.read_text()
    assert "| run | steps |" in text and "[mixed (float16)]" in text
    row = summary_rows([load_run(wandb_run_dir)])[0]
    assert row["skipped steps"] == 1 and row["final loss scale"] == 2.0**15 and row["steps"] == 5
    # without the CSV, the same curves come from the W&B transaction log
    only_wandb = tmp_path / "only_wandb"
    only_wandb.mkdir()
    (only_wandb / "wandb").symlink_to(wandb_run_dir / "wandb")
    from_wandb, from_csv = load_run(only_wandb), load_run(wandb_run_dir)
    assert from_wandb.source == "wandb-offline" and from_wandb.precision == "mixed (float16)"
    for key in ("precision/loss_scale", "precision/overflow", "train/loss"):
        np.testing.assert_array_equal(from_wandb.get(key)[0], from_csv.get(key)[0])
        np.testing.assert_allclose(from_wandb.get(key)[1], from_csv.get(key)[1], rtol=1e-6)


def test_notebook_runs_on_the_run(wandb_run_dir, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = f"run_dirs = [{str(wandb_run_dir)!r}]\nwandb_paths = []\ncase_index = 0"
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # loss scale, training, precision, performance, the case slices


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


# ---------------------------------------------------------------------------------------- W&B failures
def test_wandb_init_failure_falls_back_to_csv(tiny_cfg, monkeypatch):
    import wandb

    def broken_init(*args, **kwargs):
        raise wandb.errors.CommError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny_cfg("logger=wandb", "~logger.csv")  # W&B alone: the CSV logger must be added
    with pytest.warns(UserWarning, match="W&B could not start.*CommError.*CSV only"):
        loggers = make_loggers(cfg)
    assert [type(lg) for lg in loggers] == [CSVLogger]


def test_wandb_mode_disabled_means_no_wandb_logger(tiny_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # Lightning's offline=True would turn it into "dryrun"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loggers = make_loggers(tiny_cfg("logger=wandb"))
    assert [type(lg) for lg in loggers] == [CSVLogger]


def test_wandb_failure_during_the_run_warns_once(tmp_path):
    class BrokenRun:
        def log(self, *args, **kwargs):
            raise OSError(28, "No space left on device")

    logger = SafeWandbLogger(save_dir=str(tmp_path), experiment=BrokenRun())
    with pytest.warns(UserWarning, match="No space left on device"):
        logger.log_metrics({"train/loss": 1.0}, step=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second failure is silent
        logger.log_metrics({"train/loss": 1.0}, step=1)
        logger.log_data({"x": 1}, step=1)
    assert logger.broken


def test_run_identity_of_a_multirun_job():
    """A sweep is one W&B group, each job one run named by its number and overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from medseg import CONF_DIR
    from medseg.tracking.loggers import run_identity

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["+precision=amp", "seed=3", "tags=[study]"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.job.num = 3
        cfg.hydra.job.override_dirname = "+precision=amp,seed=3"
        cfg.hydra.sweep.dir = "/logs/train/multiruns/2026-01-02_03-04-05"
        cfg.paths.output_dir = "/logs/train/multiruns/2026-01-02_03-04-05/3"
    HydraConfig.instance().set_config(cfg)
    try:
        identity = run_identity(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert identity == {
        "name": "3: +precision=amp,seed=3",
        "group": "train-2026-01-02_03-04-05",
        "tags": ["study", "precision=amp", "model=UNet", "data=synthetic", "multirun"],
        "job_type": "train-sweep",
    }

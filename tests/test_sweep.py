"""Sweeps and scale-out: Hydra multiruns on tiny data in subprocesses (W&B runs per job, the summary table, a
failing job, an Optuna study), DDP on 2 CPU processes, and the SLURM launcher's sbatch script without a cluster."""

import csv
import itertools
import json
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from medseg import CONF_DIR
from medseg.tracking.offline import read_offline_run

from .helpers import TINY, TINY_UNET, on_dataset, output, run_cli


def _sweep(name: str) -> str:
    return f"sweep={name}"  # conf/train.yaml lists `sweep: null` in its defaults


def _train(args: list[str], dataset: Path, tmp_path: Path, multirun: bool = False) -> subprocess.CompletedProcess:
    """`python -m medseg.train [-m]` for one epoch on the tiny dataset, logs under tmp_path/logs, W&B offline."""
    result = run_cli(
        *(["-m"] if multirun else []),
        *TINY,
        *TINY_UNET,
        *on_dataset(dataset, tmp_path / "cache"),
        f"paths.log_dir={tmp_path / 'logs'}",
        "trainer.max_epochs=1",
        "test=false",
        *args,
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"},
        timeout=240,
        cwd=tmp_path,
    )
    assert result.returncode == 0, output(result)
    return result


def _compose(overrides: list[str]) -> DictConfig:
    """conf/train.yaml with its `hydra` node."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _summary(sweep_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((sweep_dir / "summary.csv").open()))


@pytest.fixture(scope="module")
def two_job_sweep(tiny_dataset, tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("multirun")
    sweep_dir = tmp_path / "sweep"
    args = ["logger=wandb", f"hydra.sweep.dir={sweep_dir}", "model.optimizer.lr=0.01,0.02"]
    _train(args, tiny_dataset, tmp_path, multirun=True)
    return sweep_dir


def test_multirun_jobs_and_summary(two_job_sweep):
    """Two jobs: two output dirs each with config, checkpoints and its own W&B run; one summary with two rows."""
    for job in ("0", "1"):
        assert (two_job_sweep / job / ".hydra" / "config.yaml").is_file()
        assert (two_job_sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert len(list((two_job_sweep / job / "wandb").glob("offline-run-*"))) == 1
    rows = _summary(two_job_sweep)
    assert [r["job"] for r in rows] == ["0", "1"]
    assert [r["overrides"] for r in rows] == ["model.optimizer.lr=0.01", "model.optimizer.lr=0.02"]
    assert all(r["status"] == "ok" and 0.0 <= float(r["best_val_dice"]) <= 1.0 for r in rows), rows
    assert "model.optimizer.lr=0.02" in (two_job_sweep / "summary.md").read_text()
    assert all(r["step_time_s"] and r["peak_memory_mb"] and r["skipped_steps"] == "0" for r in rows), rows


def test_multirun_wandb_group(two_job_sweep):
    """All jobs of a sweep are in one W&B group (named after the sweep)."""
    runs = [read_offline_run(two_job_sweep / job) for job in ("0", "1")]
    assert runs[0].path.name != runs[1].path.name  # run-<id>.wandb: two runs
    assert runs[0].group and runs[0].group == runs[1].group, [r.group for r in runs]


def test_failed_job_does_not_stop_sweep(tiny_dataset, tmp_path):
    """Job 0 has an invalid learning rate and fails at start; job 1 still runs; the summary says which and why."""
    sweep_dir = tmp_path / "sweep"
    _train([f"hydra.sweep.dir={sweep_dir}", "model.optimizer.lr=-1,0.01"], tiny_dataset, tmp_path, multirun=True)
    failed, ok = _summary(sweep_dir)
    assert failed["status"] == "failed" and "model.optimizer.lr" in failed["error"], failed
    assert failed["overrides"] == "model.optimizer.lr=-1"
    assert ok["status"] == "ok" and ok["best_val_dice"], ok
    result = json.loads((sweep_dir / "0" / "job_result.json").read_text())
    assert "Traceback" in result["traceback"]


def test_optuna_sweep_stores_study_and_best_trial(tiny_dataset, tmp_path):
    """sweep=optuna: 2 trials (batch and patch size fixed by the TINY overrides), the best of them in
    optimization_results.yaml; a second run adds its (failing) trial to the same SQLite study."""
    optuna = pytest.importorskip("optuna")  # the `sweep` extra: pip install -e .[sweep]
    sweep_dir = tmp_path / "sweep"
    args = [_sweep("optuna"), f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.n_trials=2"]
    _train(args, tiny_dataset, tmp_path, multirun=True)
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    rows = _summary(sweep_dir)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows), rows
    assert best.best_value == pytest.approx(max(float(r["best_val_dice"]) for r in rows))
    assert set(best.best_params) == {"model.optimizer.lr", "precision.plugin.scaler.growth_interval"}

    # the same command again resumes the study; a trial whose job fails is marked failed and the sweep goes on
    resumed = [_sweep("optuna"), f"hydra.sweep.dir={tmp_path / 'resumed'}", "hydra.sweeper.n_trials=1"]
    _train([*resumed, "model.optimizer.lr=-1"], tiny_dataset, tmp_path, multirun=True)
    assert _summary(tmp_path / "resumed")[0]["status"] == "failed"
    storage = f"sqlite:///{tmp_path / 'logs' / 'optuna' / 'train-synthetic-unet.db'}"
    study = optuna.load_study(study_name="train-synthetic-unet", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL"]


@pytest.mark.parametrize(
    "precision",
    [
        "mixed",
        pytest.param("fp32", marks=pytest.mark.slow),
        pytest.param("amp", marks=pytest.mark.slow),
        pytest.param("bf16", marks=pytest.mark.slow),
        pytest.param("mixed_bf16", marks=pytest.mark.slow),
    ],
)
def test_ddp_two_cpu_processes(precision, tiny_dataset, tmp_path):
    """trainer=ddp on 2 CPU processes (gloo): Lightning re-runs the command for rank 1 into the same run dir;
    one W&B run and the checkpoints come from rank 0; val/dice (MONAI's metric gathers both ranks' cases, and
    the module logs it with sync_dist) is logged once."""
    run_dir = tmp_path / "run"
    result = _train(
        [
            "logger=wandb",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            f"+precision={precision}",
            f"hydra.run.dir={run_dir}",
        ],
        tiny_dataset,
        tmp_path,
    )
    out = result.stdout + result.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out and "distributed_backend=gloo" in out
    assert (run_dir / "train_ddp_process_1.log").is_file()  # rank 1's Hydra log, in the same directory
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").glob("**/.hydra")), "extra run dirs"
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    result = json.loads((run_dir / "job_result.json").read_text())
    assert result["status"] == "ok" and 0.0 <= result["best_val_dice"] <= 1.0, result
    metrics = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    assert sum(1 for m in metrics if m["val/dice"]) == 1  # one validation row: only rank 0 writes metrics


def test_slurm_launcher_sbatch(tmp_path, monkeypatch):
    """hydra/launcher=slurm composed with a 2-node, 4-GPU DDP trainer: the sbatch script submitit would submit
    asks for one task per GPU on each node, the time, partition and the requeue signal Lightning listens to."""
    submitit = pytest.importorskip("submitit")  # the `sweep` extra
    overrides = [
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=600",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    cfg = _compose(overrides)
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 4 and cfg.trainer.strategy == "ddp"

    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    executors = []

    def capture(executor, fn, *args):  # instead of submitting
        executors.append(executor)
        raise RuntimeError("not submitted")

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # pretend srun exists
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    with pytest.raises(RuntimeError, match="not submitted"):
        launcher.launch([["model.optimizer.lr=0.001"], ["model.optimizer.lr=0.003"]], initial_job_idx=0)
    sbatch = executors[0]._executor._make_submission_file_text("python -m medseg.train", "uid")
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=600",
        "#SBATCH --partition=gpu",
        "#SBATCH --signal=USR1@120",
        "#SBATCH --mem=64GB",
        "#SBATCH --cpus-per-task=8",
        f"#SBATCH --job-name={cfg.hydra.job.name}",
    ]:
        assert line in sbatch.splitlines(), (line, sbatch)
    assert executors[0]._executor.max_num_timeout == 0  # Lightning requeues, not submitit


def _jobs(preset: str) -> list[DictConfig]:
    """The composed config of every job the preset's sweeper launches (Hydra's own parser expands the values)."""
    params = _compose([_sweep(preset)]).hydra.sweeper.params
    axes = [[f"{key}={value}" for value in OverridesParser.create().parse_override(f"{key}={values}").sweep_iterator()]
            for key, values in params.items()]  # fmt: skip
    return [_compose([_sweep(preset), *job]) for job in itertools.product(*axes)]


def _without(cfg: DictConfig, *keys: str) -> dict:
    plain = OmegaConf.to_container(cfg, resolve=False)
    return {k: v for k, v in plain.items() if k not in ("hydra", *keys)}


def test_sweep_presets():
    """sweep=precision: one job per precision mode (fp32 weights, Lightning's autocast, medseg's plugin), equal in
    everything else (seed, data, steps); sweep=lr: a learning-rate grid, equal in everything else."""
    jobs = _jobs("precision")
    assert [job.precision.name for job in jobs] == ["fp32", "amp", "mixed"]
    assert [job.precision.get("lightning") for job in jobs] == ["32-true", "16-mixed", None]
    assert jobs[2].precision.plugin._target_.endswith("MasterWeightPrecision")
    assert all(_without(job, "precision") == _without(jobs[0], "precision") for job in jobs)
    assert jobs[0].hydra.sweep.dir.endswith("_precision")  # the W&B group name says which sweep it was
    lrs = _jobs("lr")
    assert len({job.model.optimizer.lr for job in lrs}) == len(lrs) >= 3
    assert all(_without(job, "model") == _without(lrs[0], "model") for job in lrs)
    assert all({**job.model, "optimizer": None} == {**lrs[0].model, "optimizer": None} for job in lrs)
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = _compose([_sweep("optuna")])
    assert cfg.precision.name == "mixed" and cfg.hydra.sweeper.direction == "maximize"
    assert cfg.hydra.sweeper.storage.endswith("/optuna/train-synthetic-unet.db")

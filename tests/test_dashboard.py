"""W&B dashboards without a server: the workspace and report specs (validated by wandb-workspaces' own models) name
only keys that a real offline run of the main job logged; the model and dataset artifacts and the per-case table are
in the run's records; a missing wandb-workspaces or a failing save warns once and training goes on."""

import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from medseg.dashboard import main as dashboard_main
from medseg.evaluate import evaluate
from medseg.tracking.artifacts import fingerprint, model_artifact
from medseg.tracking.case_table import EvaluationTable
from medseg.tracking.dashboard import panel_keys
from medseg.tracking.loggers import SafeWandbLogger
from medseg.tracking.offline import OfflineRun, iter_records, read_offline_run
from medseg.tracking.views import WORKSPACE_FILE, read_workspace, save_workspace
from medseg.tracking.workspace_callback import WandbWorkspace

from .helpers import TINY, TINY_UNET, on_dataset, output, run_cli

SECTIONS = ["Accuracy", "Precision", "Speed and memory", "Sweeps"]


def wandb_env(tmp_path: Path) -> dict[str, str]:
    # artifact staging and cache under tmp_path, not the user's ~/.local/share/wandb
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
            "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "HYDRA_FULL_ERROR": "1"}  # fmt: skip


@pytest.fixture(scope="module")
def mixed_run(tiny_dataset, tmp_path_factory) -> Path:
    """`python -m medseg.train +precision=mixed` on tiny data, W&B offline, tested after training: the run dir."""
    tmp_path = tmp_path_factory.mktemp("dashboard")
    run_dir = tmp_path / "run"
    result = run_cli(
        *TINY, *TINY_UNET, *on_dataset(tiny_dataset, tmp_path / "cache"),
        "logger=wandb", "trainer.max_epochs=1", "+precision=mixed",
        f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={run_dir}",
        env=wandb_env(tmp_path), timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, output(result)
    return run_dir


def logged(run: OfflineRun) -> set[str]:
    """Every key the run logged (history and summary), media and tables by their own key (`test/cases`)."""
    keys = {k for row in run.history for k in row} | set(run.summary)
    return keys | {k.rsplit("/", 1)[0] for k in keys if k.endswith("/_type")}


def in_config(config: dict, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def missing_keys(panel_key_list: list[str], run: OfflineRun) -> list[str]:
    keys = logged(run)
    return [
        k for k in panel_key_list
        if not (in_config(run.config, k.removeprefix("config:")) if k.startswith("config:") else k in keys)
    ]  # fmt: skip


def artifacts(run_dir: Path) -> list:
    return [
        r.artifact for r in iter_records(read_offline_run(run_dir).path) if r.WhichOneof("record_type") == "artifact"
    ]


def table_json(run_dir: Path, key: str) -> dict:
    """The table logged under `key`, as the run's table artifact (what `wandb sync` uploads) holds it."""
    name = key.replace("/", "")
    for artifact in artifacts(run_dir):
        if artifact.type == "run_table" and artifact.name.split("-")[2] == name:
            entry = next(e for e in artifact.manifest.contents if e.path == f"{key}.table.json")
            return json.loads(Path(entry.local_path).read_text())
    raise AssertionError(f"no table {key} in {run_dir}")


def test_workspace_panels_show_keys_the_run_logged(mixed_run):
    """The spec the run wrote validates with wandb-workspaces' model, has the four sections, and every panel's key
    is one the same run logged: no panel is empty after `wandb sync`."""
    space = read_workspace(mixed_run)  # pydantic validation of the saved view
    assert [s.name for s in space.sections] == SECTIONS
    run = read_offline_run(mixed_run)
    panels = [p for s in space.sections for p in s.panels]
    assert len(panels) >= 25
    for panel in panels:
        keys = panel_keys(panel)
        assert keys or type(panel).__name__ == "RunComparer", panel
        assert not missing_keys(keys, run), f"{type(panel).__name__} {getattr(panel, 'title', '')}: " + ", ".join(
            missing_keys(keys, run)
        )
    columns = [c.split(":", 1)[1] for c in space.runset_settings.pinned_columns if c.startswith("summary:")]
    assert len(columns) == 4 and not missing_keys(columns, run)  # the runs table's pinned summary columns
    shown = {k for p in panels for k in panel_keys(p)}
    # per-class panels come from the run's own classes
    assert {"val/dice/organ", "val/dice/tumour", "test/hd95/tumour", "test/cases", "precision/plan"} <= shown


def test_dashboard_print_lists_sections_panels_and_keys(mixed_run, capsys):
    dashboard_main(["--print", str(mixed_run)])
    out = capsys.readouterr().out
    for name in SECTIONS:
        assert f"\n  {name}\n" in out
    assert "precision/loss_scale_chart_table" in out and "val/dice/tumour" in out and "summary/best_val_dice" in out
    with pytest.raises(SystemExit, match="needs --entity"):  # offline: nowhere to save without an entity
        dashboard_main([str(mixed_run)])


def test_model_and_dataset_artifacts_in_the_offline_run(mixed_run, tiny_dataset):
    found = {a.type: a for a in artifacts(mixed_run)}
    model, dataset = found["model"], found["dataset"]
    files = {e.path for e in model.manifest.contents}
    best = [p.name for p in (mixed_run / "checkpoints").glob("epoch*.ckpt")]
    assert files == {f"checkpoints/{best[0]}", ".hydra/config.yaml", ".hydra/overrides.yaml"}  # no plan was written
    meta = json.loads(model.metadata)
    assert meta["monitor"] == "val/dice" and meta["label_names"] == ["background", "organ", "tumour"]
    # the dataset is an input of the run (W&B's use_artifact flag, honoured by `wandb sync`), referenced not copied
    assert dataset.use_after_commit and not model.use_after_commit
    cases = len(json.loads((tiny_dataset / "dataset.json").read_text())["training"])
    expected = {"path": str(tiny_dataset.resolve()), "cases": cases, "files": 1 + 2 * cases}
    assert json.loads(dataset.metadata) == {**expected, "sha256": fingerprint(tiny_dataset).sha256}
    refs = {e.path: e.ref for e in dataset.manifest.contents}
    assert len(refs) == 1 + 2 * cases and refs["dataset.json"] == f"file://{tiny_dataset.resolve()}/dataset.json"


def test_model_artifact_carries_the_plans(tmp_path):
    """The training and precision plans go beside the checkpoint when the run wrote them."""
    for name, text in [("training_plan.yaml", "data: {}\n"), ("precision_plan.yaml", "fp32_modules: [net.x]\n"),
                       (".hydra/config.yaml", "seed: 1\n"), ("checkpoints/best.ckpt", "weights")]:  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    artifact = model_artifact("abc", tmp_path / "checkpoints" / "best.ckpt", tmp_path, {"best_score": 0.5})
    assert artifact.type == "model" and artifact.name == "model-abc" and artifact.metadata == {"best_score": 0.5}
    assert set(artifact.manifest.entries) == {"checkpoints/best.ckpt", "training_plan.yaml", "precision_plan.yaml",
                                              ".hydra/config.yaml"}  # fmt: skip


def test_dataset_fingerprint_follows_file_sizes(tiny_dataset, tmp_path):
    copy = Path(shutil.copytree(tiny_dataset, tmp_path / "copy"))
    before = fingerprint(copy)
    assert before.sha256 == fingerprint(tiny_dataset).sha256  # the path is not part of the hash
    label = next((copy / "labelsTr").iterdir())
    label.write_bytes(label.read_bytes() + b"\0")
    assert fingerprint(copy).sha256 != before.sha256


def test_per_case_table_from_the_test_pass(mixed_run):
    """`test/cases`: one row per validation case, named by its file, whose per-class means are the logged test
    metrics, with an image column."""
    table = table_json(mixed_run, "test/cases")
    assert table["columns"] == ["case", "dice/organ", "dice/tumour", "hd95/organ", "hd95/tumour", "slice"]
    rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    assert len(rows) == 2 and len({r["case"] for r in rows}) == 2
    assert all(r["case"].startswith("synthetic_") and r["case"].endswith(".nii.gz") for r in rows), rows
    assert all(r["slice"]["_type"] == "image-file" and set(r["slice"]["masks"]) == {"ground_truth", "prediction"}
               for r in rows)  # fmt: skip
    summary = read_offline_run(mixed_run).summary
    for key in ("dice/organ", "dice/tumour", "hd95/organ"):
        values = [r[key] for r in rows if r[key] is not None]
        assert math.isclose(float(np.mean(values)), summary[f"test/{key}"], rel_tol=1e-5), key


def written(path: Path, timeout: float = 60) -> Path:
    """`path` once W&B's service has written the run's exit record: `run.finish()` can return before the service
    process has flushed an offline run's file (seen under load)."""
    deadline = time.monotonic() + timeout
    while not any(r.WhichOneof("record_type") == "exit" for r in iter_records(path)):
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s"
        time.sleep(0.2)
    return path


def test_evaluate_logs_the_same_table(tiny_dataset, tmp_path, monkeypatch):
    """`medseg.evaluate` with W&B: the same columns, one row per scored case, its slice over the case's image."""
    for key, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    pred = tmp_path / "pred"
    pred.mkdir()
    names = sorted(p.name for p in (tiny_dataset / "labelsTr").iterdir())[:2]
    for name in names:
        shutil.copy(tiny_dataset / "labelsTr" / name, pred / name)
    table = EvaluationTable(tiny_dataset / "imagesTr")
    summary = evaluate(pred, tiny_dataset / "labelsTr", tmp_path / "eval.csv", on_case=table)
    run_dir = table.log(summary, {"pred": str(pred)}, mode="offline", project="medseg", dir=str(tmp_path / "w"))
    run = read_offline_run(written(next(run_dir.glob("*.wandb"))))
    assert run.summary["test/dice/organ"] == 1.0 and run.summary["test/dice"] == 1.0
    logged_table = table_json(run_dir.parent.parent, "test/cases")
    assert logged_table["columns"] == ["case", "dice/organ", "dice/tumour", "hd95/organ", "hd95/tumour", "slice"]
    assert [r[:3] for r in logged_table["data"]] == [[n, 1.0, 1.0] for n in names]


def _fit(tmp_path: Path, callback: pl.Callback) -> pl.Trainer:
    logger = SafeWandbLogger(project="medseg", save_dir=str(tmp_path), offline=True)
    trainer = pl.Trainer(max_steps=2, limit_val_batches=1, logger=logger, callbacks=[callback], accelerator="cpu",
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(BoringModel())
    logger.experiment.finish()
    return trainer


def _dashboard_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught if "W&B dashboard" in str(w.message)]


def test_failing_save_warns_once_and_training_finishes(tmp_path, monkeypatch):
    """save=true on a run with no W&B credentials: the save fails, one warning, the fit completes, the spec is
    still written."""
    for key, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there, should a key turn up
    callback = WandbWorkspace(str(tmp_path), save=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(tmp_path, callback)
        callback.on_fit_end(trainer, trainer.lightning_module)  # a second failure stays quiet
    assert trainer.state.finished and trainer.global_step == 2
    found = _dashboard_warnings(caught)
    assert len(found) == 1 and "saving workspace 'medseg'" in found[0], found
    assert callback.url is None and (tmp_path / WORKSPACE_FILE).is_file()


def test_missing_wandb_workspaces_warns_once_and_training_finishes(tmp_path, monkeypatch):
    for key, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    for name in [m for m in sys.modules if m.startswith("wandb_workspaces")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # what Python does for a package not installed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(tmp_path, WandbWorkspace(str(tmp_path)))
    assert trainer.state.finished
    found = _dashboard_warnings(caught)
    assert len(found) == 1 and "No module named" in found[0] and "medseg[dashboard]" in found[0], found
    assert not (tmp_path / WORKSPACE_FILE).exists()


def test_save_is_idempotent_by_name(monkeypatch):
    """Saving twice updates the one view named after the workspace (W&B's GraphQL calls replaced by a dict)."""
    from wandb_workspaces.workspaces import interface, internal

    from medseg.tracking.dashboard import workspace

    views: dict[str, dict] = {}

    def upsert(view):
        stored = views.setdefault(view.name, {"id": view.id or f"id{len(views)}", "saves": 0})
        assert view.id in ("", stored["id"])
        stored["saves"] += 1
        return {"upsertView": {"view": {"name": view.name, "id": stored["id"]}}}

    def from_name(entity, project, name):
        if name not in views:
            raise ValueError(f"Workspace `{name}` not found in project `{project}`")
        return type("Found", (), {"id": views[name]["id"]})

    monkeypatch.setattr(internal, "upsert_view2", upsert)
    monkeypatch.setattr(internal.View, "from_name", from_name)
    monkeypatch.setattr(interface.Workspace, "url", property(lambda self: f"https://wandb/{self._internal_name}"))
    first = save_workspace(workspace("team", "medseg", ["background", "organ"]))
    second = save_workspace(workspace("team", "medseg", ["background", "organ", "tumour"]))
    other = save_workspace(workspace("team", "medseg", ["background"], name="another"))
    assert first == second != other
    assert sorted(v["saves"] for v in views.values()) == [1, 2]


@pytest.mark.slow
def test_report_of_a_precision_sweep(tiny_dataset, tmp_path, capsys):
    """A real `sweep=precision` multirun (fp32, amp, mixed; one epoch each): its report spec validates, targets the
    sweep's W&B group, compares every mode on keys each of them logged, and carries the sweep table."""
    from medseg.tracking.sweep_report import COMPARED, CURVES, report_keys
    from medseg.tracking.views import REPORT_FILE, read_report

    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "-m", *TINY, *TINY_UNET, *on_dataset(tiny_dataset, tmp_path / "cache"), "sweep=precision", "logger=wandb",
        "trainer.max_epochs=1", "test=false", f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={sweep_dir}",
        env=wandb_env(tmp_path), timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, output(result)
    dashboard_main(["--report", str(sweep_dir)])
    assert "panels show: summary/best_val_dice" in capsys.readouterr().out
    report = read_report(sweep_dir / REPORT_FILE, "team", "medseg")  # pydantic validation of the stored spec
    runs = [read_offline_run(sweep_dir / job) for job in ("0", "1", "2")]
    assert [r.config["precision"]["name"] for r in runs] == ["fp32", "amp", "mixed"]
    group = runs[0].group
    assert group and all(r.group == group for r in runs) and group in report.title
    grid = next(b for b in report.blocks if hasattr(b, "runsets"))
    assert group in str(grid.runsets[0].filters) and grid.runsets[0].entity == "team"
    assert set(report_keys(report)) == set(COMPARED) | set(CURVES)
    for key in COMPARED:  # the comparison needs every mode
        assert all(key in logged(r) for r in runs), key
    for key in CURVES:
        assert any(key in logged(r) for r in runs), key
    text = json.dumps(json.loads((sweep_dir / REPORT_FILE).read_text()))
    assert "precision=fp32" in text and "precision=mixed" in text  # the sweep table, job by job


def test_dashboard_names_a_run_without_a_spec(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dashboard_main(["--print", str(tmp_path)])
    assert exit_info.value.code == 1
    assert f"{tmp_path / WORKSPACE_FILE}: no workspace spec" in capsys.readouterr().err

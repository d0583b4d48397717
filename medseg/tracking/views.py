"""W&B workspaces and reports as files and on the server: the JSON spec an offline run keeps, reading it back
through wandb-workspaces' own pydantic models (which is what validates it), printing it, and saving it.

A workspace is saved idempotently by name: its internal view name is derived from its display name, and an existing
view of that name is updated rather than a second one created, so every run (and every `python -m medseg.dashboard`)
refreshes the same workspace.
"""

import hashlib
import warnings
from pathlib import Path
from typing import Any

from medseg.reliability.atomic_io import write_atomic
from medseg.tracking.dashboard import panel_keys

WORKSPACE_FILE = "wandb_workspace.json"
REPORT_FILE = "wandb_report.json"


def workspace_json(workspace: Any) -> str:
    """The workspace as the W&B view it is saved as (`wandb_workspaces.workspaces.internal.View`), JSON."""
    return workspace._to_model().model_dump_json(by_alias=True, exclude_none=True, indent=1)


def read_workspace(path: str | Path, entity: str | None = None, project: str | None = None) -> Any:
    """A `Workspace` from a spec file written by `workspace_json` (a run directory: its `wandb_workspace.json`),
    validated by wandb-workspaces' model; `entity`/`project` replace the ones stored (an offline run has no entity)."""
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces.workspaces import internal

    path = Path(path)
    path = path / WORKSPACE_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no workspace spec (written at the end of training by a W&B run)")
    view = internal.View.model_validate_json(path.read_text())
    view.entity, view.project = entity or view.entity, project or view.project
    return ws.Workspace._from_model(view)


def report_json(report: Any) -> str:
    """The report as W&B stores it (`wandb_workspaces.reports.v2.internal.ReportViewspec`), JSON."""
    return report._to_model().model_dump_json(by_alias=True, exclude_none=True, indent=1)


def read_report(path: str | Path, entity: str | None = None, project: str | None = None) -> Any:
    """A `Report` from a spec file written by `report_json`, validated by wandb-workspaces' model."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces.reports.v2 import internal

    model = internal.ReportViewspec.model_validate_json(Path(path).read_text())
    model.project.entity_name = entity or model.project.entity_name
    model.project.name = project or model.project.name
    report = wr.Report._from_model(model)
    for block in report.blocks:  # each panel grid's run set names its project too
        for runset in getattr(block, "runsets", []):
            runset.entity, runset.project = entity or runset.entity, project or runset.project
    return report


def describe(workspace: Any) -> str:
    """The workspace as text: each section and its panels, with the keys each panel shows."""
    lines = [f"workspace {workspace.name!r} ({workspace.entity or '<entity>'}/{workspace.project})"]
    for section in workspace.sections:
        lines.append(f"  {section.name}")
        for panel in section.panels:
            title = getattr(panel, "title", None) or (getattr(panel, "chart_strings", None) or {}).get("title") or ""
            keys = ", ".join(panel_keys(panel)) or "(whole runs)"
            lines.append(f"    {type(panel).__name__:24s} {title[:60]:60s} {keys}")
    return "\n".join(lines)


def internal_view_name(display_name: str) -> str:
    """The view name W&B addresses a workspace by (`nw-<id>-v`), the same for the same display name."""
    return f"nw-{hashlib.sha1(display_name.encode()).hexdigest()[:11]}-v"


def save_workspace(workspace: Any) -> str:
    """Create or update (by name) the workspace on the W&B server; returns its URL. Needs `wandb login`."""
    from wandb_workspaces.workspaces import internal

    name = internal_view_name(workspace.name)
    try:
        existing = internal.View.from_name(workspace.entity, workspace.project, name).id
    except ValueError:  # wandb-workspaces' "Workspace ... not found": create it
        existing = ""
    workspace._internal_name, workspace._internal_id = name, existing
    workspace.save()
    return workspace.url


def save_report(report: Any) -> str:
    """Save the report on the W&B server; returns its URL."""
    report.save()
    return report.url


class OnceWarner:
    """`warnings.warn` for the first failure only: a dashboard that cannot be built or saved is worth one line."""

    def __init__(self) -> None:
        self.warned = False

    def __call__(self, what: str, err: BaseException) -> None:
        if not self.warned:
            self.warned = True
            hint = " (pip install 'medseg[dashboard]')" if isinstance(err, ImportError) else ""
            warnings.warn(f"W&B dashboard: {what} failed ({type(err).__name__}: {err}){hint}; training is unaffected",
                          stacklevel=3)  # fmt: skip


def write_spec(path: str | Path, text: str) -> Path:
    """Write a spec (``workspace_json``/``report_json``) atomically: a reader never sees half of one."""
    return write_atomic(path, lambda tmp: tmp.write_text(text + "\n"))

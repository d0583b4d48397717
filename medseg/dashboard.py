"""W&B dashboards of a medseg project: `python -m medseg.dashboard ...`.

    --print <run dir>                       the workspace a run wrote (sections, panels, the keys each shows)
    <run dir> --entity E [--project P]      save that workspace on W&B (after `wandb sync`), by name
    --entity E --project P [--labels ...]   save the workspace built afresh (per-class panels from --labels)
    --report <sweep dir or group> [--entity E --project P]
                                            the precision comparison of a sweep as a report: its spec is written
                                            (`<sweep dir>/wandb_report.json`) and printed; with --entity, saved

Needs the `dashboard` extra (`pip install -e '.[dashboard]'`, in `make install`); saving needs `wandb login`.
"""

import argparse
import sys
from pathlib import Path

from medseg.tracking.dashboard import WORKSPACE_NAME, workspace
from medseg.tracking.sweep_report import report_keys, sweep_group, sweep_report
from medseg.tracking.views import (
    REPORT_FILE,
    describe,
    read_workspace,
    report_json,
    save_report,
    save_workspace,
    write_spec,
)


def saved(save, spec) -> str:
    """`save(spec)`'s URL; a server error (no login, no such entity, no network) ends the command with one line."""
    try:
        return save(spec)
    except Exception as err:  # noqa: BLE001 - W&B raises many kinds; the message is what the user needs
        raise SystemExit(f"medseg.dashboard: saving to W&B failed: {type(err).__name__}: {err}") from None


def report(target: str, entity: str | None, project: str) -> None:
    sweep_dir = Path(target)
    table = None
    if sweep_dir.is_dir():
        group = sweep_group(sweep_dir)
        summary = sweep_dir / "summary.md"
        table = summary.read_text() if summary.is_file() else None
    elif "/" in target or target.startswith("."):
        raise SystemExit(f"medseg.dashboard: --report {target}: no such sweep directory")
    else:
        group = target  # a W&B group name
    spec = sweep_report(entity or "", project, group, table)
    print(f"report {spec.title!r}: runs of group {group!r} in {entity or '<entity>'}/{project}")
    print("  panels show: " + ", ".join(report_keys(spec)))
    if sweep_dir.is_dir():
        print(f"  spec: {write_spec(sweep_dir / REPORT_FILE, report_json(spec))}")
    if entity:
        print(f"  saved: {saved(save_report, spec)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medseg.dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", help="a run directory holding wandb_workspace.json")
    parser.add_argument("--print", dest="show", metavar="RUN_DIR", help="print the workspace of a run directory")
    parser.add_argument("--report", metavar="SWEEP", help="a sweep directory, or a W&B group name")
    parser.add_argument("--entity", help="W&B entity (user or team) to save to")
    parser.add_argument("--project", help="W&B project (default: the run's own, else medseg)")
    parser.add_argument("--name", default=WORKSPACE_NAME, help="workspace name, when built afresh")
    parser.add_argument("--labels", default="background", help="class names, index 0 first: background,organ,...")
    args = parser.parse_args(argv)
    try:
        if args.report:
            report(args.report, args.entity, args.project or "medseg")
        elif args.show or args.run:
            space = read_workspace(args.show or args.run, args.entity, args.project)
            print(describe(space))
            if not args.show:
                if not space.entity:
                    raise SystemExit("medseg.dashboard: saving needs --entity (the run was offline: it has none)")
                print(f"saved: {saved(save_workspace, space)}")
        elif args.entity:
            space = workspace(args.entity, args.project or "medseg", args.labels.split(","), args.name)
            print(describe(space))
            print(f"saved: {saved(save_workspace, space)}")
        else:
            parser.error("give --print <run dir>, <run dir> --entity E, --entity E --project P, or --report <sweep>")
    except (FileNotFoundError, ImportError) as err:
        hint = " (pip install -e '.[dashboard]')" if isinstance(err, ImportError) else ""
        print(f"medseg.dashboard: {err}{hint}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

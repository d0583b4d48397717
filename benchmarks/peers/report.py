"""The comparison's table from `<work>/peers.json`: one row per fold, tool and test-time mirroring (and the mean
over folds when there are several), printed and written as `<work>/peers.md` and `<work>/peers_table.json`."""

import json
import math
from pathlib import Path

from medseg.tracking.tables import markdown_table

TOOLS = {"nnunet": ("nnU-Net v2", "fp32"), "medseg-mixed": ("medseg", "mixed"), "medseg-fp32": ("medseg", "fp32")}
TTA = {"mirror": "default", "none": "none"}


def rows_of_fold(fold: str, steps: dict) -> list[dict]:
    rows = []
    for tool, (name, mode) in TOOLS.items():
        done = steps.get(tool, {})
        train = done.get("train", {})
        for tta, label in TTA.items():
            score, predict = done.get(f"score_{tta}"), done.get(f"predict_{tta}", {})
            if score is None:
                continue
            row = {"fold": fold, "tool": name, "mode": mode, "mirroring": label}
            row.update({f"Dice {k.split('/', 1)[1]}": v for k, v in score.items() if k.startswith("dice/")})
            row["Dice mean"] = score.get("dice")
            row.update({f"HD95 {k.split('/', 1)[1]} mm": v for k, v in score.items() if k.startswith("hd95/")})
            row["train wall min"] = train["seconds"] / 60 if "seconds" in train else None
            row["train peak RAM GiB"] = train["peak_mib"] / 1024 if "peak_mib" in train else None
            row["predict s/case"] = predict.get("s_per_case")
            row["predict peak RAM GiB"] = predict["peak_mib"] / 1024 if "peak_mib" in predict else None
            rows.append(row)
    return rows


def mean_rows(rows: list[dict]) -> list[dict]:
    """Per (tool, mode, mirroring): the mean of every number over the folds it ran."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["tool"], row["mode"], row["mirroring"]), []).append(row)
    out = []
    for (tool, mode, tta), group in groups.items():
        row = {"fold": f"mean of {len(group)}", "tool": tool, "mode": mode, "mirroring": tta}
        for key in group[0]:
            values = [r[key] for r in group if isinstance(r.get(key), int | float) and not math.isnan(r[key])]
            if key not in row and values:
                row[key] = sum(values) / len(values)
        out.append(row)
    return out


def table(results: dict) -> tuple[str, list[dict]]:
    rows = [r for fold, steps in sorted(results.get("folds", {}).items()) for r in rows_of_fold(fold, steps)]
    if len(results.get("folds", {})) > 1:
        rows += mean_rows(rows)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return markdown_table(rows, columns), rows


def step_table(step: dict) -> str:
    rows = [
        {"tool": r["tool"], "precision": r["precision"], "s/step": r["step_ms"] / 1000, "vs nnU-Net fp32": r["ratio"]}
        for r in step["rows"]
    ]
    return f"patch {step['patch']}, batch {step['batch']}, {step['net']}\n\n" + markdown_table(rows)


def print_report(results: dict, work: Path) -> str:
    setup = results.get("setup", {})
    text, rows = table(results)
    head = (
        f"{setup.get('msd')}: budget {setup.get('budget')} per tool and mode; {setup.get('cpu')} "
        f"({setup.get('cores')} cores); nnunetv2 {setup.get('nnunetv2')}; {setup.get('date')}"
        + (" (SMOKE: not a result)" if setup.get("smoke") else "")
    )
    prep = results.get("nnunet_preprocess")
    notes = f"nnU-Net plan_and_preprocess (outside its budget): {prep['seconds']:.0f} s" if prep else ""
    report = "\n\n".join(p for p in (head, text, notes) if p)
    if "step_speed" in results:
        report += "\n\nTraining step, nnU-Net's planned network in both tools:\n\n" + step_table(results["step_speed"])
    print(report)
    (work / "peers.md").write_text(report + "\n")
    (work / "peers_table.json").write_text(json.dumps(rows, indent=1))
    return report

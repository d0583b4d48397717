"""nnU-Net v2 in its own virtual environment (never medseg's), with the budget trainer registered in it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

NNUNET_VERSION = "2.8.1"  # the newest release on the package index when this comparison was written (2026-12)
# The CPU wheel medseg's Makefile pins. Installed first and named again beside nnunetv2: a dependency of
# nnunetv2 (through torchvision) otherwise upgrades torch to the newest CUDA build, 3+ GB of CUDA libraries.
TORCH = "torch==2.13.0"
TRAINER = "nnUNetTrainerBudget"
TRAINER_FILE = Path(__file__).with_name("budget_trainer.py")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def tool(venv: Path, name: str) -> str:
    """An nnU-Net console script (`nnUNetv2_train`, ...) of the venv."""
    return str(venv / "bin" / name)


def install(venv: Path, version: str = NNUNET_VERSION, log: Path | None = None) -> None:
    """Create `venv` and pip-install torch (CPU wheel) then nnunetv2==`version`; skipped when done before."""
    marker = venv / f".nnunetv2-{version}"
    if not marker.is_file():
        if log:
            log.parent.mkdir(parents=True, exist_ok=True)
        out = log.open("a") if log else None
        try:
            if not venv_python(venv).is_file():
                subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, stdout=out)
            pip = [str(venv_python(venv)), "-m", "pip", "install", "-q"]
            for args in ([TORCH], [f"nnunetv2=={version}", TORCH]):
                done = subprocess.run(pip + args, stdout=out, stderr=subprocess.STDOUT)
                if done.returncode != 0:
                    where = f"; log: {log}" if log else ""
                    raise RuntimeError(f"pip install {' '.join(args)} into {venv} failed{where}")
        finally:
            if out:
                out.close()
        marker.write_text(json.dumps({"nnunetv2": version, "torch": TORCH}))
    register_trainer(venv)


def why_not_installable(version: str = NNUNET_VERSION) -> str | None:
    """None when pip can fetch nnunetv2==`version` from the package index, else why not (tests skip with it)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", "/tmp/medseg_peers_probe",
             f"nnunetv2=={version}"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"pip could not run: {err}"
    if done.returncode != 0:
        return f"nnunetv2=={version} cannot be downloaded (no network or package index?): {done.stderr.strip()[-200:]}"
    return None


def register_trainer(venv: Path) -> Path:
    """Copy budget_trainer.py into the installed `nnunetv2.training.nnUNetTrainer` package, where both training
    and prediction look trainers up by class name. Copied on every run, so an edited trainer is the one used."""
    package = subprocess.run(
        [str(venv_python(venv)), "-c", "import nnunetv2, os; print(os.path.dirname(nnunetv2.__file__))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    target = Path(package) / "training" / "nnUNetTrainer" / "medseg_budget_trainer.py"
    shutil.copyfile(TRAINER_FILE, target)
    return target

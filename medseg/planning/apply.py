"""`plan=auto|none|<file>` inside `python -m medseg.train`: the plan's keys under the command line's.

The plan becomes Hydra overrides placed before the command line's own, and the config is composed again, so
every key given on the command line wins over the plan, and the plan wins over conf/'s defaults. Only the
generic `data=msd` is planned: the hand-written presets (data=hippocampus/brats/synthetic, any experiment=)
keep their values.
"""

import logging
import time
from pathlib import Path

import torch
import yaml
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from medseg.config_check import ConfigError
from medseg.planning.auto import TIME_BUDGET, plan_dataset
from medseg.planning.nets import DYNUNET, PlannedNet
from medseg.planning.plan_file import plan_overrides, plan_yaml, read_plan

log = logging.getLogger(__name__)


def plans_itself(cfg: DictConfig, choices: dict) -> bool:
    """`plan=auto` plans a user's own folder (`data=msd`), never a preset or an experiment."""
    return cfg.get("plan") == "auto" and choices.get("data") == "msd" and choices.get("experiment") is None


def given_keys(cli: list[str]) -> set[str]:
    """The keys (and groups) a list of Hydra overrides sets: `+precision=mixed` -> `precision`."""
    return {o.lstrip("+~").split("=", 1)[0] for o in cli}


def chosen_net(cfg: DictConfig, choices: dict, cli: list[str]) -> PlannedNet:
    """The net to plan for: the model group given on the command line (`model=swinunetr`), as composed, with any
    `model.net.*` keys given there; else the DynUNet that nnU-Net's rules size (conf/train.yaml's default model
    is not a choice the user made)."""
    name = choices.get("model")
    if "model" not in given_keys(cli) or name in (None, "dynunet"):
        return DYNUNET
    return PlannedNet(name, OmegaConf.to_container(cfg.model.net, resolve=False))


def planned_config(cfg: DictConfig) -> DictConfig:
    """`cfg` with the plan applied (and the plan saved as `<run dir>/training_plan.yaml`), or `cfg` itself when nothing
    is to be planned. Call it inside the running Hydra app (it re-composes `train`)."""
    hydra_cfg = HydraConfig.get()
    choice = cfg.get("plan")
    if choice in (None, "none") or (choice == "auto" and not plans_itself(cfg, hydra_cfg.runtime.choices)):
        return cfg
    out = Path(cfg.paths.output_dir) / "training_plan.yaml"
    if choice == "auto" and out.is_file():
        # The run directory already has a plan: a requeued or restarted job, which Lightning resumes from that
        # directory's newest checkpoint. It must continue under the plan that checkpoint was trained with; a
        # new plan (measured under another load) could change the patch, the batch and the LR schedule's length.
        log.info("plan=auto: %s exists (a job started again in its own directory): training with it", out)
        choice = str(out)
    if choice == "auto":
        if cfg.get("ckpt_path") is not None:
            raise ConfigError(
                "plan=auto with ckpt_path: a new plan could change patch and batch; resume with the run's own "
                "plan, plan=<run dir>/training_plan.yaml"
            )
        budget = cfg.get("planner") or {}
        accelerator = str(cfg.trainer.get("accelerator", "auto"))
        device = "cuda" if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu"
        started = time.perf_counter()
        plan = plan_dataset(
            cfg.data.root,
            cfg.precision.name if cfg.get("precision") else "fp32",
            time=budget.get("time", TIME_BUDGET),
            memory=budget.get("memory"),
            patch_seconds=budget.get("patch_seconds"),
            device=device,
            measure=budget.get("measure", True),
            val_fraction=cfg.data.val_fraction,
            net=chosen_net(cfg, hydra_cfg.runtime.choices, list(hydra_cfg.overrides.task)),
        )
        # the run's own wall, which max_time leaves room for; a plan made by `medseg.plan` spent none of it
        plan.planning_seconds = time.perf_counter() - started
        text = plan_yaml(plan)
        plan_cfg = OmegaConf.create(yaml.safe_load(text))
    else:
        plan_cfg = read_plan(choice)
        text = Path(choice).expanduser().read_text()
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.is_file() or out.read_text() != text:
        out.write_text(text)
    cli = list(hydra_cfg.overrides.task)
    overrides = plan_overrides(plan_cfg, cli)
    log.info("Training plan (saved as %s; command-line keys win over it):\n%s", out, text)
    return compose(config_name=hydra_cfg.job.config_name, overrides=overrides + cli)

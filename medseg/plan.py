"""Plan training from the data: `python -m medseg.plan <MSD folder> [--precision mixed] [--time-budget 30m]`.

Prints the plan and writes it as a Hydra experiment file; train from it with
`python -m medseg.train plan=<file> +precision=<the same>` (any key given there wins over the plan), or copy it
to conf/experiment/<name>.yaml and use `experiment=<name>`.
"""

import argparse
import logging
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from medseg import CONF_DIR
from medseg.config_check import ConfigError
from medseg.planning.auto import TIME_BUDGET, plan_dataset
from medseg.planning.nets import DYNUNET, PlannedNet
from medseg.planning.plan_file import plan_yaml
from medseg.planning.planner import PRECISIONS


def chosen_net(name: str) -> PlannedNet:
    """conf/model/<name>.yaml's net, as `python -m medseg.train model=<name>` composes it."""
    if name == "dynunet":
        return DYNUNET
    GlobalHydra.instance().clear()  # a command run inside another Hydra app (tests) starts from a clean state
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}"])
    return PlannedNet(name, OmegaConf.to_container(cfg.model.net, resolve=False))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="an MSD-layout folder (dataset.json, imagesTr/, labelsTr/)")
    parser.add_argument("--precision", default="mixed", choices=PRECISIONS, help="the +precision= it will train with")
    parser.add_argument("--time-budget", default=TIME_BUDGET, help="wall clock for the whole run: 30m, 2h, 1h30m")
    parser.add_argument(
        "--memory-budget", default=None, help="bytes a step may hold: 8G, 512M (default: the device's share)"
    )
    parser.add_argument(
        "--patch-time",
        type=float,
        default=None,
        help="training seconds per patch (default on CPU: the budget over 100 patches per training case)",
    )
    parser.add_argument(
        "--model",
        default="dynunet",
        choices=sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")),
        help="the model=... it will train (default: a DynUNet sized by nnU-Net's rules)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--no-measure", action="store_true", help="skip the real steps (no step time, no epochs)")
    parser.add_argument("--out", type=Path, default=None, help="plan file (default: plan_<folder name>.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        plan = plan_dataset(
            args.root,
            args.precision,
            time=args.time_budget,
            memory=args.memory_budget,
            patch_seconds=args.patch_time,
            device=args.device,
            measure=not args.no_measure,
            net=chosen_net(args.model),
        )
    except ConfigError as err:
        print(f"medseg: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    out = args.out or Path(f"plan_{Path(args.root).resolve().name}.yaml")
    text = plan_yaml(plan)
    out.write_text(text)
    print(text)
    print(f"plan written to {out}")
    return out


if __name__ == "__main__":
    main()

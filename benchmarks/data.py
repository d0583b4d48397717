"""Loader benchmark: epoch time and batches/s of the training loaders, and how often a training step waits on data.

    python benchmarks/data.py                                  # hippocampus and brats from ../shared/data
    python benchmarks/data.py --datasets hippocampus --step-ms 50 --workers 4
    python benchmarks/data.py --datasets synthetic --override data.root=/tmp/syn "data.patch_size=[24,24,24]"

Each dataset is `MSDDataModule` built from the real `conf/data/<name>.yaml` (Hydra compose, plus `--override`s),
with its persistent cache in a fresh temporary folder. Passes over the training loader, as Lightning iterates it:
    no cache   `data.cache=none`: every epoch loads and resamples the NIfTI files
    cold       first epoch with the persistent cache: preprocesses and writes the cache
    cached     second epoch: reads the cache; augmentation still runs every epoch
Then a simulated training loop on the cached loader: each step "computes" for `--step-ms` (a sleep, as the host
waits on a GPU) and the time spent in `next(loader)` is the wait. Reported: the share of steps that waited more
than 5 ms, with and without the first step of each epoch (workers restart their prefetch then).
"""

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from medseg import CONF_DIR
from medseg.tracking.tables import markdown_table

WAIT_MS = 5.0


def data_config(name: str, overrides: list[str], cache_dir: Path) -> DictConfig:
    """The `data` section of the real config for `data=<name>`, with its cache in `cache_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={name}", f"data.cache_dir={cache_dir}", *overrides])
    return cfg.data


def timed_pass(loader) -> dict[str, float]:
    """One epoch over `loader`: seconds, batches, batches/s, seconds to the first batch."""
    start = time.perf_counter()
    first = None
    n = 0
    for _ in loader:
        n += 1
        if first is None:
            first = time.perf_counter() - start
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "batches": n, "batches_per_s": n / seconds, "first_s": first or 0.0}


def simulate(loader, step_ms: float, epochs: int) -> dict[str, float]:
    """Training-loop waits on data when each step computes for `step_ms` (ms); see the module docstring."""
    waits, epoch_starts = [], []
    for _ in range(epochs):
        it = iter(loader)
        first = True
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            waits.append((time.perf_counter() - start) * 1000)
            epoch_starts.append(first)
            first = False
            time.sleep(step_ms / 1000)
            # the step is done with its batch; freeing it (unmapping the workers' shared memory) is the step's cost
            del batch
    inner = [w for w, s in zip(waits, epoch_starts, strict=True) if not s]
    quantiles = statistics.quantiles(waits, n=20, method="inclusive") if len(waits) > 1 else waits * 19
    return {
        "steps": len(waits),
        "waited": sum(w > WAIT_MS for w in waits) / len(waits),
        "waited_inner": sum(w > WAIT_MS for w in inner) / max(len(inner), 1),
        "p50_ms": statistics.median(waits),
        "p95_ms": quantiles[18],
        "max_ms": max(waits),
    }


def bench_dataset(name: str, overrides: list[str], workers: int | None, step_ms: float, epochs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="medseg_bench_cache_") as tmp:
        cfg = data_config(name, overrides, Path(tmp))
        if cfg.get("synthesize") is None and not (Path(cfg.root) / "dataset.json").is_file():
            return {"dataset": name, "skipped": f"no dataset.json in {cfg.root}"}
        if workers is not None:
            cfg.num_workers = workers
        result: dict = {"dataset": name, "workers": cfg.num_workers, "batch": cfg.batch_size * cfg.num_samples}
        uncached = instantiate(cfg, cache="none")
        uncached.setup("fit")
        result["no cache"] = timed_pass(uncached.train_dataloader())
        dm = instantiate(cfg)
        dm.setup("fit")
        loader = dm.train_dataloader()  # persistent workers, as in training: both passes share them
        result["cold"] = timed_pass(loader)
        result["cached"] = timed_pass(loader)
        result["sim"] = simulate(loader, step_ms, epochs)
        result["cases"] = len(dm.train_files)
        del loader  # stop the persistent workers before the cache folder goes
        return result


def tables(results: list[dict], step_ms: float) -> str:
    passes = []
    for r in results:
        if "skipped" in r:
            passes.append({"dataset": r["dataset"], "workers": f"skipped: {r['skipped']}"})
            continue
        for p in ("no cache", "cold", "cached"):
            t = r[p]
            passes.append({
                "dataset": r["dataset"], "workers": r["workers"], "patches/batch": r["batch"], "pass": p,
                "batches": t["batches"], "epoch s": f"{t['seconds']:.2f}", "batches/s": f"{t['batches_per_s']:.2f}",
                "first batch s": f"{t['first_s']:.2f}",
            })  # fmt: skip
    waits = [
        {
            "dataset": r["dataset"], "workers": r["workers"], "steps": r["sim"]["steps"],
            f"waited > {WAIT_MS:g} ms": f"{100 * r['sim']['waited']:.1f}%",
            "same, without epoch starts": f"{100 * r['sim']['waited_inner']:.1f}%",
            "p50 wait ms": f"{r['sim']['p50_ms']:.2f}", "p95 wait ms": f"{r['sim']['p95_ms']:.2f}",
            "max wait ms": f"{r['sim']['max_ms']:.1f}",
        }
        for r in results
        if "skipped" not in r
    ]  # fmt: skip
    pass_columns = ["dataset", "workers", "patches/batch", "pass", "batches", "epoch s", "batches/s", "first batch s"]
    return "\n".join([
        markdown_table(passes, pass_columns), "",
        f"Simulated training on the cached loader, {step_ms:g} ms compute per step:", "",
        markdown_table(waits) if waits else "(no dataset)",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["hippocampus", "brats"], help="conf/data/<name>.yaml")
    parser.add_argument("--override", nargs="*", default=[], help="Hydra overrides, e.g. data.root=/path")
    parser.add_argument("--workers", type=int, help="data.num_workers (default: the config's)")
    parser.add_argument("--step-ms", type=float, default=150.0, help="simulated compute per training step")
    parser.add_argument("--sim-epochs", type=int, default=3, help="epochs of the simulated training loop")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI's deprecation notices, once per worker
    print(f"# {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for name in args.datasets:
        started = time.perf_counter()
        r = bench_dataset(name, args.override, args.workers, args.step_ms, args.sim_epochs)
        print(f"  {name}: {r.get('skipped') or 'done'} ({time.perf_counter() - started:.0f} s)", flush=True)
        results.append(r)
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    print(tables(results, args.step_ms), flush=True)
    return results


if __name__ == "__main__":
    main()

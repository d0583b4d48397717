"""One command of a peer comparison, timed, with the peak memory of its whole process tree."""

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

SAMPLE_SECONDS = 0.25


@dataclass
class Timed:
    """What `run_timed` measured: wall seconds, the peak of the summed RSS of the command and every process it
    started (data-loader and export workers included), in MiB, sampled every SAMPLE_SECONDS."""

    seconds: float
    peak_mib: float


class MemoryLimitExceeded(RuntimeError):
    """The command's tree passed `max_mib` and was stopped after `seconds`, at `peak_mib`."""

    def __init__(self, cmd: str, seconds: float, peak_mib: float, max_mib: float) -> None:
        super().__init__(f"{cmd}: stopped at {peak_mib:.0f} MiB (limit {max_mib:.0f} MiB) after {seconds:.0f} s")
        self.seconds, self.peak_mib = seconds, peak_mib


def stop_tree(proc: psutil.Process) -> None:
    for p in [*proc.children(recursive=True), proc]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def tree_rss_mib(proc: psutil.Process) -> float:
    """RSS of `proc` and its descendants, in MiB. Summed RSS counts pages shared by forked workers once per
    process: an upper bound on what the tree holds, the same bound for every tool."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


def run_timed(
    cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None, max_mib: float | None = None
) -> Timed:
    """Run `cmd` (stdout and stderr into `log`), sampling its tree's memory; raise naming the log on failure, and
    `MemoryLimitExceeded` after stopping the tree once its memory passes `max_mib` (a peer's run that would
    otherwise take the machine's last memory and the measuring process with it)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd)
        proc, peak = psutil.Process(child.pid), 0.0
        while child.poll() is None:
            try:
                peak = max(peak, tree_rss_mib(proc))
            except psutil.NoSuchProcess:
                pass
            if max_mib is not None and peak > max_mib:
                stop_tree(proc)
                child.wait()
                raise MemoryLimitExceeded(cmd[0], time.perf_counter() - start, peak, max_mib)
            time.sleep(SAMPLE_SECONDS)
        seconds = time.perf_counter() - start
    if child.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{cmd[0]} failed (exit {child.returncode}); log: {log}\n{tail}")
    return Timed(seconds, peak)

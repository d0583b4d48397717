"""Checking thousands of cases: in worker processes with a progress bar, and once per folder.

Each case's problems are stored under its two files' path, size and modification time (`cases.json` in the cache
folder); a later start re-checks only cases whose files changed, so a folder of 1,000 unchanged cases costs 2,000
`stat` calls instead of reading every voxel again. Each worker holds one case (image and label) at a time.
"""

import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.progress import track

log = logging.getLogger(__name__)

PROGRESS_FROM = 50  # cases: a progress bar from this many unchecked cases on
PARALLEL_FROM = 16  # cases: fewer are read in this process (starting workers would cost more than it saves)
VERSION = 1  # bump when a check changes what it reports: every cached result is then checked again


def _size_mtime(path: Path) -> list:
    try:
        st = path.stat()
    except OSError:
        return [None, None]
    return [st.st_size, st.st_mtime_ns]


def _stat(root: Path, rel: str) -> list:
    return [rel, *_size_mtime(root / rel)]


def cache_file(cache_dir: Path, root: Path, kind: str = "checks") -> Path:
    """One file per dataset folder (by its resolved path) and kind of result."""
    return cache_dir / kind / f"{hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]}.json"


def _save(path: Path, content: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(content))
        tmp.replace(path)  # whole or not at all: two runs starting at once each write a complete file
    except OSError as err:
        log.warning("could not save %s (%s): the next start reads every file again", path, err)


def per_file(files: Sequence[str], compute: Callable[[str], list], path: Path | None = None) -> list:
    """`compute(file)` for each file, reused from the JSON file `path` for files whose size and modification time
    are those it was computed at (None: computed for every file); results are lists of JSON-able values."""
    stored: dict = {}
    if path is not None and path.is_file():
        try:
            stored = json.loads(path.read_text())["files"]
        except (OSError, ValueError, KeyError):
            stored = {}  # a damaged cache is read again, never trusted
    results, changed = [], False
    for file in map(str, files):
        stat = _size_mtime(Path(file))
        hit = stored.get(file)
        if hit is not None and hit[0] == stat and stat[0] is not None:
            results.append(hit[1])
            continue
        results.append(compute(file))
        stored[file], changed = [stat, results[-1]], True
    if path is not None and changed:
        _save(path, {"version": VERSION, "files": stored})
    return results


def checked_cases(
    root: Path,
    cases: Sequence[tuple[str, str]],
    check: Callable[[tuple[str, str]], tuple[list, list]],
    settings: dict,
    cache_dir: Path | None = None,
    workers: int = 0,
) -> list[tuple[list, list]]:
    """(errors, warnings) of each (image, label) case, in order: `check(case)` for cases whose files changed
    since `cache_dir` last saw them under the same `settings` (all of them without a cache_dir), in `workers`
    processes (0: this one). `check` must be picklable (a module-level function or a `functools.partial`);
    problems are lists of JSON-able values."""
    path = cache_file(cache_dir, root) if cache_dir is not None else None
    key = hashlib.sha1(json.dumps({**settings, "version": VERSION}, sort_keys=True).encode()).hexdigest()
    stored: dict = {}
    if path is not None and path.is_file():
        try:
            saved = json.loads(path.read_text())
            stored = saved["cases"] if saved.get("settings") == key else {}
        except (OSError, ValueError, KeyError):
            stored = {}  # a damaged cache is checked again, never trusted
    stats = [[_stat(root, image), _stat(root, label)] for image, label in cases]
    results: list = [None] * len(cases)
    todo = []
    for i, (case, stat) in enumerate(zip(cases, stats, strict=True)):
        hit = stored.get("|".join(case))
        if hit is not None and hit["stat"] == stat and None not in (stat[0][1], stat[1][1]):
            results[i] = (hit["errors"], hit["warnings"])
        else:
            todo.append(i)
    if todo:
        fresh = _run(check, [cases[i] for i in todo], workers)
        for i, result in zip(todo, fresh, strict=True):
            results[i] = result
    log.info(
        "checked %d of %d cases (%d unchanged since the last check)", len(todo), len(cases), len(cases) - len(todo)
    )
    if path is not None and todo:
        entries = {
            "|".join(c): {"stat": s, "errors": r[0], "warnings": r[1]}
            for c, s, r in zip(cases, stats, results, strict=True)
        }
        _save(path, {"settings": key, "cases": entries})
    return results


def _run(check: Callable, cases: list, workers: int) -> list:
    show = len(cases) >= PROGRESS_FROM
    if workers <= 0 or len(cases) < PARALLEL_FROM:
        return list(track(map(check, cases), total=len(cases), description="checking files", disable=not show))
    # fork, as PyTorch's DataLoader workers start on Linux: spawn would import the entry point (torch, Lightning)
    # again in every worker, seconds each
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        done = pool.map(check, cases, chunksize=max(1, min(16, len(cases) // (4 * workers))))
        return list(track(done, total=len(cases), description=f"checking files ({workers} workers)", disable=not show))

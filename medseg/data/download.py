"""Download an official MSD task with MONAI's downloader: `python -m medseg.data.download Task04_Hippocampus`.

Needs internet. `--url`/`--md5` point it at a mirror (tests use a local file:// source).
"""

import argparse
from pathlib import Path

from monai.apps import DecathlonDataset, download_and_extract

from medseg import REPO_ROOT


def download_task(task: str, dest: str | Path, url: str | None = None, md5: str | None = None) -> Path:
    """Fetch `<task>.tar` (checked against its MD5) and extract it to `dest/<task>`; returns that folder.

    Raises ValueError naming the known tasks when `task` is not one of MONAI's and no `url` is given.
    """
    if url is None:
        if task not in DecathlonDataset.resource:
            known = ", ".join(sorted(DecathlonDataset.resource))
            raise ValueError(f"unknown MSD task {task!r}; known: {known}")
        url, md5 = DecathlonDataset.resource[task], DecathlonDataset.md5[task]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / task
    if (target / "dataset.json").is_file():
        return target
    download_and_extract(url=url, filepath=dest / f"{task}.tar", output_dir=str(dest), hash_val=md5, hash_type="md5")
    if not (target / "dataset.json").is_file():
        raise FileNotFoundError(f"{url}: the archive did not contain {task}/dataset.json")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", help="e.g. Task04_Hippocampus, Task01_BrainTumour")
    parser.add_argument("--dest", type=Path, default=REPO_ROOT / "data", help="folder to extract into")
    parser.add_argument("--url", help="archive URL (default: MONAI's MSD mirror)")
    parser.add_argument("--md5", help="MD5 of the archive at --url")
    args = parser.parse_args(argv)
    path = download_task(args.task, args.dest, args.url, args.md5)
    print(f"{path}  (train with: python -m medseg.train data=msd data.root={path})")


if __name__ == "__main__":
    main()

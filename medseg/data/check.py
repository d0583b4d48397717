"""Check a dataset from the shell: `python -m medseg.data.check <root> [--no-voxels]`; exits 1 on any error."""

import argparse
import sys
from pathlib import Path

from medseg.data.integrity import check_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check an MSD-layout dataset (dataset.json + NIfTI files).")
    parser.add_argument("root", type=Path, help="dataset folder holding dataset.json")
    parser.add_argument("--no-voxels", action="store_true", help="read headers only (fast; misses truncated data)")
    args = parser.parse_args(argv)

    report = check_dataset(args.root, check_voxels=not args.no_voxels)
    for problem in report.errors:
        print(f"error: {problem}")
    for problem in report.warnings:
        print(f"warning: {problem}")
    name = args.root.resolve().name
    print(f"{name}: {report.num_cases} cases, {len(report.errors)} errors, {len(report.warnings)} warnings")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())

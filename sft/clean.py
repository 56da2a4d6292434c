"""Removes the partial files that writes cut short (a kill, a full disk) leave in run folders: the model's
temporary folder (`.model.tmp/`, as large as the model), a checkpoint's (`checkpoints/.tmp-step-<N>/`) and
the temporary files of atomic writes (`*.tmp`). Complete files, the model and checkpoints are never touched.

    python -m sft.clean runs/<run> [runs/<run> ...]

A run folder that a live process trains in is refused (its temporary files are being written). Resuming
a run removes them too.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import SFTError
from .run_folder import lock_is_held, remove_partial_files


def clean(run_dir) -> str:
    """Removes a run folder's partial files; returns what it removed ("" for nothing)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise SFTError(f"{run_dir}: not a run folder (no config.json)")
    if lock_is_held(run_dir):
        raise SFTError(f"{run_dir} is in use: a process is training in it and writing its temporary files; "
                       f"wait for it to end")
    return remove_partial_files(run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft.clean", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    args = parser.parse_args(argv)
    for run_dir in map(Path, args.runs):
        try:
            removed = clean(run_dir)
        except SFTError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{run_dir}: removed {removed}" if removed else
              f"{run_dir}: no partial files")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write a run's figures: python -m sft.plot [RUN_DIR ...] [--runs-root DIR] [--out DIR]

With no RUN_DIR, the newest run under --runs-root (default: the repository's runs/). The PNGs go into
each run folder, or with --out into DIR/<run name>/ so that several runs do not overwrite each other.
Prints the paths written.
"""

import argparse
import sys
from pathlib import Path

from sft.analysis import latest_run
from sft.config import DEFAULT_RUNS_ROOT
from sft.errors import SFTError
from sft.plotting import write_figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run folders (default: the newest run)")
    parser.add_argument("--runs-root", default=DEFAULT_RUNS_ROOT,
                        help="where to look for the newest run (default: the repository's runs/)")
    parser.add_argument("--out", help="write into OUT/<run name>/ instead of the run folder")
    args = parser.parse_args(argv)
    try:
        run_dirs = [Path(d) for d in args.run_dirs] or [latest_run(args.runs_root)]
        for run_dir in run_dirs:
            out_dir = None if args.out is None else Path(args.out) / run_dir.resolve().name
            for path in write_figures(run_dir, out_dir):
                print(path)
    except SFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

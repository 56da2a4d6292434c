"""What the benchmarks share: running a measurement in a process of its own. Peak memory and the provenance
lines of a results file are in inf_tests.measure, which ships with the toolkit (bench/ does not) and which
the inference runtime uses too.

A benchmark runs each variant in a new Python process: nothing of one variant (compiled code, patched
model classes, allocator state, the peak memory) reaches the next, and a crash, an out-of-memory error or
a hang becomes that variant's status instead of the benchmark's end.
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAIL_LINES = 40  # the lines of a child's output kept for its status


@dataclass
class Finished:
    code: int | None    # the exit code; None when it was stopped at its timeout
    tail: list[str] = field(default_factory=list)  # its last lines of output (none when `output` is "inherit")

    def last_line(self) -> str | None:
        return next((line for line in reversed(self.tail) if line.strip()), None)


def run_isolated(argv: list[str], timeout_s: float, output: str = "inherit") -> Finished:
    """Runs `argv` from the repository root in a new process group, killed whole (dataset workers and
    compile workers too) at `timeout_s`, and when this process is stopped (SIGTERM, Ctrl-C), so that no
    orphan keeps the device. `output`: "inherit" (the child writes where this process does), "echo" (its
    stdout and stderr pass through this process's stdout, the last lines kept) or "quiet" (its stdout
    dropped, the last lines of its stderr kept)."""
    if output not in ("inherit", "echo", "quiet"):
        raise ValueError(f"output: 'inherit', 'echo' or 'quiet', got {output!r}")
    pipes = {"inherit": {}, "echo": dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
             "quiet": dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)}[output]
    child = subprocess.Popen(argv, cwd=ROOT, text=True, start_new_session=True, **pipes)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    stream = child.stdout if output == "echo" else child.stderr

    def pump():  # reads as the child writes, so that a full pipe never blocks it
        for line in stream:
            if output == "echo":
                sys.stdout.write(line)
            tail.append(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True) if stream is not None else None
    if reader is not None:
        reader.start()
    try:
        code = child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    if reader is not None:
        reader.join(timeout=5)
        sys.stdout.flush()
    return Finished(code, list(tail))

"""Writing the run folder (its schema is in RUN_FOLDER.md). JSON files are replaced atomically and
metrics are appended and flushed line by line, so a crash at any moment leaves readable files."""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "safetensors", "einops", "numpy",
            "pandas", "matplotlib", "gguf")


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(_jsonable(obj), f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes files private; run folders are meant to be shared
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    """NaN and infinity are not JSON: they are written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    return obj


class RunFolder:
    """A run folder. Every process holds one (checkpoints need the path everywhere), but only the main
    process's is `writable`; the others' writes do nothing."""

    def __init__(self, path: Path, writable: bool = True):
        self.path = Path(path)
        self.writable = writable

    @classmethod
    def create(cls, root: str | Path, experiment: str, now: dt.datetime | None = None) -> "RunFolder":
        """A new folder `<root>/<YYYY-MM-DD_HH-MM-SS>_<experiment>`; never reuses an existing one."""
        now = now or dt.datetime.now()
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        while True:
            path = root / f"{now:%Y-%m-%d_%H-%M-%S}_{experiment}"
            try:
                path.mkdir()
                return cls(path)
            except FileExistsError:
                now += dt.timedelta(seconds=1)

    def write_json(self, name: str, obj: Any) -> None:
        if self.writable:
            write_json_atomic(self.path / name, obj)

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def append_jsonl(self, name: str, record: dict) -> None:
        if not self.writable:
            return
        with open(self.path / name, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
            f.flush()

    def truncate_metrics(self, step: int) -> None:
        """Drops metric lines past `step`: a resumed run recomputes them from its checkpoint."""
        self._keep_lines("metrics.jsonl", lambda record: record["step"] <= step)

    def drop_samples(self, stage: str) -> None:
        self._keep_lines("samples.jsonl", lambda record: record.get("stage") != stage)

    def _keep_lines(self, name: str, keep) -> None:
        """Rewrites a JSONL file atomically with the records `keep` accepts; a line cut short by a
        crash is dropped."""
        path = self.path / name
        if not self.writable or not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if keep(json.loads(line)):
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)

    def update_summary(self, **fields: Any) -> dict:
        path = self.path / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        summary.update(fields)
        self.write_json("summary.json", summary)
        return summary


def collect_env(device: torch.device) -> dict:
    packages = {name: _version(name) for name in PACKAGES}
    if device.type == "cuda":
        dev = {"type": "cuda", "name": torch.cuda.get_device_name(device), "count": torch.cuda.device_count(),
               "cuda": torch.version.cuda}
    else:
        dev = {"type": device.type, "name": platform.processor() or platform.machine(),
               "count": 1, "threads": torch.get_num_threads()}
    return {"python": sys.version.split()[0], "packages": packages, "device": dev, "git": _git_state(),
            "command": sys.argv, "hostname": platform.node(), "started_at": dt.datetime.now().isoformat()}


def provenance(device: torch.device, packages: tuple[str, ...] = ("torch", "transformers")) -> list[str]:
    """Where a measurement comes from, as lines for the head of a results file: device, date, commit, versions."""
    env = collect_env(device)
    dev, git = env["device"], env["git"]
    commit = f"{git['commit'][:10]}{' (dirty)' if git['dirty'] else ''}" if git["commit"] else "unknown"
    versions = {name: env["packages"].get(name, _version(name)) or "not installed" for name in packages}
    return [f"device: {dev['name']}" + (f", CUDA {dev['cuda']}" if dev["type"] == "cuda" else
                                        f", {dev['threads']} threads"),
            f"date: {dt.datetime.now().isoformat(timespec='seconds')}, git {commit}, python {env['python']}",
            "packages: " + ", ".join(f"{k} {v}" for k, v in versions.items())]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# What measurements write: their changes do not make the code differ from the commit.
OUTPUT_PATHS = ("runs", "bench/results", "inf_tests/results")


def _git_state() -> dict:
    """The commit, and whether the code differs from it (changes under OUTPUT_PATHS do not count, so
    that a results file written a moment earlier, or being written, does not mark the next one dirty)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10,
                                  cwd=Path(__file__).resolve().parents[1]).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--", ".", *(f":(exclude){p}" for p in OUTPUT_PATHS))
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}

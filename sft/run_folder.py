"""Writing the run folder (its schema is in RUN_FOLDER.md). JSON files are replaced atomically and
metrics are appended and flushed line by line, so a crash at any moment leaves readable files."""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SFTError

if TYPE_CHECKING:
    import torch

HELDOUT = "heldout.jsonl"
HELDOUT_ROWS = "heldout_rows.json"  # past HELDOUT_MAX_BYTES: the held-out conversations' row numbers instead
HELDOUT_MAX_BYTES = 4 * 2**20  # a copy of the held-out set, small next to the model; a bigger one stays in its source
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "safetensors", "einops", "numpy",
            "pandas", "matplotlib", "gguf")
CONFIG = "config.json"

# Fault injection (tests make writes fail with it): when set, called as WRITE_HOOK(path, obj) before each JSON
# file is replaced (obj: the object) and each JSONL line is appended (obj: the record); an OSError it raises
# is handled as that write failing.
WRITE_HOOK: Callable[[Path, Any], None] | None = None


def write_json_atomic(path: Path, obj: Any) -> None:
    """Writes `path` under a temporary name and renames it into place: readers see the old file or the new
    one, never half of one. A failed write (a full disk) removes its temporary file and raises."""
    path = Path(path)
    if WRITE_HOOK is not None:
        WRITE_HOOK(path, obj)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(obj), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; run folders are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class WriteFailed(SFTError, OSError):
    """A write into a run folder failed (a full disk, a folder gone read-only): names the path and the room
    left on its file system."""

    def __init__(self, path: Path, cause: BaseException):
        self.reason = getattr(cause, "strerror", None) or " ".join(str(cause).split()) or type(cause).__name__
        super().__init__(getattr(cause, "errno", None), self.reason, str(path))
        self.path = Path(path)
        self.free = free_bytes(self.path)

    def __str__(self) -> str:
        free = "" if self.free is None else f"; {self.free / 2**30:.2f} GiB free there"
        return f"writing {self.path} failed ({self.reason}{free})"


def free_bytes(path: Path) -> int | None:
    """The free space of the file system that holds `path` (or would hold it), None if it cannot be read."""
    try:
        return require_room(path, 0)
    except (OSError, StopIteration):
        return None


def require_room(path: Path, need: int, refusal: Callable[[int], Exception] | None = None) -> int:
    """The free bytes of the file system that holds `path` (or would hold it: its nearest existing folder);
    raises `refusal(free)` when fewer than `need` are free. Every disk-room check and message reads it here."""
    existing = next(p for p in (Path(path), *Path(path).absolute().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if need > free and refusal is not None:
        raise refusal(free)
    return free


@contextlib.contextmanager
def writing(path: Path):
    """Inside, a failed write (an OSError) is raised as WriteFailed, naming `path`."""
    try:
        yield
    except WriteFailed:
        raise
    except OSError as e:
        raise WriteFailed(path, e) from e


def write_json_in_place(path: Path, obj: Any) -> None:
    """The last resort when the disk is full: rewrites an existing small file over its own blocks, which
    needs no new space as long as the text is no longer than the file system's block (4 KiB); a crash in
    the middle can tear it, which is why this is used only after an atomic write has failed."""
    text = json.dumps(_jsonable(obj), indent=2) + "\n"
    with open(path, "r+") as f:
        f.write(text)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())


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
    if type(obj).__name__ == "dtype" and str(obj).startswith("torch."):  # torch is not imported here
        return str(obj).removeprefix("torch.")
    return obj


def read_config(run_path: Path) -> dict | None:
    """A run folder's config.json: `config` (every setting) and `derived` (what the run resolved); None where
    the folder has none (it is not a run folder)."""
    path = Path(run_path) / CONFIG
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def train_record(step: int, epoch: float, loss: float, lr: float, grad_norm: float, tokens: int,
                 supervised_tokens: int, tokens_per_s: float, elapsed_s: float) -> dict:
    """metrics.jsonl's line of a logged training step (`loss` and `tokens_per_s`: over the steps since the
    line before; `tokens`, `supervised_tokens`: since the start)."""
    return {"kind": "train", "step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens": tokens, "supervised_tokens": supervised_tokens, "tokens_per_s": tokens_per_s,
            "elapsed_s": elapsed_s}


def eval_record(step: int, epoch: float, tokens: int, eval_loss: float, by_source: dict[str, float] | None,
                task_metric: float | None, task_metric_name: str | None, elapsed_s: float) -> dict:
    """metrics.jsonl's line of a held-out evaluation (`eval_loss_by_source` only in a mixture)."""
    return {"kind": "eval", "step": step, "epoch": epoch, "tokens": tokens, "eval_loss": eval_loss,
            **({"eval_loss_by_source": by_source} if by_source else {}), "task_metric": task_metric,
            "task_metric_name": task_metric_name, "elapsed_s": elapsed_s}


def sample_record(index: int, messages: list[dict], tools: list | None, prompt: str, reply, reference: str | None,
                  stage: str | None = None, decoding: dict | None = None) -> dict:
    """One generated sample: the prompt's messages (and the tools it may call), the prompt as rendered, the
    reply's fields (sft.template_traits.Reply.record) and the reference. A training run's samples.jsonl also
    names the `stage` and the `decoding`; sft.evaluate's results carry neither (their decoding is recorded once)."""
    return {**({"stage": stage} if stage is not None else {}), "index": index, "messages": list(messages),
            **({"tools": tools} if tools else {}), "prompt": prompt, **reply.record(), "reference": reference,
            **({"decoding": decoding} if decoding is not None else {})}


class RunFolder:
    """A run folder. Every process holds one (checkpoints need the path everywhere), but only the main
    process's is `writable`; the others' writes do nothing."""

    def __init__(self, path: Path, writable: bool = True):
        self.path = Path(path)
        self.writable = writable
        self.trackers = None  # sft.tracking.Trackers: fed every metrics record and every pass's samples

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
            with writing(self.path / name):
                write_json_atomic(self.path / name, obj)

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def append_jsonl(self, name: str, record: dict) -> None:
        if not self.writable:
            return
        with writing(self.path / name):
            if WRITE_HOOK is not None:
                WRITE_HOOK(self.path / name, record)
            with open(self.path / name, "a") as f:
                f.write(json.dumps(_jsonable(record)) + "\n")
                f.flush()

    def write_heldout(self, conversations: list[list[dict]], sources: list[str] | None = None,
                      tools: list | None = None, rows: list | None = None) -> int | None:
        """heldout.jsonl: the run's held-out conversations, one `{"messages": [...]}` line each (with the tools
        it may call as `tools`, and its dataset's name as `source` in a mixture), a file `python -m sft.evaluate
        RUN --heldout` reads as a dataset. Written atomically. Past HELDOUT_MAX_BYTES, heldout_rows.json holds
        their row numbers in their datasets instead (`rows`: (dataset, row from 1) of each). Returns the size of
        heldout.jsonl (None: too large)."""
        text = "".join(json.dumps({"messages": c, **({"tools": tools[i]} if tools and tools[i] else {}),
                                   **({"source": sources[i]} if sources else {})}, ensure_ascii=False) + "\n"
                       for i, c in enumerate(conversations))
        size = len(text.encode())
        if size > HELDOUT_MAX_BYTES:
            if rows and self.writable:
                self.write_json(HELDOUT_ROWS, {"rows": [{"dataset": d, "row": r} for d, r in rows]})
            return None
        if self.writable and conversations:  # data given in memory (benchmarks) may hold none
            path = self.path / HELDOUT
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                with writing(path):
                    tmp.write_text(text, encoding="utf-8")
                    os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return size

    def append_metrics(self, record: dict) -> None:
        """A metrics.jsonl line, and the same record to the run's trackers."""
        self.append_jsonl("metrics.jsonl", record)
        if self.writable and self.trackers is not None:
            self.trackers.log(record)

    def append_samples(self, stage: str, step: int, records: list[dict]) -> None:
        """A generation pass's samples.jsonl lines, and the same samples to the run's trackers."""
        for record in records:
            self.append_jsonl("samples.jsonl", record)
        if self.writable and self.trackers is not None:
            self.trackers.samples(stage, step, records)

    def close_trackers(self) -> None:
        if self.trackers is not None:
            trackers, self.trackers = self.trackers, None
            trackers.close()

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
        try:
            with writing(path):
                tmp.write_text("".join(kept))
                os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def update_summary(self, **fields: Any) -> dict:
        path = self.path / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        summary.update(fields)
        self.write_json("summary.json", summary)
        return summary

    def record_failure(self, status: str, reason: str) -> None:
        """Sets `status` and `reason` in the summary, keeping its numbers, even on a full disk: if the atomic
        write fails, only the status and reason are rewritten in place. Never raises: it runs while another
        error is being reported."""
        if not self.writable:
            return
        path = self.path / "summary.json"
        try:
            self.update_summary(status=status, reason=reason)
            return
        except OSError:
            pass
        try:  # over the file's own blocks: the numbers written so far, then only the status if they do not fit
            summary = json.loads(path.read_text()) if path.exists() else {}
            write_json_in_place(path, dict(summary, status=status, reason=reason[:500]))
        except (OSError, ValueError):
            try:
                write_json_in_place(path, {"status": status, "reason": reason[:500]})
            except OSError as e:
                print(f"warning: could not record status {status!r} in {path}: {e}", file=sys.stderr)


LOCK = "run.lock"


class RunLockError(SFTError):
    """Another live process is training in the run folder."""


class RunLock:
    """`run.lock` in a run folder: the process training there holds an exclusive `flock` on it and writes
    its pid, host and start time into it. The kernel releases the flock when the process ends, however it
    ends (SIGKILL too), so "is anyone training here?" is answered by trying to take it, not by trusting
    a pid. The file is removed when the run ends normally; a leftover file whose lock nobody holds is
    stale. On file systems without flock (some network mounts) the pid and host are all there is."""

    def __init__(self, run_path: Path):
        self.path = Path(run_path) / LOCK
        self._file = None

    def acquire(self) -> "RunLock":
        f = open(self.path, "a+")
        if not _try_lock(f):
            f.seek(0)
            owner = f.read().strip() or "unknown owner"
            f.close()
            raise RunLockError(f"{self.path.parent} is in use: another process is training in it ({owner}); "
                               f"wait for it to end or stop it first")
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": platform.node(),
                            "since": dt.datetime.now().isoformat(timespec="seconds")}))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            self._file.close()  # closing drops the flock
            self._file = None


def _try_lock(f, exclusive: bool = True) -> bool:
    try:
        import fcntl
    except ImportError:  # no flock on this platform: nothing to check against
        return True
    try:
        fcntl.flock(f.fileno(), (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def lock_is_held(run_path: Path) -> bool:
    """Whether a live process holds the run folder's lock (False where there is no lock file)."""
    path = Path(run_path) / LOCK
    if not path.exists():
        return False
    try:
        with open(path) as f:  # a shared probe: it never keeps a writer out for longer than the probe
            if not _try_lock(f, exclusive=False):
                return True
    except OSError:  # a read-only copy of a run folder: nobody trains in it from here
        return False
    return False


def partial_files(run_path: Path) -> list[Path]:
    """What writes cut short (a kill, a full disk) leave in a run folder: the model's temporary folder
    (`.model.tmp/`), a checkpoint's (`checkpoints/.tmp-step-<N>/`, as sft.checkpoint names it), and the
    temporary files of atomic writes (`*.tmp`, in the folder and in `eval/`)."""
    run_path = Path(run_path)
    found = [p for folder in (run_path, run_path / "eval") if folder.is_dir() for p in folder.glob("*.tmp")]
    if (run_path / "checkpoints").is_dir():
        found += (run_path / "checkpoints").glob(".tmp-*")
    return sorted(found)


def disk_bytes(path: Path) -> int:
    """The size of a file, or of all the files under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove_partial_files(run_path: Path) -> str:
    """Removes `partial_files` (the caller makes sure no process trains in the folder); returns what it
    removed, as `describe_files` names it ("" for nothing)."""
    found = [(p, disk_bytes(p)) for p in partial_files(run_path)]
    removed = describe_files(found, Path(run_path))
    for path, _ in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def describe_files(files: list[tuple[Path, int]], relative_to: Path) -> str:
    """`.model.tmp/ (538 MB), checkpoints/.tmp-step-000004/ (1.6 GB)`."""
    def size(n: int) -> str:
        return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"

    return ", ".join(f"{p.relative_to(relative_to)}{'/' if p.is_dir() else ''} ({size(n)})" for p, n in files)


def partial_files_note(run_path: Path) -> str | None:
    """One line naming the partial files of a run folder nobody trains in, and the command that removes them."""
    found = [(p, disk_bytes(p)) for p in partial_files(run_path)]
    if not found or lock_is_held(run_path):
        return None
    return (f"{run_path} holds partial files that an interrupted write left: {describe_files(found, Path(run_path))}; "
            f"`python -m sft.clean {run_path}` removes them (a resume does too)")


def collect_env(device: torch.device) -> dict:
    import torch

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


def _git_state(root: Path = Path(__file__).resolve().parents[1]) -> dict:
    """The commit of the checkout at `root` (this toolkit's), and whether the code differs from it (changes
    under OUTPUT_PATHS do not count, so that a results file written a moment earlier, or being written, does
    not mark the next one dirty)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10,
                                  cwd=root).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--", ".", *(f":(exclude){p}" for p in OUTPUT_PATHS))
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}

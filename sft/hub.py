"""Uploading a finished run's model to the Hugging Face hub (huggingface_hub), with its card.

`PUSH_TO_HUB = "user/name"` uploads `model/` after a completed run: to a private repository unless
`PUSH_PRIVATE = False`, on `PUSH_REVISION` (a branch, made if missing) or main. An upload that fails (no
network, no token, no rights) never fails the run: the run stays completed, and the failure is recorded in
summary.json (`push_to_hub`) and printed, with the command that retries it:

    python -m sft.hub runs/<run> user/name [--public] [--revision BRANCH]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, DataError, SFTError



@dataclass(frozen=True)
class Upload:
    repo_id: str
    folder: Path
    files: tuple[str, ...]   # paths inside `folder`, as they will be in the repository
    private: bool
    revision: str | None
    message: str


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"push_to_hub: {repo_id!r} is not a hub repository id (owner/name): {e}") from None
    if repo_id.count("/") != 1:
        raise ConfigError(f"push_to_hub: {repo_id!r} is not of the form owner/name")


def prepare_upload(run_dir, repo_id: str, private: bool = True, revision: str | None = None) -> Upload:
    """What would be uploaded: every file of the run's model/ folder (weights, tokenizer, card; an adapter run's
    adapter in peft's layout), or of model_merged/ when an adapter run merged its adapter for serving, checked
    before anything goes over the network."""
    from .modeling import is_model_folder

    check_repo_id(repo_id)
    merged = Path(run_dir) / "model_merged"
    folder = merged if (merged / "config.json").is_file() else Path(run_dir) / "model"
    if not is_model_folder(folder):
        raise DataError(f"{run_dir}: no saved model to upload (model/config.json is missing)")
    if not (folder / "README.md").is_file():
        raise DataError(f"{run_dir}: the model has no card (model/README.md); write it with "
                        f"python -m sft.card {run_dir}")
    files = tuple(sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()))
    if not any(f.endswith((".safetensors", ".bin")) for f in files):
        raise DataError(f"{run_dir}: model/ holds no weights (.safetensors)")
    return Upload(repo_id, folder, files, private, revision, f"Upload {Path(run_dir).name} (supervised finetune)")


def upload(plan: Upload) -> str:
    """Creates the repository (and branch) when missing and uploads the folder in one commit; returns the
    commit's URL. Raises the hub client's errors."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type="model")
    if plan.revision:
        api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True)
    info = api.upload_folder(repo_id=plan.repo_id, folder_path=plan.folder, revision=plan.revision,
                             commit_message=plan.message)
    return str(getattr(info, "commit_url", info))


def push_run(run_dir, repo_id: str, private: bool = True, revision: str | None = None) -> dict:
    """Uploads and says how it went, as summary.json records it: {"repo", "status": "uploaded" | "failed",
    "url" or "reason"}; a failure is never raised."""
    record = {"repo": repo_id, "private": private, "revision": revision}
    try:
        record.update(status="uploaded", url=upload(prepare_upload(run_dir, repo_id, private, revision)))
    except Exception as e:  # noqa: BLE001 - offline, auth, rights, quota: each client error has its own type
        record.update(status="failed", reason=failure_reason(e),
                      retry=f"python -m sft.hub {run_dir} {repo_id}" + ("" if private else " --public")
                      + (f" --revision {revision}" if revision else ""))
    return record


def failure_reason(e: Exception) -> str:
    """One line on why an upload failed, naming the cause a user can act on."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(e, LocalTokenNotFoundError):
        return "no hub token: log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, OfflineModeIsEnabled):
        return "the hub client is in offline mode (HF_HUB_OFFLINE is set); unset it where the hub is reachable"
    if isinstance(e, HfHubHTTPError) and e.response is not None and e.response.status_code in (401, 403):
        return f"the hub refused the upload ({e.response.status_code}): log in with `hf auth login` or set HF_TOKEN"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    network = ("ConnectionError", "ConnectError", "ConnectTimeout", "Timeout", "NameResolutionError")
    if any(name in type(e).__name__ or name in text for name in network):
        return f"the hub is unreachable from here ({type(e).__name__}: {text[:200]})"
    return f"{type(e).__name__}: {text[:300]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft.hub", description="Upload a run's model and card.")
    parser.add_argument("run", help="a completed run folder")
    parser.add_argument("repo_id", help="owner/name on the hub")
    parser.add_argument("--public", action="store_true", help="a public repository (default: private)")
    parser.add_argument("--revision", help="a branch to upload to (made if missing; default main)")
    args = parser.parse_args(argv)
    try:
        prepare_upload(args.run, args.repo_id, not args.public, args.revision)
    except SFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record = push_run(args.run, args.repo_id, not args.public, args.revision)
    if record["status"] != "uploaded":
        print(f"error: could not upload to {args.repo_id}: {record['reason']}", file=sys.stderr)
        return 1
    print(record["url"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput accounting and provenance: each device name finds its own peak and bandwidth; MFU is
6 x N x tokens/s / peak; the dirty flag of a results file is about the code, not other results."""
from __future__ import annotations

import pytest
import torch

from sft import perf


@pytest.mark.parametrize("name, flops, bandwidth", [
    ("NVIDIA H100 80GB HBM3", 989e12, 3.35e12),
    ("NVIDIA H100 PCIe", 756e12, 2.0e12),
    ("NVIDIA H200", 989e12, 4.8e12),
    ("NVIDIA GH200 480GB", 989e12, 4.0e12),  # holds "H200" too: the longest matching key wins
    ("NVIDIA B999", None, None),
])
def test_device_tables_match_the_longest_part_of_the_name(monkeypatch, name, flops, bandwidth):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda")
    assert perf.device_peak_flops(cuda) == flops
    assert perf.memory_bandwidth(cuda) == bandwidth
    assert perf.mfu(1_000_000_000, 50_000, cuda) == (None if flops is None else 6e9 * 50_000 / flops)


def test_no_peak_and_no_mfu_on_the_cpu():
    assert perf.device_peak_flops(torch.device("cpu")) is None
    assert perf.mfu(10**9, 1000.0, torch.device("cpu")) is None


def test_results_being_written_do_not_mark_the_code_dirty(tmp_path):
    """A provenance line says whether the code differs from the commit; the results files that a
    benchmark writes (or has just written) are not code. Checked in a repository of its own, so that
    neither this checkout's state nor its files play a part."""
    import subprocess

    from sft.run_folder import OUTPUT_PATHS, _git_state

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    clean = _git_state(tmp_path)
    assert clean["dirty"] is False and len(clean["commit"]) == 40
    for output in OUTPUT_PATHS:
        (tmp_path / output).mkdir(parents=True, exist_ok=True)
        (tmp_path / output / "probe.csv").write_text("x\n")
    assert _git_state(tmp_path) == clean
    (tmp_path / "sft" / "code.py").write_text("x = 2\n")
    assert _git_state(tmp_path)["dirty"] is True

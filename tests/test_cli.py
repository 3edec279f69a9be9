"""The command line, run as a user runs it: a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from mi_crow.store import LocalStore


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mi_crow.store", *args], capture_output=True, text=True, cwd=cwd, check=False
    )


def test_demo_writes_reads_and_prints_table(tmp_path: Path) -> None:
    proc = run_cli("demo", "--store", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Wrote and verified run 'demo'" in out
    assert "run   batch  layer" in out
    assert "demo  0      model.layers.0   activations     [4, 16, 64]  bfloat16  8.0 KiB" in out
    assert "1 run(s), 3 batch(es), 24 tensor(s)" in out
    store = LocalStore(tmp_path / "demo")
    assert store.list_run_batches("demo") == [0, 1, 2]
    meta, tensors = store.get_detector_metadata("demo", 2)
    assert meta == {"batch": 2, "tokens": 56}
    assert tensors["model.layers.11"]["activations"].dtype == torch.bfloat16
    # Running it again replaces the run rather than failing or duplicating it.
    assert run_cli("demo", "--store", str(tmp_path / "demo")).returncode == 0
    assert store.list_run_batches("demo") == [0, 1, 2]


def test_ls_lists_any_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_detector_metadata("a", 0, {}, {"L": {"activations": torch.ones(2, 3)}})
    store.put_run_batch("b", 5, {"x": torch.zeros(4, dtype=torch.int8)})
    proc = run_cli("ls", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[2].split() == ["a", "0", "L", "activations", "[2,", "3]", "float32", "24", "B"]
    assert lines[3].split() == ["b", "5", "(run", "batch)", "x", "[4]", "int8", "4", "B"]
    assert lines[-1] == "2 run(s), 2 batch(es), 2 tensor(s), 28 B"
    only = run_cli("ls", str(tmp_path), "--run", "b")
    assert "a  " not in only.stdout and "1 run(s)" in only.stdout


def test_version_and_help() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0 and "version" in proc.stdout
    assert "demo" in run_cli("--help").stdout

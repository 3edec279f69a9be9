"""The command line, run as a user runs it: a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
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


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


def test_verify_reports_exactly_the_planted_damage(tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "s"
    shutil.copytree(Path(__file__).parent / "fixtures" / "mi_crow_1_0_store", root)
    store = LocalStore(root)
    for i in range(3):
        store.put_detector_metadata(
            "mine", i, {"i": i}, {"L": {"activations": torch.randn(4, 8), "mask": torch.ones(4)}}
        )
        store.put_run_batch("mine", 10 + i, [torch.randn(16)])
        store.put_run_detector_metadata("mine", {"i": i}, {"L": {"top": torch.arange(5)}})
    store.put_model("sae", {"w": torch.randn(8, 8)}, {"k": 1})
    clean = run_cli("verify", str(root))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "ok: all runs and models verified" in clean.stdout

    planted = {
        root / "runs/mine/batch_0/L/activations.safetensors": "flip",
        root / "runs/mine/batch_000011.safetensors": "truncate",
        root / "runs/mine/batch_2/L/mask.safetensors": "delete",
        root / "runs/mine/batch_1/metadata.json": "json",
        root / "runs/mine/detectors/.entries/000000000001.safetensors": "flip",
        root / "runs/legacy-run/batch_1/model.layers.0/attention_mask.safetensors": "truncate",
        root / "models/sae/model.safetensors": "flip",
    }
    for path, how in planted.items():
        if how == "flip":
            _flip_last_byte(path)
        elif how == "truncate":
            path.write_bytes(path.read_bytes()[:-3])
        elif how == "delete":
            path.unlink()
        else:
            path.write_text('{"i": 1,')
    proc = run_cli("verify", str(root))
    assert proc.returncode == 1
    reported = {
        line.split(" ", 1)[1].split(": ", 1)[0] for line in proc.stdout.splitlines() if line.startswith("CORRUPT ")
    }
    assert reported == {str(p) for p in planted}
    assert f"{len(planted)} damaged file(s)" in proc.stdout
    assert "checksum mismatch" in proc.stdout
    only = run_cli("verify", str(root), "--run", "legacy-run")
    assert only.returncode == 1 and only.stdout.count("CORRUPT ") == 1
    # Reads name the damaged file; verify=True also catches the flipped bit.
    with pytest.raises(OSError, match="checksum mismatch"):
        LocalStore(root, verify=True).get_detector_metadata("mine", 0)
    assert LocalStore(root).get_detector_metadata("mine", 0)[0] == {"i": 0}  # without verify: size checks only


def test_gc_removes_leftovers_of_killed_writers(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_detector_metadata("r", 0, {}, {"L": {"activations": torch.ones(1000)}})
    live = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    (tmp_path / "runs/r/.tmp-deadbeef").write_bytes(b"x" * 4096)
    (tmp_path / "runs/r/.stage-cafe/L").mkdir(parents=True)
    (tmp_path / "runs/r/.stage-cafe/L/activations.safetensors").write_bytes(b"y" * 1000)
    (tmp_path / "runs/.trash-f00d").mkdir()
    note = run_cli("verify", str(tmp_path))
    assert note.returncode == 0 and "3 leftover(s) of interrupted writes" in note.stdout
    proc = run_cli("gc", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "3 leftover(s) removed, 5.0 KiB freed" in proc.stdout
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == live
    assert store.check() == []

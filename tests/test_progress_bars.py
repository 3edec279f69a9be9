"""Progress bars of the Python API's long work (copy_store, check): on stderr by default, off in quiet mode."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mi_crow.store import LocalStore, MemoryStore, copy_store, disable_progress_bars, enable_progress_bars

ENV = "MI_CROW_STORE_DISABLE_PROGRESS_BARS"


@pytest.fixture(autouse=True)
def _bars_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts with bars on (neither variable set, not in quiet mode) and leaves them so."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    enable_progress_bars()
    yield
    enable_progress_bars()


def populate(store: LocalStore | MemoryStore) -> None:
    """Run "a": 3 per-batch directories, 1 run batch file, metadata; 1 model: 6 entries to copy or check."""
    for i in range(3):
        store.put_detector_metadata("a", i, {"i": i}, {"L": {"activations": torch.ones(2, 3)}})
    store.put_run_batch("a", 7, [torch.ones(4)])
    store.put_run_metadata("a", {"k": 1})
    store.put_model("m", {"w": torch.ones(2)})


def test_copy_shows_a_bar_counting_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = LocalStore(tmp_path / "src")
    populate(src)
    report = copy_store(src, MemoryStore(), progress=True)
    out, err = capsys.readouterr()
    assert report.copied == 6 and out == ""
    assert "copy: 100%" in err and "6/6" in err and "copied=6" in err and "skipped=0" in err
    # The default shows it too; again, everything is skipped.
    dst = MemoryStore()
    copy_store(src, dst)
    assert "6/6" in capsys.readouterr().err
    copy_store(src, dst)
    assert "skipped=6" in capsys.readouterr().err


def test_verify_shows_a_bar_counting_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = LocalStore(tmp_path)
    populate(store)
    assert store.check(progress=True) == []
    out, err = capsys.readouterr()
    assert out == "" and "verify: 100%" in err and "6/6" in err
    assert store.check(["a"]) == []  # one run: its 4 batch entries and the rest, no models
    assert "5/5" in capsys.readouterr().err
    (tmp_path / "runs/a/batch_1/L/activations.safetensors").write_bytes(b"\0" * 3)
    problems = store.check(progress=True)
    assert [p.path for p in problems] == [str(tmp_path / "runs/a/batch_1/L/activations.safetensors")]
    assert "6/6" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["argument", "quiet mode", "environment"])
def test_no_bar_when_disabled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    src = LocalStore(tmp_path / "src")
    populate(src)
    kwargs: dict[str, bool] = {}
    if how == "argument":
        kwargs["progress"] = False
    elif how == "quiet mode":
        disable_progress_bars()
    else:
        monkeypatch.setenv(ENV, "1")
    assert copy_store(src, MemoryStore(), **kwargs).copied == 6
    assert src.check(**kwargs) == []
    assert capsys.readouterr() == ("", "")
    if how != "argument":  # a call's own progress=True wins over quiet mode
        src.check(progress=True)
        assert "6/6" in capsys.readouterr().err


def test_a_callback_gets_lines_and_no_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = LocalStore(tmp_path / "src")
    populate(src)
    lines: list[str] = []
    copy_store(src, MemoryStore(), progress=lines.append)
    assert [line.split(":")[0] for line in lines] == ["run 'a'", "models"]
    assert capsys.readouterr() == ("", "")


def test_the_cli_keeps_its_own_output(tmp_path: Path) -> None:
    """verify and copy into a pipe: their lines on stdout, no bar on stderr."""
    src = LocalStore(tmp_path / "src")
    populate(src)
    for args in (("verify", str(tmp_path / "src")), ("copy", str(tmp_path / "src"), str(tmp_path / "dst"))):
        proc = subprocess.run([sys.executable, "-m", "mi_crow.store", *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == "" and proc.stdout.splitlines()[-1].startswith(("ok: ", "copied 6 entries"))

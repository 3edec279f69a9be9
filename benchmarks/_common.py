"""Shared pieces of the benchmarks: timing, tables, the mi_crow 1.0 reference in a subprocess.

Every benchmark measures its candidates side by side in one run, on one directory, alternating
them round by round (this VM's memory balloon makes never-touched pages slower than reused
ones, so absolute numbers from different runs are not comparable), and prints medians and
ratios.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
REF_TARGET = Path(os.environ.get("MI_CROW_REF_PATH", REPO / ".venv" / "mi-crow-ref"))
REF_SPEC = "mi-crow==1.0.0.post10"


def parse_args(doc: str | None, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller sizes (CI)")
    parser.add_argument("--dir", default=None, help="directory to measure in (default: a temp dir under /tmp)")
    parser.add_argument("--no-reference", action="store_true", help="skip mi_crow 1.0")
    parser.add_argument(
        "--plot",
        default=None,
        metavar="DIR",
        help="also write a bar chart (PNG) of each table's ratio columns into DIR (needs matplotlib)",
    )
    if extra:
        extra(parser)
    args = parser.parse_args()
    if args.plot:
        _PLOT["dir"] = Path(args.plot)
        atexit.register(_write_plots)
    return args


# Tables printed by this process, kept for --plot: (section title, header, rows).
_PLOT: dict[str, Any] = {"dir": None, "title": "", "tables": []}


def _ratio(cell: Any) -> float | None:
    if isinstance(cell, (int, float)) and not isinstance(cell, bool):
        return float(cell)
    text = str(cell).strip().rstrip("x")
    try:
        return float(text)
    except ValueError:
        return None


def _write_plots() -> None:
    """One PNG per ratio column ("vs ...", "a / b") of each printed table, made from the measured values."""
    out: Path = _PLOT["dir"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; no plots written to {out}", file=sys.stderr)
        return
    out.mkdir(parents=True, exist_ok=True)
    script = Path(sys.argv[0]).stem
    for t, (title, head, rows) in enumerate(_PLOT["tables"]):
        for c, name in enumerate(head):
            if c == 0 or not (str(name).startswith("vs ") or " / " in str(name)):
                continue
            points = [(str(r[0]), _ratio(r[c])) for r in rows]
            points = [(label, v) for label, v in points if v is not None]
            if not points:
                continue
            fig, ax = plt.subplots(figsize=(8, 0.45 * len(points) + 1.2))
            ax.barh([p[0] for p in points][::-1], [p[1] for p in points][::-1], color="#3f51b5")
            ax.axvline(1.0, color="black", linewidth=0.8)
            ax.set_xlabel(str(name))
            ax.set_title(title or script, fontsize=10)
            fig.tight_layout()
            slug = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")
            path = out / f"{script}-{t}-{slug}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            print(f"plot: {path}", file=sys.stderr)


@contextmanager
def work_dir(path: str | None) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="mi-crow-bench-", dir=path))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def proc_io(field: str) -> int:
    """A counter of /proc/self/io: ``rchar``/``wchar`` are bytes passed to read()/write() calls."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def rotated(names: Sequence[str], rep: int) -> list[str]:
    """The candidates' order in round ``rep``: rotated by one each round, so over len(names)
    rounds each runs in every position and after each other one equally often."""
    k = rep % len(names)
    return [*names[k:], *names[:k]]


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def raw_bytes(t: torch.Tensor) -> memoryview:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().data


def plain_write(path: Path, t: torch.Tensor) -> None:
    """The machine's limit: one ``f.write`` of the tensor's bytes to a new file."""
    with open(path, "wb") as f:
        f.write(raw_bytes(t))


def print_header(title: str) -> None:
    _PLOT["title"] = title
    print(f"\n## {title}\n")
    py, cores = platform.python_version(), os.cpu_count()
    print(f"machine: {platform.node()}, {cores} cores, Python {py}, torch {torch.__version__}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M')}\n")


def print_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    if _PLOT["dir"] is not None:
        _PLOT["tables"].append((_PLOT["title"], list(head), [list(r) for r in rows]))
    cells = [list(map(str, head))] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    for n, r in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    sys.stdout.flush()


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 1000 else f"{c:.0f}"
    return str(c)


def ensure_reference() -> bool:
    """Install mi_crow 1.0 (its code only, ``--no-deps``) beside the venv; False if impossible."""
    if (REF_TARGET / "mi_crow" / "store").is_dir():
        return True
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(REF_TARGET), REF_SPEC],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode == 0


class Reference:
    """mi_crow 1.0's LocalStore, running in its own process (its code never enters ours).

    The worker imports mi_crow from ``REF_TARGET`` ahead of this package and answers one JSON
    command per line (see ``_mi_crow_worker.py``).
    """

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REF_TARGET)}
        worker = Path(__file__).with_name("_mi_crow_worker.py")
        self.proc = subprocess.Popen(
            [sys.executable, str(worker)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the mi_crow reference worker died")
        out: dict[str, Any] = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"mi_crow reference: {out['error']}")
        return out

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(30)


@contextmanager
def reference(args: argparse.Namespace) -> Iterator[Reference | None]:
    """The mi_crow 1.0 worker for the benchmark's rounds (None when it is off or not installable);
    stopped when the block ends."""
    if args.no_reference:
        yield None
        return
    if not ensure_reference():
        print("note: mi_crow 1.0 could not be installed; reference columns are left out")
        yield None
        return
    ref = Reference()
    try:
        yield ref
    finally:
        ref.close()


def make_tensor(shape: Sequence[int], dtype: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(getattr(torch, dtype))


@contextmanager
def base_worktree(rev: str) -> Iterator[tuple[str, Path] | None]:
    """``(short hash, path of its src)`` of commit ``rev`` checked out in a temporary git worktree,
    removed afterwards; None (with a note) where the commit or git is not available (a shallow clone)."""
    try:
        short = subprocess.run(
            ["git", "rev-parse", "--short", "--verify", f"{rev}^{{commit}}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        print(f"note: commit {rev!r} is not available here (a shallow clone?); nothing to compare with")
        yield None
        return
    tree = tempfile.mkdtemp(prefix="mi-crow-base-")
    try:
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", tree, short], cwd=REPO, check=True, capture_output=True
        )
        yield short, Path(tree) / "src"
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=REPO, check=False, capture_output=True)
        shutil.rmtree(tree, ignore_errors=True)


def object_store_missing() -> str | None:
    """Why the object-storage benchmarks cannot run here (no obstore, no ``weed``), or None."""
    try:
        import obstore  # noqa: F401
    except ImportError:
        return "obstore is not installed (pip install 'mi-crow-store[s3]')"
    try:
        from mi_crow.store.testing.seaweedfs import SeaweedFSError, find_weed
    except ModuleNotFoundError as e:  # the testing package imports pytest and hypothesis
        if e.name not in ("pytest", "_pytest", "hypothesis"):
            raise
        return f"mi_crow.store.testing needs {e.name} (pip install 'mi-crow-store[testing]')"
    try:
        find_weed()
    except SeaweedFSError as e:
        return str(e)
    return None

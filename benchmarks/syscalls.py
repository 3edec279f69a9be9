"""System calls per store call, this tree against an earlier commit: a count that machine noise cannot blur.

    python benchmarks/syscalls.py [--base REV]

Each workload runs 10 times under ``strace -f`` in a fresh process of each version (the base
commit's ``src`` from a temporary git worktree); the calls between two markers are counted
(futex wake-ups of the CRC helper thread left out) and divided by 10. Needs ``strace``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, base_worktree, print_header, print_table

CHILD = r"""
import os, sys, tempfile
sys.path.insert(0, sys.argv[1])
import torch
from mi_crow.store import LocalStore
assert os.path.realpath(sys.modules["mi_crow.store"].__file__).startswith(os.path.realpath(sys.argv[1]))
s = LocalStore(tempfile.mkdtemp())
g = torch.Generator().manual_seed(0)
big = {f"model.layers.{i}": {f"k{j}": torch.randn(256, generator=g) for j in range(4)} for i in range(64)}
small = {f"l{i}": {"a": torch.ones(256), "b": torch.ones(256)} for i in range(4)}
s.put_detector_metadata("r", 0, {"n": 1}, big)
s.put_run_metadata("r", {"model": "gpt2"})
s.put_detector_metadata("r", 1, {}, small)
ops = {
    "get_detector_metadata, 64 layers x 4 keys": lambda: s.get_detector_metadata("r", 0),
    "put_detector_metadata (overwrite), 4 x 2": lambda: s.put_detector_metadata("r", 2, {}, small),
    "get_detector_metadata_by_layer_by_key": lambda: s.get_detector_metadata_by_layer_by_key("r", 1, "l2", "b"),
    "put_run_metadata": lambda: s.put_run_metadata("r", {"model": "gpt2"}),
    "get_run_metadata": lambda: s.get_run_metadata("r"),
    "put_run_detector_metadata": lambda: s.put_run_detector_metadata("r", {}, small),
    "list_run_batches": lambda: s.list_run_batches("r"),
}
fn = ops[sys.argv[2]]
fn()
os.write(2, b"MARK-START\n")
for _ in range(10):
    fn()
os.write(2, b"MARK-END\n")
"""
OPS = [line.split('"')[1] for line in CHILD.splitlines() if line.startswith('    "')]


def count(src: Path, op: str, trace: Path) -> float:
    subprocess.run(
        ["strace", "-f", "-o", str(trace), sys.executable, "-c", CHILD, str(src), op],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    inside, n = False, 0
    for line in trace.read_text().splitlines():
        if "MARK-START" in line:
            inside = True
        elif "MARK-END" in line:
            inside = False
        elif inside and "futex" not in line and "resumed>" not in line:
            n += 1
    return n / 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD~1")
    parser.add_argument("--quick", action="store_true", help="accepted for ./dev bench; the counts are exact anyway")
    parser.add_argument("--plot", default=None, metavar="DIR", help="accepted for ./dev bench; counts are not plotted")
    args = parser.parse_args()
    if shutil.which("strace") is None:
        print("note: strace is not installed; system calls are not counted")
        return
    with base_worktree(args.base) as base, tempfile.TemporaryDirectory() as tmp:
        if base is None:
            return
        rev, base_src = base
        print_header(f"System calls per call, this tree against {rev}")
        rows = []
        for op in OPS:
            before = count(base_src, op, Path(tmp) / "trace")
            this = count(REPO / "src", op, Path(tmp) / "trace")
            rows.append([op, f"{before:g}", f"{this:g}", f"{this - before:+g}"])
    print_table(["call", f"base {rev}", "this tree", "difference"], rows)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""This tree against an earlier commit of the package, side by side in one run.

    python benchmarks/versus_commit.py [--base REV] [--quick]

The base commit's ``src`` is checked out into a temporary git worktree; each version runs in its
own worker process (``_version_worker.py``) on its own directory, and the two alternate round by
round, in rotating order, on the same workloads: large and small batch writes, batch and tensor
reads, appends, run metadata, listing and deletes. Prints the median seconds per call of each
version and the ratio (this tree / base; below 1 is faster).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import REPO, base_worktree, median, parse_args, print_header, print_table, rotated, work_dir

# op, calls per round (full, quick)
OPS = [
    ("put_batch_large", 4, 2),
    ("put_batch_small", 200, 50),
    ("get_batch_64x4", 50, 10),
    ("get_one_tensor", 500, 100),
    ("get_one_tensor_32MiB", 20, 5),
    ("append_4KiB", 300, 50),
    ("run_metadata_put_get", 300, 50),
    ("list_10k_batches", 10, 3),
    ("delete_run_20_batches", 5, 2),
]


class Worker:
    def __init__(self, src: Path):
        script = Path(__file__).with_name("_version_worker.py")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(src)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def call(self, **cmd: object) -> list[float]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        if "error" in out:
            raise RuntimeError(out["error"])
        return list(out["seconds"])

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(60)


def main() -> None:
    def extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("--base", default="HEAD~1", help="the commit to compare with (HEAD~1)")
        p.add_argument("--only", default="", help="comma-separated workloads to run (default: all)")
        p.add_argument("--rounds", type=int, default=None, help="rounds (default 8, quick 3)")

    args = parse_args(__doc__, extra)
    ops = [op for op in OPS if not args.only or op[0] in args.only.split(",")]
    rounds = args.rounds or (3 if args.quick else 8)
    with base_worktree(args.base) as base, work_dir(args.dir) as root:
        if base is None:
            return
        base_rev, base_src = base
        print_header(f"This tree against commit {base_rev}")
        workers = {"base": Worker(base_src), "this": Worker(REPO / "src")}
        times: dict[tuple[str, str], list[float]] = {}
        ratios: dict[str, list[float]] = {}
        for rep in range(rounds):
            for op, n_full, n_quick in ops:
                this_round = {}
                for name in rotated(list(workers), rep):
                    got = workers[name].call(op=op, n=n_quick if args.quick else n_full, root=str(root / name))
                    times.setdefault((op, name), []).extend(got)
                    this_round[name] = median(got)
                ratios.setdefault(op, []).append(this_round["this"] / this_round["base"])
        for w in workers.values():
            w.close()
    rows = []
    for op, _, _ in ops:
        base, this = median(times[(op, "base")]), median(times[(op, "this")])
        r = ratios[op]
        rows.append(
            [op, f"{base * 1e6:.0f} us", f"{this * 1e6:.0f} us", f"{median(r):.2f}x", f"{min(r):.2f}-{max(r):.2f}x"]
        )
    print(f"{rounds} rounds, versions alternating in rotating order; medians of every call, and the ratio")
    print("this / base of each round's medians (median over rounds, and its range): below 1 is faster\n")
    print_table(["workload", f"base {base_rev}", "this tree", "this / base", "range over rounds"], rows)


if __name__ == "__main__":
    main()

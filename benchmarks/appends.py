"""Run-level appends: put_run_detector_metadata stays O(its own size) however long the run.

    python benchmarks/appends.py [--quick]

Appends N entries of 1 MiB each to one run, alternating each append with a plain write of the
same bytes to a new file (the page cache grows the same way for both, so comparing their
slow-down isolates the store), and reports the mean time of the last 100 against the first
100 and the bytes written (``wchar`` of /proc/self/io) against the data appended. Then it
streams the run back with iter_run_detector_metadata and reports peak memory. mi_crow 1.0
(which rewrites every file on each append) is measured on a shorter run, side by side.
"""

from __future__ import annotations

import resource
import shutil
import time

from _common import make_tensor, parse_args, print_header, print_table, proc_io, raw_bytes, reference, work_dir

from mi_crow.store import LocalStore


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main() -> None:
    args = parse_args(__doc__)
    n = 1000 if args.quick else 10_000
    n_ref = 120 if args.quick else 200
    print_header("Run-level appends")
    t = make_tensor([256 * 1024], "float32")  # 1 MiB
    data = t.numel() * 4
    rows = []
    with reference(args) as ref:
        with work_dir(args.dir) as root:
            store = LocalStore(root / "ours")
            (root / "plain").mkdir()
            times, plain_times, written = [], [], 0
            for i in range(n):
                t0 = time.perf_counter()
                with open(root / "plain" / str(i), "wb") as f:
                    f.write(raw_bytes(t))
                plain_times.append(time.perf_counter() - t0)
                w0 = proc_io("wchar")
                t0 = time.perf_counter()
                store.put_run_detector_metadata("run", {"i": i}, {"sae": {"acts": t}})
                times.append(time.perf_counter() - t0)
                written += proc_io("wchar") - w0
            first, last = mean(times[:100]), mean(times[-100:])
            pfirst, plast = mean(plain_times[:100]), mean(plain_times[-100:])
            rows.append(["plain write", n, f"{pfirst * 1e3:.2f} ms", f"{plast * 1e3:.2f} ms", plast / pfirst, "", 1.0])
            rows.append(
                [
                    "ours",
                    n,
                    f"{first * 1e3:.2f} ms",
                    f"{last * 1e3:.2f} ms",
                    last / first,
                    (last / first) / (plast / pfirst),
                    written / (n * data),
                ]
            )
            # Streaming back: memory stays bounded by one entry.
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t0 = time.perf_counter()
            count = 0
            for meta, tensors in store.iter_run_detector_metadata("run"):
                assert meta["i"] == count and tensors["sae"]["acts"].numel() == t.numel()
                count += 1
            read_s = time.perf_counter() - t0
            grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
            shutil.rmtree(root / "ours")
            shutil.rmtree(root / "plain")
            if ref is not None:
                r = ref.call(op="appends", root=str(root / "ref"), run="run", numel=t.numel(), count=n_ref)
                rt, w = r["times"], n_ref // 4
                rows.append(
                    [
                        "mi_crow 1.0",
                        n_ref,
                        f"{mean(rt[:w]) * 1e3:.2f} ms (first {w})",
                        f"{mean(rt[-w:]) * 1e3:.2f} ms (last {w})",
                        mean(rt[-w:]) / mean(rt[:w]),
                        "",
                        r["written"] / (n_ref * data),
                    ]
                )
        print_table(
            [
                "store",
                "appends of 1 MiB",
                "mean of first 100",
                "mean of last 100",
                "last/first",
                "last/first over plain's",
                "bytes written / data",
            ],
            rows,
        )
        print(
            f"\niter_run_detector_metadata: {count} entries in {read_s:.2f} s "
            f"({count * data / read_s / 1e9:.2f} GB/s); peak RSS grew by {grew / 2**20:.1f} MiB "
            f"(one entry is {data / 2**20:.0f} MiB)"
        )


if __name__ == "__main__":
    main()

"""Write throughput: put_detector_metadata against a plain f.write of the same bytes and mi_crow 1.0.

    python benchmarks/write.py [--quick]

Sections: throughput (fp32 32 MiB, bf16 16 MiB, 8 layers x 2 keys), peak extra memory while
putting a 512 MiB tensor, durable mode, 1 GiB of puts until synced to disk, and 512 tensors of
4 KiB in one batch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _common import (
    make_tensor,
    median,
    parse_args,
    plain_write,
    print_header,
    print_table,
    raw_bytes,
    reference,
    rotated,
    timed,
    work_dir,
)

from mi_crow.store import LocalStore

CASES = [
    ("fp32 [32,128,2048], 1 tensor", 1, 1, [32, 128, 2048], "float32"),
    ("bf16 [32,128,2048], 1 tensor", 1, 1, [32, 128, 2048], "bfloat16"),
    ("fp32 [32,128,256], 8 layers x 2 keys", 8, 2, [32, 128, 256], "float32"),
]

PEAK_CHILD = r"""
import sys, torch
from mi_crow.store import LocalStore
def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
t = torch.randn(*map(int, sys.argv[2].split(","))).to(getattr(torch, sys.argv[3]))
t.add_(0)
rss = kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
LocalStore(sys.argv[1]).put_detector_metadata("peak", 0, {}, {"l": {"k": t}})
print((kib("VmHWM") - rss) * 1024, t.numel() * t.element_size())
"""


def tensors(layers: int, keys: int, shape: list[int], dtype: str) -> dict[str, dict[str, torch.Tensor]]:
    return {
        f"layer{i}": {f"key{k}": make_tensor(shape, dtype, i * 100 + k) for k in range(keys)} for i in range(layers)
    }


def plain_fallocate(path: Path, t: torch.Tensor) -> None:
    """A plain write after ``fallocate`` of the file's size: what the store does for large files."""
    data = raw_bytes(t)
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, data.nbytes)
        f.write(data)


def by_hand(batch: Path, tm: dict[str, dict[str, torch.Tensor]]) -> None:
    """mi_crow's per-batch layout written directly, without any safety: what the layout costs."""
    batch.mkdir()
    for layer, d in tm.items():
        (batch / layer).mkdir()
        for key, t in d.items():
            plain_write(batch / layer / f"{key}.safetensors", t)
    (batch / "metadata.json").write_text("{}")


def throughput(root: Path, ref: object, reps: int) -> None:
    rows = []
    for name, layers, keys, shape, dtype in CASES:
        tm = tensors(layers, keys, shape, dtype)
        nbytes = sum(t.numel() * t.element_size() for d in tm.values() for t in d.values())
        store = LocalStore(root / "ours")
        no_crc = LocalStore(root / "ours", checksums=False)
        # The run directory exists beforehand, as in real use; plain writes new files beside it.
        run_dir = root / "ours" / "runs" / "run"
        store.put_run_metadata("run", {})
        if ref is not None:
            ref.call(  # type: ignore[attr-defined]
                op="put_detector",
                root=str(root / "ref"),
                run="run",
                batch=10**6,
                layers=1,
                keys=1,
                shape=[1],
                dtype="float32",
            )

        def plain_files(write: Callable[[Path, torch.Tensor], None], tag: str, rep: int) -> None:
            for layer, d in tm.items():
                for key, t in d.items():
                    write(run_dir / f"{tag}-{rep}-{layer}-{key}.bin", t)

        def mi_crow(rep: int) -> float:
            out = ref.call(  # type: ignore[attr-defined]
                op="put_detector",
                root=str(root / "ref"),
                run="run",
                batch=rep,
                layers=layers,
                keys=keys,
                shape=shape,
                dtype=dtype,
            )
            return float(out["seconds"])

        candidates: dict[str, Callable[[int], float]] = {
            "plain": lambda rep: timed(lambda: plain_files(plain_write, "plain", rep)),
            "plain+fallocate": lambda rep: timed(lambda: plain_files(plain_fallocate, "falloc", rep)),
            "layout by hand": lambda rep: timed(lambda: by_hand(run_dir / f"hand_{rep}", tm)),
            "ours": lambda rep: timed(lambda: store.put_detector_metadata("run", rep, {"i": rep}, tm)),
            "ours, checksums=False": lambda rep: timed(
                lambda: no_crc.put_detector_metadata("run", 10**5 + rep, {"i": rep}, tm)
            ),
        }
        if ref is not None:
            candidates["mi_crow"] = mi_crow
        names = list(candidates)
        times: dict[str, list[float]] = {who: [] for who in names}
        for rep in range(reps):
            # Rotate the order, so each candidate runs after each other one equally often (a
            # candidate right after mi_crow's large clones would otherwise be slowed every time).
            for who in rotated(names, rep):
                times[who].append(candidates[who](rep))
            # Delete the round's files (so writes reuse freed pages rather than never-touched
            # ones, which this VM's memory balloon makes several times slower), then os.sync()
            # lets the file system finish the deletion (ext4 with online discard stalls the next
            # metadata operations otherwise) before anything is timed.
            for p in run_dir.iterdir():
                if p.name != "meta.json":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            shutil.rmtree(root / "ref" / "runs" / "run" / f"batch_{rep}", ignore_errors=True)
            os.sync()
        shutil.rmtree(root / "ours", ignore_errors=True)
        shutil.rmtree(root / "ref", ignore_errors=True)
        m = {who: median(v) if v else float("nan") for who, v in times.items()}
        m.setdefault("mi_crow", float("nan"))
        rows.append(
            [
                name,
                f"{nbytes / 2**20:.0f} MiB",
                nbytes / m["plain"] / 1e9,
                nbytes / m["plain+fallocate"] / 1e9,
                nbytes / m["ours"] / 1e9,
                nbytes / m["mi_crow"] / 1e9,
                m["plain"] / m["ours"],
                m["plain+fallocate"] / m["ours"],
                m["plain+fallocate"] / m["ours, checksums=False"],
                m["plain"] / m["layout by hand"],
                m["plain"] / m["mi_crow"],
                m["mi_crow"] / m["ours"],
            ]
        )
    print_table(
        [
            "case",
            "size",
            "plain GB/s",
            "plain+fallocate GB/s",
            "ours GB/s",
            "mi_crow GB/s",
            "ours/plain",
            "ours/(plain+fallocate)",
            "ours checksums=False/(plain+fallocate)",
            "layout by hand/plain",
            "mi_crow/plain",
            "ours vs mi_crow",
        ],
        rows,
    )
    print(
        f"\nmedians of {reps} rounds, candidates in rotating order; throughput ratios (higher is better)."
        " 'plain' is one f.write of the tensor's bytes to a new file; 'plain+fallocate' preallocates the"
        " file's blocks first, as the store does for files of 256 KiB or more (ext4's delayed allocation"
        " otherwise reserves space page by page inside write). 'layout by hand' writes mi_crow's batch layout"
        " (directories, files, metadata.json) directly with plain writes and no safety. 'checksums=False'"
        " skips the CRC-32 that the store otherwise computes on a helper thread while writing."
    )


def peak_memory(root: Path, ref: object, quick: bool) -> None:
    shape, dtype = ([128, 1024, 1024], "float32") if not quick else ([64, 1024, 1024], "float32")
    rows = []
    out = subprocess.run(
        [sys.executable, "-c", PEAK_CHILD, str(root / "peak-ours"), ",".join(map(str, shape)), dtype],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    extra, size = int(out[0]), int(out[1])
    rows.append(["ours", f"{size / 2**20:.0f} MiB", f"{extra / 2**20:.1f} MiB", f"{100 * extra / size:.1f}%"])
    if ref is not None:
        r = ref.call(op="peak_put", root=str(root / "peak-ref"), shape=shape, dtype=dtype)  # type: ignore[attr-defined]
        rows.append(
            [
                "mi_crow 1.0",
                f"{r['tensor_bytes'] / 2**20:.0f} MiB",
                f"{r['extra_bytes'] / 2**20:.1f} MiB",
                f"{100 * r['extra_bytes'] / r['tensor_bytes']:.1f}%",
            ]
        )
    print_table(["store", "tensor", "peak extra RSS during put", "of the tensor"], rows)
    shutil.rmtree(root / "peak-ours", ignore_errors=True)
    shutil.rmtree(root / "peak-ref", ignore_errors=True)


def durability(root: Path, reps: int) -> None:
    t = make_tensor([32, 128, 2048], "float32")
    tm = {"l": {"k": t}}
    nbytes = t.numel() * 4
    fast, durable = LocalStore(root / "fast"), LocalStore(root / "durable", durable=True)
    times: dict[str, list[float]] = {"plain": [], "plain+fsync": [], "ours": [], "ours durable": []}

    def plain_fsync(path: Path) -> None:
        with open(path, "wb") as f:
            f.write(t.numpy().data)
            f.flush()
            os.fsync(f.fileno())

    fast.put_run_metadata("r", {})
    durable.put_run_metadata("r", {})
    (root / "p").mkdir()
    for rep in range(reps):
        times["plain"].append(timed(lambda: plain_write(root / "p" / f"{rep}", t)))
        times["plain+fsync"].append(timed(lambda: plain_fsync(root / "p" / f"f{rep}")))
        times["ours"].append(timed(lambda: fast.put_detector_metadata("r", rep, {}, tm)))
        times["ours durable"].append(timed(lambda: durable.put_detector_metadata("r", rep, {}, tm)))
        for p in (root / "p").iterdir():
            p.unlink()
        for s in (fast, durable):
            shutil.rmtree(s.base_path / "runs" / "r" / f"batch_{rep}")
        os.sync()
    rows = [[k, f"{median(v) * 1e3:.1f} ms", nbytes / median(v) / 1e9] for k, v in times.items()]
    print_table(["32 MiB fp32 put", "median", "GB/s"], rows)


def sustained(root: Path, quick: bool) -> None:
    """Many puts back to back, then os.sync(): the time until the data is on disk, writeback
    included (preallocation moves block allocation out of writeback into the write call)."""
    n, reps = (8, 3) if quick else (32, 7)
    t = make_tensor([32, 128, 2048], "float32")
    tm = {"l": {"k": t}}
    nbytes = n * t.numel() * 4

    base = root / "sustained"

    def plain_files(write: Callable[[Path, torch.Tensor], None]) -> None:
        base.mkdir()
        for i in range(n):
            write(base / f"{i}", t)

    def ours() -> None:
        store = LocalStore(base)
        for i in range(n):
            store.put_detector_metadata("r", i, {}, tm)

    candidates: dict[str, Callable[[], None]] = {
        "plain": lambda: plain_files(plain_write),
        "plain+fallocate": lambda: plain_files(plain_fallocate),
        "ours": ours,
    }
    names = list(candidates)
    times: dict[str, list[float]] = {who: [] for who in names}
    for rep in range(reps):
        for who in rotated(names, rep):
            # This VM hands memory untouched for a while back to its host; the next write into
            # it is several times slower. Touch (and free) more than the candidate will write,
            # so every candidate's page cache comes from memory the guest holds.
            warm = torch.ones(nbytes + (256 << 20), dtype=torch.uint8)
            del warm
            times[who].append(timed(lambda: (candidates[who](), os.sync())))
            shutil.rmtree(base)
            os.sync()
    plain = median(times["plain"])
    best = min(times["plain"])
    rows = [
        [
            who,
            f"{median(v):.2f} s",
            nbytes / median(v) / 1e9,
            plain / median(v),
            f"{min(v):.2f} s",
            best / min(v),
            " ".join(f"{x:.2f}" for x in v),
        ]
        for who, v in times.items()
    ]
    print_table(
        [f"{n} x 32 MiB puts, then os.sync()", "median", "GB/s", "vs plain", "best", "best vs plain's", "rounds (s)"],
        rows,
    )
    print(
        "\nOn a VM that returns idle memory to its host, a round either finds its page cache in memory"
        " the guest holds or has to fault it in again (2-4x slower); 'best' is each candidate's round"
        " in the first state."
    )


def small_tensors(root: Path, reps: int) -> None:
    n, layers = 512, 8
    tm = {
        f"layer{i}": {f"key{k}": make_tensor([1024], "float32", i * 1000 + k) for k in range(n // layers)}
        for i in range(layers)
    }
    store = LocalStore(root / "ours")
    raw_t: list[float] = []
    ours_t: list[float] = []

    def raw(rep: int) -> None:
        base = root / "raw" / f"batch_{rep}"
        for layer, d in tm.items():
            (base / layer).mkdir(parents=True)
            for key, t in d.items():
                plain_write(base / layer / f"{key}.safetensors", t)

    (root / "raw").mkdir()
    store.put_run_metadata("r", {})
    # Nothing is deleted between rounds here: deleting thousands of small files on this VM's
    # ext4 (online discard) stalls file creation for hundreds of microseconds afterwards.
    for rep in range(reps):
        raw_t.append(timed(lambda: raw(rep)))
        ours_t.append(timed(lambda: store.put_detector_metadata("r", rep, {}, tm)))
    r, o = median(raw_t), median(ours_t)
    print_table(
        ["512 tensors x 4 KiB in one batch", "median", "per tensor"],
        [
            ["raw files (mkdir + write)", f"{r * 1e3:.1f} ms", f"{r / n * 1e6:.0f} us"],
            ["ours (put_detector_metadata)", f"{o * 1e3:.1f} ms", f"{o / n * 1e6:.0f} us"],
            ["ours / raw", f"{o / r:.2f}x", ""],
        ],
    )


def main() -> None:
    args = parse_args(__doc__)
    reps = 6 if args.quick else 24
    print_header("Write throughput")
    with reference(args) as ref, work_dir(args.dir) as root:
        throughput(root, ref, reps)
        print("\n### Peak extra memory during one put\n")
        peak_memory(root, ref, args.quick)
        print("\n### Durability modes\n")
        durability(root, reps)
        print("\n### Sustained: many puts, then sync\n")
        sustained(root, args.quick)
        print("\n### Many small tensors\n")
        small_tensors(root, reps)


if __name__ == "__main__":
    main()

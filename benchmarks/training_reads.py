"""Training-side reads: rows/s and GB/s, sequential and shuffled, side by side.

    python benchmarks/training_reads.py [--quick]

Writes one layer's activations ([16, 256, 2048] fp32, 32 MiB a batch; 2 GiB in all, 256 MiB
with --quick), then reads every row once per candidate, summing each yielded batch (so every
element is touched): readinto of the same bytes from raw files, mi_crow 1.0's StoreDataloader
(in its own process, on the same store), this package's StoreDataloader, and ActivationDataset
sequential and shuffled (256 MiB shuffle window). Rounds alternate the candidates.
"""

from __future__ import annotations

import time

import torch
from _common import median, parse_args, print_header, print_table, raw_bytes, reference, work_dir

from mi_crow.store import ActivationDataset, LocalStore, StoreDataloader

SHAPE = (16, 256, 2048)
BATCH = 4096


def consume(batches: object) -> tuple[float, int]:
    t0 = time.perf_counter()
    rows = 0
    for b in batches:  # type: ignore[attr-defined]
        b.sum().item()
        rows += b.shape[0]
    return time.perf_counter() - t0, rows


def main() -> None:
    args = parse_args(__doc__)
    n = 8 if args.quick else 64
    reps = 3 if args.quick else 5
    print_header("Training-side reads")
    with reference(args) as ref:
        with work_dir(args.dir) as root:
            store = LocalStore(root / "store")
            (root / "raw").mkdir()
            for i in range(n):
                t = torch.randn(*SHAPE)
                store.put_detector_metadata("run", i, {}, {"layer": {"activations": t}})
                (root / "raw" / f"{i}.bin").write_bytes(raw_bytes(t))
            total_rows = n * SHAPE[0] * SHAPE[1]
            nbytes = total_rows * SHAPE[2] * 4

            def readinto() -> tuple[float, int]:
                def gen() -> object:
                    for i in range(n):
                        out = torch.empty(SHAPE[0] * SHAPE[1], SHAPE[2])
                        with open(root / "raw" / f"{i}.bin", "rb", buffering=0) as f:
                            f.readinto(raw_bytes(out))
                        yield from out.split(BATCH)

                return consume(gen())

            candidates = {
                "readinto (raw files)": readinto,
                "ours StoreDataloader": lambda: consume(StoreDataloader(store, "run", "layer", batch_size=BATCH)),
                "ActivationDataset sequential": lambda: consume(
                    ActivationDataset(store, "run", "layer", batch_size=BATCH)
                ),
                "ActivationDataset sequential, prefetch=0": lambda: consume(
                    ActivationDataset(store, "run", "layer", batch_size=BATCH, prefetch=0)
                ),
                "ActivationDataset shuffled": lambda: consume(
                    ActivationDataset(store, "run", "layer", batch_size=BATCH, shuffle=True, seed=0)
                ),
            }
            times: dict[str, list[float]] = {k: [] for k in [*candidates, "mi_crow 1.0 StoreDataloader"]}
            for rep in range(reps):
                order = list(candidates)
                if rep % 2:
                    order.reverse()
                for name in order:
                    seconds, rows = candidates[name]()
                    assert rows == total_rows, (name, rows)
                    times[name].append(seconds)
                if ref is not None:
                    r = ref.call(op="dataloader", root=str(root / "store"), run="run", layer="layer", batch_size=BATCH)
                    assert r["rows"] == total_rows
                    times["mi_crow 1.0 StoreDataloader"].append(r["seconds"])
        ref_t = median(times["mi_crow 1.0 StoreDataloader"]) if times["mi_crow 1.0 StoreDataloader"] else None
        seq = median(times["ActivationDataset sequential"])
        rows_out = []
        for name, ts in times.items():
            if not ts:
                continue
            m = median(ts)
            rows_out.append(
                [
                    name,
                    f"{m:.2f} s",
                    f"{total_rows / m / 1e6:.2f} M",
                    nbytes / m / 1e9,
                    (ref_t / m) if ref_t else "",
                    seq / m,
                ]
            )
        print(f"{n} batches, {total_rows} rows of {SHAPE[2]} fp32, {nbytes / 2**30:.2f} GiB; batch_size {BATCH}\n")
        print_table(["reader", "median epoch", "rows/s", "GB/s", "vs mi_crow loader", "vs sequential"], rows_out)


if __name__ == "__main__":
    main()

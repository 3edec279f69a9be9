"""Read throughput: one tensor of a batch, against readinto of the same bytes and mi_crow 1.0.

    python benchmarks/read.py [--quick]

Every candidate reads a 32 MiB fp32 tensor of a batch holding 8 layers x 2 keys (256 MiB) and
touches every element (a sum); files are in the page cache. Also reports the bytes each read
pulled from the file system (``rchar`` of /proc/self/io): only that tensor's file.
"""

from __future__ import annotations

import mmap

import torch
from _common import (
    make_tensor,
    median,
    parse_args,
    print_header,
    print_table,
    proc_io,
    raw_bytes,
    reference,
    timed,
    work_dir,
)

from mi_crow.store import LocalStore


def main() -> None:
    args = parse_args(__doc__)
    reps = 7 if args.quick else 21
    print_header("Read throughput")
    shape = [32, 128, 2048]
    tm = {f"layer{i}": {f"key{k}": make_tensor(shape, "float32", i * 100 + k) for k in range(2)} for i in range(8)}
    target = tm["layer3"]["key1"]
    nbytes = target.numel() * 4
    with reference(args) as ref:
        with work_dir(args.dir) as root:
            store = LocalStore(root / "ours")
            store.put_detector_metadata("run", 0, {}, tm)
            if ref is not None:
                ref.call(
                    op="put_detector",
                    root=str(root / "ref"),
                    run="run",
                    batch=0,
                    layers=8,
                    keys=2,
                    shape=shape,
                    dtype="float32",
                )
            raw = root / "raw.bin"
            raw.write_bytes(raw_bytes(target))
            verify = LocalStore(root / "ours", verify=True)

            reused = torch.empty(shape)

            def plain(out: torch.Tensor | None = None) -> None:
                out = torch.empty(shape) if out is None else out
                with open(raw, "rb", buffering=0) as f:
                    f.readinto(raw_bytes(out))
                out.sum().item()

            def plain_mmap() -> None:
                with open(raw, "rb", buffering=0) as f:
                    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                torch.frombuffer(m, dtype=torch.float32).sum().item()

            def ours(s: LocalStore = store) -> None:
                s.get_detector_metadata_by_layer_by_key("run", 0, "layer3", "key1").sum().item()

            times: dict[str, list[float]] = {
                "readinto (new buffer)": [],
                "readinto (reused buffer)": [],
                "mmap": [],
                "ours": [],
                "ours verify=True": [],
                "ours mmap=False": [],
                "mi_crow": [],
            }
            unmapped = LocalStore(root / "ours", mmap=False)
            read_bytes = 0
            for _rep in range(reps):
                times["readinto (new buffer)"].append(timed(plain))
                times["readinto (reused buffer)"].append(timed(lambda: plain(reused)))
                times["mmap"].append(timed(plain_mmap))
                times["ours mmap=False"].append(timed(lambda: ours(unmapped)))
                r0 = proc_io("rchar")
                times["ours"].append(timed(ours))
                read_bytes = proc_io("rchar") - r0
                times["ours verify=True"].append(timed(lambda: ours(verify)))
                if ref is not None:
                    times["mi_crow"].append(
                        ref.call(op="read_one", root=str(root / "ref"), run="run", batch=0, layer="layer3", key="key1")[
                            "seconds"
                        ]
                    )
            assert torch.equal(store.get_detector_metadata_by_layer_by_key("run", 0, "layer3", "key1"), target)
        new, mapped = median(times["readinto (new buffer)"]), median(times["mmap"])
        rows = [
            [k, f"{median(v) * 1e3:.2f} ms", nbytes / median(v) / 1e9, new / median(v), mapped / median(v)]
            for k, v in times.items()
            if v
        ]
        print_table(["read 32 MiB + touch every element", "median", "GB/s", "vs readinto", "vs mmap"], rows)
        print(
            f"\nread() calls by ours pulled {read_bytes} bytes (the header's 64 KiB read; the data is mapped) for a "
            f"{nbytes}-byte tensor in a {8 * 2 * nbytes}-byte batch: other tensors' files are never opened"
        )


if __name__ == "__main__":
    main()

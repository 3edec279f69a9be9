"""ObjectStore in a forked process (its requests made by the helper process) against the same
store in the process that forked it (obstore called directly), on one SeaweedFS server.

    python benchmarks/fork_helper.py [--rounds N] [--sizes 32,256]

A DataLoader worker forked after the training script used obstore makes its requests through
the helper (``mi_crow.store._s3_proxy``): each object crosses a pipe once more. This measures
what that costs: ``get_run_batch`` / ``put_run_batch`` of one fp32 tensor of each size, in the
parent (direct) and in one long-lived forked child (through its helper), alternating round by
round; the raw ``obstore.get(...).bytes()`` of the same object in the parent is the network's
limit. Figures are medians of the rounds; the ratio is the median of per-round ratios.

Then the local disk cache (``cache_dir``): one epoch of ``ActivationDataset`` over a run of 16
batches of 8 MiB without a cache, the first epoch with one (fetch and insert), and the next
(hits, mapped from the cache files), each in a fresh store.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from typing import Any

import torch

MiB = 1 << 20


def _timed(fn: object) -> float:
    t = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default="32,256", help="tensor sizes in MiB")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    try:
        import obstore

        from mi_crow.store import _s3_proxy
        from mi_crow.store.object_store import ObjectStore
        from mi_crow.store.testing.seaweedfs import SeaweedFS, find_weed

        find_weed()
    except Exception as e:  # no obstore or no weed binary: nothing to measure here
        print(f"note: skipped ({e})")
        return 0
    with SeaweedFS() as server:
        bucket = server.new_bucket("bench")
        url = f"s3://{bucket}/{uuid.uuid4().hex}"
        store = ObjectStore(url, config=server.store_config(), client_options=server.client_options())
        raw = server.client(bucket)
        for mb in sizes:
            store.put_run_batch("r", mb, [torch.rand(mb * MiB // 4)])
        store.get_run_metadata("r")  # obstore used: a forked child must go through the helper
        requests_r, requests_w = os.pipe()
        answers_r, answers_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: run what the parent asks, answer with the seconds it took
            os.close(requests_w)
            os.close(answers_r)
            try:
                with os.fdopen(requests_r) as requests:
                    for line in requests:
                        op, mb = line.split()
                        if op == "get":
                            dt = _timed(lambda mb=mb: store.get_run_batch("r", int(mb)))
                        else:
                            t = torch.rand(int(mb) * MiB // 4)
                            dt = _timed(lambda mb=mb, t=t: store.put_run_batch("r", 1000 + int(mb), [t]))
                        os.write(answers_w, f"{dt} {_s3_proxy.helper_pid()}\n".encode())
            finally:
                os._exit(0)
        os.close(requests_r)
        os.close(answers_w)
        answers = os.fdopen(answers_r)

        def in_child(op: str, mb: int) -> float:
            os.write(requests_w, f"{op} {mb}\n".encode())
            return float(answers.readline().split()[0])

        in_child("get", sizes[0])  # starts the helper
        rows = []
        for mb in sizes:
            key = f"{url.split('/', 3)[3]}/runs/r/batch_{mb:06d}.safetensors"
            for op in ("get", "put"):
                direct, helped, rawt = [], [], []
                for i in range(args.rounds):
                    t = torch.rand(mb * MiB // 4)
                    order = ["direct", "child"] if i % 2 == 0 else ["child", "direct"]
                    for who in order:
                        if who == "child":
                            helped.append(in_child(op, mb))
                        elif op == "get":
                            direct.append(_timed(lambda mb=mb: store.get_run_batch("r", mb)))
                        else:
                            direct.append(_timed(lambda mb=mb, t=t: store.put_run_batch("r", 2000 + mb, [t])))
                    if op == "get":
                        rawt.append(_timed(lambda key=key: obstore.get(raw, key).bytes()))
                ratio = statistics.median(h / d for h, d in zip(helped, direct, strict=True))
                d, h = statistics.median(direct), statistics.median(helped)
                r = f"{mb / statistics.median(rawt):.0f}" if rawt else "-"
                rows.append((f"{op} {mb} MiB", f"{mb / d:.0f}", f"{mb / h:.0f}", f"{ratio:.2f}x", r))
        os.close(requests_w)
        os.waitpid(pid, 0)
        cache_rows = _cache_epochs(server, url, args.rounds)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, rounds {args.rounds}")
    print(f"{'':<14}{'direct MiB/s':>14}{'forked MiB/s':>14}{'time ratio':>12}{'raw get MiB/s':>15}")
    for row in rows:
        print(f"{row[0]:<14}{row[1]:>14}{row[2]:>14}{row[3]:>12}{row[4]:>15}")
    print(f"\n{'ActivationDataset epoch, 128 MiB':<40}{'MiB/s':>8}")
    for name, mibs in cache_rows:
        print(f"{name:<40}{mibs:>8.0f}")
    return 0


def _cache_epochs(server: Any, url: str, rounds: int) -> list[tuple[str, float]]:
    import shutil
    import tempfile

    from mi_crow.store import ActivationDataset
    from mi_crow.store.object_store import ObjectStore

    def store(**options: Any) -> ObjectStore:
        return ObjectStore(url, config=server.store_config(), client_options=server.client_options(), **options)

    writer = store()
    for i in range(16):
        writer.put_detector_metadata("c", i, {}, {"L": {"activations": torch.rand(2048, 1024)}})
    total = 16 * 8

    def epoch(s: ObjectStore) -> float:
        ds = ActivationDataset(s, "c", "L", batch_size=4096)
        return _timed(lambda: sum(len(b) for b in ds))

    none, fill, hit = [], [], []
    for _ in range(rounds):
        none.append(epoch(store()))
        cache = tempfile.mkdtemp(prefix="mi-crow-cache-")
        try:
            fill.append(epoch(store(cache_dir=cache)))
            hit.append(epoch(store(cache_dir=cache)))
        finally:
            shutil.rmtree(cache)
    return [
        ("no cache", total / statistics.median(none)),
        ("cache, first epoch (fetch + insert)", total / statistics.median(fill)),
        ("cache, next epoch (hits)", total / statistics.median(hit)),
    ]


if __name__ == "__main__":
    sys.exit(main())

"""Runs one version of this package's LocalStore for ``versus_commit.py``, one JSON command per line.

Started with that version's ``src`` first on ``sys.path`` (``argv[1]``); it checks that the store
it imported comes from there. Each command sets up its own data and answers with the seconds
each timed call took.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback

SRC = sys.argv[1]
sys.path.insert(0, SRC)

import torch  # noqa: E402

import mi_crow.store  # noqa: E402
from mi_crow.store import LocalStore  # noqa: E402

assert os.path.realpath(mi_crow.store.__file__).startswith(os.path.realpath(SRC)), mi_crow.store.__file__


def tensors(layers: int, keys: int, numel: int, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {
        f"model.layers.{i}": {f"k{j}": torch.randn(numel, generator=g).to(dtype) for j in range(keys)}
        for i in range(layers)
    }


def timed(fn: object, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t0)
    return out


def run(cmd: dict[str, object]) -> list[float]:
    root = str(cmd["root"])
    n = int(cmd["n"])  # type: ignore[call-overload]
    op = cmd["op"]
    shutil.rmtree(root, ignore_errors=True)
    store = LocalStore(root)
    if op == "put_batch_large":  # a capture batch: 2 layers x [32,128,1024] bf16 + an int64 mask
        big = {
            f"l{i}": {
                "activations": torch.randn(32, 128, 1024).to(torch.bfloat16),
                "attention_mask": torch.ones(32, 128, dtype=torch.int64),
            }
            for i in range(2)
        }
        counter = iter(range(10**9))
        return timed(lambda: store.put_detector_metadata("r", next(counter), {"n": 1}, big), n)
    if op == "put_batch_small":  # syscall-bound: 4 layers x 2 keys of 1 KiB
        small = tensors(4, 2, 256, torch.float32)
        counter = iter(range(10**9))
        return timed(lambda: store.put_detector_metadata("r", next(counter), {"n": 1}, small), n)
    if op == "get_batch_64x4":
        store.put_detector_metadata("r", 0, {"n": 1}, tensors(64, 4, 256, torch.float32))
        return timed(lambda: store.get_detector_metadata("r", 0), n)
    if op == "get_one_tensor":
        store.put_detector_metadata("r", 0, {"n": 1}, tensors(4, 2, 256, torch.float32))
        return timed(lambda: store.get_detector_metadata_by_layer_by_key("r", 0, "model.layers.2", "k1"), n)
    if op == "get_one_tensor_32MiB":
        store.put_detector_metadata("r", 0, {}, {"l": {"k": torch.randn(8 << 20)}})
        return timed(lambda: store.get_detector_metadata_by_layer_by_key("r", 0, "l", "k").sum(), n)
    if op == "append_4KiB":
        t = {"sae": {"top": torch.arange(1024, dtype=torch.int32)}}
        return timed(lambda: store.put_run_detector_metadata("r", {"step": 1}, t), n)
    if op == "run_metadata_put_get":
        meta = {"model": "gpt2", "layers": [f"h.{i}" for i in range(12)], "loss": 0.5}
        return timed(lambda: (store.put_run_metadata("r", meta), store.get_run_metadata("r")), n)
    if op == "list_10k_batches":
        run_dir = os.path.join(root, "runs", "r")
        os.makedirs(run_dir)
        for i in range(10_000):
            os.mkdir(os.path.join(run_dir, f"batch_{i}"))
        return timed(lambda: store.list_run_batches("r"), n)
    if op == "delete_run_20_batches":
        small = tensors(4, 2, 256, torch.float32)

        def once() -> float:
            for i in range(20):
                store.put_detector_metadata("r", i, {}, small)
            t0 = time.perf_counter()
            store.delete_run("r")
            return time.perf_counter() - t0

        return [once() for _ in range(n)]
    raise ValueError(f"unknown op {op!r}")


for line in sys.stdin:
    try:
        print(json.dumps({"seconds": run(json.loads(line))}), flush=True)
    except Exception:
        print(json.dumps({"error": traceback.format_exc()}), flush=True)

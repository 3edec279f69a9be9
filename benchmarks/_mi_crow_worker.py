"""Runs mi_crow 1.0's LocalStore for the benchmarks, one JSON command per stdin line.

Started by ``_common.Reference`` with mi_crow 1.0 first on PYTHONPATH; it imports nothing from
this repository. Each command creates its own tensors (same shapes, dtypes and seeds as the
benchmark's) and answers with the seconds the store call took.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch

import mi_crow.store
from mi_crow.store import LocalStore

assert not hasattr(mi_crow.store, "LayoutStore"), "expected mi_crow 1.0, found mi-crow-store"


def make_tensor(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(getattr(torch, dtype))


def peak_rss_reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def wchar():
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise KeyError("wchar")


cache = {}


def tensors_for(cmd):
    key = json.dumps([cmd["layers"], cmd["keys"], cmd["shape"], cmd["dtype"]])
    if key not in cache:
        cache.clear()
        cache[key] = {
            f"layer{i}": {f"key{k}": make_tensor(cmd["shape"], cmd["dtype"], i * 100 + k) for k in range(cmd["keys"])}
            for i in range(cmd["layers"])
        }
    return cache[key]


def handle(cmd):
    op = cmd["op"]
    store = LocalStore(cmd["root"])
    if op == "put_detector":
        tm = tensors_for(cmd)
        t0 = time.perf_counter()
        store.put_detector_metadata(cmd["run"], cmd["batch"], {"i": cmd["batch"]}, tm)
        return {"seconds": time.perf_counter() - t0}
    if op == "read_one":
        t0 = time.perf_counter()
        t = store.get_detector_metadata_by_layer_by_key(cmd["run"], cmd["batch"], cmd["layer"], cmd["key"])
        t.float().sum().item() if t.dtype != torch.float32 else t.sum().item()
        return {"seconds": time.perf_counter() - t0}
    if op == "get_detector":
        t0 = time.perf_counter()
        store.get_detector_metadata(cmd["run"], cmd["batch"])
        return {"seconds": time.perf_counter() - t0}
    if op == "peak_put":
        t = make_tensor(cmd["shape"], cmd["dtype"])
        t.add_(0)
        rss = status_kib("VmRSS")
        peak_rss_reset()
        store.put_detector_metadata("peak", 0, {}, {"l": {"k": t}})
        return {"extra_bytes": (status_kib("VmHWM") - rss) * 1024, "tensor_bytes": t.numel() * t.element_size()}
    if op == "dataloader":
        from mi_crow.store.store_dataloader import StoreDataloader

        t0 = time.perf_counter()
        rows = 0
        for b in StoreDataloader(store, cmd["run"], cmd["layer"], batch_size=cmd["batch_size"]):
            b.sum().item()
            rows += b.shape[0]
        return {"seconds": time.perf_counter() - t0, "rows": rows}
    if op == "appends":
        t = make_tensor([cmd["numel"]], "float32")
        times, w0 = [], wchar()
        for i in range(cmd["count"]):
            t0 = time.perf_counter()
            store.put_run_detector_metadata(cmd["run"], {"i": i}, {"l": {"k": t}})
            times.append(time.perf_counter() - t0)
        return {"times": times, "written": wchar() - w0}
    raise ValueError(f"unknown op {op}")


for line in sys.stdin:
    try:
        out = handle(json.loads(line))
    except Exception:
        out = {"error": traceback.format_exc()}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
os._exit(0)

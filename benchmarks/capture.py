"""Capture cost: forward-only against ActivationCapture, on CPU and (when present) CUDA.

    python benchmarks/capture.py [--quick] [--device cuda] [--stats both|on|off]

A bf16 decoder stack (torch.nn.TransformerEncoderLayer, as in shared/bench/gpu_capture_baseline.py)
runs N batches; k layers are captured. Side by side in one run, in rotating order:
  forward only; ActivationCapture into a LocalStore (pipelined), with its per-layer statistics
  (the default) and without them (stats=False; --stats picks one or both); and the naive way
  (.cpu() in the hook, then a synchronous put_detector_metadata after each forward).
The floor is max(forward time, captured bytes / plain-write throughput), the write throughput
being measured in the same run on the same directory with f.write of the same bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import torch
from _common import median, parse_args, plain_write, print_header, print_table, rotated, work_dir
from torch import nn

from mi_crow.store import ActivationCapture, LocalStore


def extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the model (CPU)")
    parser.add_argument(
        "--stats",
        choices=["both", "on", "off"],
        default="both",
        help="ActivationCapture with statistics, without, or both",
    )


def build(layers: int, d: int, heads: int, device: str) -> nn.Module:
    torch.manual_seed(0)
    blocks = [
        nn.TransformerEncoderLayer(
            d, heads, 4 * d, batch_first=True, norm_first=True, dropout=0.0, device=device, dtype=torch.bfloat16
        )
        for _ in range(layers)
    ]
    return nn.Sequential(*blocks).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    args = parse_args(__doc__, extra)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cpu":
        n_layers, d, heads, batch, tokens, n = (4, 256, 4, 8, 128, 4) if args.quick else (8, 512, 8, 16, 256, 6)
    else:
        n_layers, d, heads, batch, tokens, n = (16, 2048, 16, 32, 512, 12)
    captured = [str(i) for i in range(0, n_layers, max(1, n_layers // 4))][:4]
    reps = 4 if args.quick else 8
    print_header(f"Capture on {device}")
    model = build(n_layers, d, heads, device)
    xs = [torch.randn(batch, tokens, d, device=device, dtype=torch.bfloat16) for _ in range(n)]
    per_batch = batch * tokens * d * 2 * len(captured)
    total = per_batch * n
    with_stats = {"both": [True, False], "on": [True], "off": [False]}[args.stats]
    cap_names = {True: "ActivationCapture (stats on)", False: "ActivationCapture (stats off)"}
    with work_dir(args.dir) as root, torch.inference_mode():
        for _ in range(2):  # warm-up
            model(xs[0])
        sync(device)
        sample = torch.empty(per_batch // 2, dtype=torch.bfloat16)
        modules = dict(model.named_modules())

        def forward_only(rep: int) -> float:
            t0 = time.perf_counter()
            for x in xs:
                model(x)
            sync(device)
            return time.perf_counter() - t0

        def capture(rep: int, stats: bool) -> float:
            store = LocalStore(root / f"cap{rep}")
            t0 = time.perf_counter()
            with ActivationCapture(model, store, "run", captured, stats=stats, progress=False):
                for x in xs:
                    model(x)
            sync(device)
            return time.perf_counter() - t0

        def naive(rep: int) -> float:
            store = LocalStore(root / f"naive{rep}")
            grabbed: dict[str, torch.Tensor] = {}
            handles = [
                modules[name].register_forward_hook(
                    lambda m, a, o, name=name: grabbed.__setitem__(name, o.cpu().clone())
                )
                for name in captured
            ]
            t0 = time.perf_counter()
            for i, x in enumerate(xs):
                model(x)
                store.put_detector_metadata("run", i, {}, {k: {"activations": v} for k, v in grabbed.items()})
            elapsed = time.perf_counter() - t0
            for h in handles:
                h.remove()
            return elapsed

        def plain(rep: int) -> float:
            (root / f"plain{rep}").mkdir()
            t0 = time.perf_counter()
            for i in range(n):
                for k in range(2):
                    plain_write(root / f"plain{rep}" / f"{i}-{k}", sample)
            return time.perf_counter() - t0

        candidates = {
            "forward only": forward_only,
            **{cap_names[on]: (lambda rep, on=on: capture(rep, on)) for on in with_stats},
            "naive (.cpu() + sync put)": naive,
            "plain write of the bytes": plain,
        }
        times: dict[str, list[float]] = {name: [] for name in candidates}
        names = list(candidates)
        for rep in range(reps):
            # Rotate the order; each candidate starts with its predecessor's files gone and
            # written back (os.sync), so no candidate pays for another's writeback.
            for who in rotated(names, rep):
                times[who].append(candidates[who](rep))
                for d_ in (f"cap{rep}", f"naive{rep}", f"plain{rep}"):
                    shutil.rmtree(root / d_, ignore_errors=True)
                os.sync()
    fwd, write = median(times["forward only"]), median(times["plain write of the bytes"])
    floor = max(fwd, write)
    rows = [[name, f"{median(ts):.3f} s", median(ts) / fwd, median(ts) / floor] for name, ts in times.items()]
    print(
        f"{n_layers}-layer bf16 decoder, d={d}, {n} batches of {batch}x{tokens} tokens, "
        f"{len(captured)} layers captured ({per_batch / 2**20:.1f} MiB a batch, {total / 2**20:.0f} MiB in all), "
        f"torch threads {torch.get_num_threads()}, {reps} rounds\n"
    )
    print_table(["", "median", "vs forward only", "vs floor"], rows)
    if len(with_stats) == 2:
        on, off = median(times[cap_names[True]]), median(times[cap_names[False]])
        print(f"\nstatistics on / off: {on:.3f} s / {off:.3f} s = {on / off:.3f}")
    print(f"\nfloor = max(forward {fwd:.3f} s, captured bytes / plain write {write:.3f} s) = {floor:.3f} s")


if __name__ == "__main__":
    main()

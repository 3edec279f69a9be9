"""Profile of the write path: where the time of put_detector_metadata goes.

    python benchmarks/profile_write.py [--quick]

Runs cProfile over puts of a 32 MiB fp32 tensor and prints the functions by own time. The data
is written by os.write straight from the tensor's memory: no Python-level copy (no bytes(),
tobytes(), clone() or join) appears, and the peak-memory figure of write.py confirms it.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import shutil

from _common import make_tensor, parse_args, print_header, work_dir

from mi_crow.store import LocalStore


def main() -> None:
    args = parse_args(__doc__)
    reps = 10 if args.quick else 40
    print_header("Profile of the write path (cProfile, own time)")
    t = make_tensor([32, 128, 2048], "float32")
    with work_dir(args.dir) as root:
        store = LocalStore(root)
        store.put_run_metadata("r", {})
        prof = cProfile.Profile()
        for rep in range(reps):
            prof.enable()
            store.put_detector_metadata("r", rep, {}, {"layer": {"activations": t}})
            prof.disable()
            shutil.rmtree(root / "runs" / "r" / f"batch_{rep}")
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).sort_stats("tottime")
    stats.print_stats(12)
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    print("```")
    print("\n".join(line[:140] for line in lines[start - 4 : start + 13]))
    print("```")


if __name__ == "__main__":
    main()

"""ActivationDataset under torch.distributed: two real ranks (gloo) agree on each epoch's snapshot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

from mi_crow.store import LocalStore

WORKER = Path(__file__).with_name("dist_worker.py")


def test_ranks_read_rank_zeros_snapshot_and_every_row_once(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    for i in range(10):
        ids = torch.arange(12 * i, 12 * i + 12, dtype=torch.float32).reshape(4, 3, 1).expand(4, 3, 4).contiguous()
        store.put_detector_metadata("r", i, {}, {"L": {"activations": ids}})
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(rank),
                "2",
                str(tmp_path / "init"),
                str(tmp_path / "s"),
                str(tmp_path / f"{rank}.json"),
            ],
            env=env,
        )
        for rank in range(2)
    ]
    assert [p.wait() for p in procs] == [0, 0]
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    for epoch, end in (("0", 120), ("1", 132)):
        counts = Counter(seen[0][epoch] + seen[1][epoch])
        assert sorted(counts) == list(range(end)) and set(counts.values()) == {1}, epoch
        assert seen[0][epoch] and seen[1][epoch]
    assert seen[0]["snapshot0"] == seen[1]["snapshot0"] == {"r": [[0, 10]]}
    assert seen[0]["snapshot1"] == seen[1]["snapshot1"] == {"r": [[0, 11]]}

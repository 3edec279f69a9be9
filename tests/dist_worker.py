"""One rank of tests/test_distributed.py: torch.distributed (gloo) over a file, reading a run with
ActivationDataset; writes the row ids it read, per epoch, as JSON."""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import torch.distributed as dist

from mi_crow.store import ActivationDataset, ActivationLoader, LocalStore


class NoListing(LocalStore):
    """A rank that must not list the run itself: its snapshot has to come from rank 0."""

    def list_run_batches(self, run_id: str) -> Any:
        raise AssertionError("rank 1 listed the run; the snapshot must come from rank 0")


def main() -> None:
    rank, world, init, root, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    store = LocalStore(root) if rank == 0 else NoListing(root)
    ds = ActivationDataset(store, "r", "L", batch_size=5, shuffle=True, seed=1, rank=rank, world_size=world)
    loader = ActivationLoader(ds, num_workers=2)
    seen: dict[str, Any] = {}
    for epoch in range(2):
        loader.set_epoch(epoch)  # collective: rank 0's listing goes to every rank
        seen[str(epoch)] = [int(x) for b in loader for x in b[:, 0].tolist()]
        seen[f"snapshot{epoch}"] = loader.state_dict()["snapshot"]
        dist.barrier()
        if rank == 0 and epoch == 0:
            # The run grows between the epochs: epoch 1 reads the new batch on every rank.
            ids = torch.arange(120, 132, dtype=torch.float32).reshape(4, 3, 1).expand(4, 3, 4).contiguous()
            store.put_detector_metadata("r", 10, {}, {"L": {"activations": ids}})
        dist.barrier()
    with open(out, "w") as f:
        json.dump(seen, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

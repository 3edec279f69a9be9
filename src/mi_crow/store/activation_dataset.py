"""``ActivationDataset``: stored activations as a shuffled, sharded, resumable training stream.

The rows of one layer/key across every stored batch of one or more runs are read as a stream
of ``[batch_size, D]`` tensors. One epoch's order is a deterministic function of ``seed``, the
epoch and the epoch's snapshot:

1. the epoch's **snapshot**: the stored batches ("chunks") of every run when the epoch began
   (``set_epoch``, or the epoch's first iteration); batches committed later (a run still being
   captured) are read from the next epoch on. With ``shuffle`` the chunks are permuted;
2. chunk ``i`` of that order belongs to shard ``i % shards``, where the shards are
   ``world_size`` ranks times the DataLoader workers of each (so every row is read by exactly
   one worker of one rank);
3. each shard reads its chunks in order, up to ``read_ahead`` of them fetched concurrently ahead
   of the reader, and groups consecutive ones into windows of at most ``shuffle_buffer_bytes``
   (at least one chunk); with ``shuffle`` the rows of each window are permuted, which mixes rows
   across stored batches (a different permutation per window and epoch);
4. each shard's rows are cut into batches of ``batch_size`` rows; a shard's last batch of the
   epoch may be short. Iterated in this process or through :class:`ActivationLoader`, the short
   ends of the shards are held and merged (handed out as soon as they make ``batch_size`` rows),
   so only the epoch's very last batch may be short, and ``drop_last`` drops it. A plain
   ``DataLoader(ds, batch_size=None, num_workers=k)`` cannot merge across its workers: each
   worker's shard ends with its own short batch, so up to ``k`` short batches come in an epoch,
   not only at its end (and ``drop_last`` drops each of them).

Checked at construction, so that a typo never trains on nothing: the runs exist (a run with no
batch yet is allowed: it may be being captured), and the first stored batch of each holds the
layer and key (and, with ``drop_padding``, an attention mask); the error lists what exists.
Sizes for a training loop (``len(ds)`` in batches, :attr:`~ActivationDataset.num_rows`,
:attr:`~ActivationDataset.d_in`) come from the epoch's snapshot and the tensors' safetensors
headers, without reading activations. ``normalize`` scales rows with the statistics the capture
stored (``"norm"``: SAELens's norm scaling; ``"standard"``: per-dimension z-scores), and
``repeat`` goes on epoch after epoch for trainers that take an endless iterator (SAELens's).

Reading runs on a background thread that keeps up to ``prefetch`` batches ready, so the
training step does not wait on the disk or the network. Memory per worker is bounded by about
``shuffle_buffer_bytes + read_ahead * chunk + (prefetch + 3) * batch`` bytes, where ``chunk`` is
one stored batch's rows of the layer and ``batch`` one yielded batch.

Positions are kept per shard, in rows: ``state_dict()`` (or :class:`ActivationLoader`'s, under
DataLoader workers) resumes exactly, also with another number of ranks or workers.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import difflib
import hashlib
import json
import math
import os
import queue
import shutil
import sys
import tempfile
import threading
import types
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mi_crow.store import _keys
from mi_crow.store import _tensor_file as tf
from mi_crow.store._commit import named_generation
from mi_crow.store._layout import LayoutStore
from mi_crow.store._names import check_layer, check_name
from mi_crow.store.stats import LayerStats, read_stats
from mi_crow.store.store import Store

_DONE = object()


def _seed(*parts: object) -> int:
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


_use_count = getattr(torch._C, "_storage_Use_Count", None)
_frame = sys._getframe  # the callers a DataLoader's own batching or len() is seen in (a test replaces it)


class _BufferPool:
    """Output batches, reused once nothing outside the pool refers to their memory.

    A fresh 32 MiB tensor is mapped and zero-filled page by page on first touch, which costs
    more than the gather that fills it; recycling spares that. A buffer is taken again only
    when its storage's use count is back to what the pool alone holds, so a batch (or any
    view of it) the consumer still keeps is never overwritten, and only if its storage was
    never moved to shared memory. Without the (private) use-count API nothing is recycled.
    """

    def __init__(self, size: int):
        self.size = size
        self.buffers: list[tuple[torch.Tensor, int]] = []

    @staticmethod
    def _count(t: torch.Tensor) -> int:
        return int(_use_count(t.untyped_storage()._cdata))  # type: ignore[misc]

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # A buffer sent to another process is never written again: DataLoader's queue feeder
        # thread moves a batch's storage into shared memory in place (copying with the GIL
        # released), and the receiver maps that same memory. The feeder lets go of the batch only
        # after the move, so the use count is checked first and ``is_shared`` after it: a count
        # back to idle means a move, if any, is already visible. (The other order let a buffer
        # that was being sent pass the first check and be rewritten after the second: one batch
        # of a shuffled epoch read twice and another never, under DataLoader workers.)
        if _use_count is not None:
            for position, (buf, idle) in enumerate(self.buffers):
                if buf.shape != shape or buf.dtype != dtype or self._count(buf) != idle:
                    continue
                if buf.is_shared():  # type: ignore[no-untyped-call]
                    del self.buffers[position]  # sent: it belongs to the receiver now
                    break
                return buf
        self.buffers = [(buf, idle) for buf, idle in self.buffers if not buf.is_shared()]  # type: ignore[no-untyped-call]
        out = torch.empty(shape, dtype=dtype)
        if _use_count is not None and len(self.buffers) < self.size:
            self.buffers.append((out, self._count(out)))
        return out


def _touch(rows: torch.Tensor) -> None:
    """Fault in the pages of a (possibly memory-mapped) tensor: read one element per 4 KiB."""
    if rows.numel() and rows.is_contiguous():
        rows.reshape(-1).view(torch.uint8)[::4096].sum()


Snapshot = dict[str, list[int]]  # run -> its stored batch indices, ascending
# A position to resume from: the epoch's shard count, the rows each shard has yielded, and the
# epoch's gather group (the batch size it began with: shuffled rows are gathered in groups of it).
Resume = tuple[int, dict[int, int], int]

# Settings that decide which rows an epoch yields in which order: a state_dict resumes only a
# dataset that agrees on them (batch size, ranks and workers may differ).
_ORDER_SETTINGS = ("run_ids", "layer", "key", "shuffle", "seed", "shuffle_buffer_bytes", "drop_padding", "normalize")

_NORMALIZE = (None, "norm", "standard")
_EPS = 1e-6  # in "standard" normalization: (x - mean) / sqrt(var + _EPS)
_RUN_BATCH = ""  # in a batch's names: the keys of a put_run_batch file (any layer reads them)


# Shuffled windows grow to their full size over the first _RAMP windows of a shard.
_RAMP = 3
# The version of the shuffled order in states; a state without it is of an earlier version,
# whose windows were all of the full size.
_ORDER_VERSION = 2


def _ranges(indices: Sequence[int]) -> list[list[int]]:
    """Ascending indices as ``[start, stop)`` runs of consecutive numbers (a snapshot, compact)."""
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _snapshot_of(ranges: Any, runs: Sequence[str], what: str) -> Snapshot:
    """A snapshot back from its JSON form ``{run: [[start, stop], ...]}``, checked."""
    if not isinstance(ranges, Mapping) or sorted(ranges) != sorted(runs):
        got = sorted(ranges) if isinstance(ranges, Mapping) else type(ranges).__name__
        raise ValueError(f"{what} must map each of the runs {sorted(runs)} to its batch ranges, got {got}")
    out: Snapshot = {}
    for run in runs:
        indices: list[int] = []
        for pair in ranges[run]:
            ok = isinstance(pair, (list, tuple)) and len(pair) == 2
            ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            if not ok or not 0 <= pair[0] < pair[1] or (indices and pair[0] < indices[-1] + 1):
                raise ValueError(f"{what}: run {run!r} has an invalid batch range {pair!r}")
            indices.extend(range(pair[0], pair[1]))
        out[run] = indices
    return out


def _positions(resume: Resume | None, shards: int, rows: Mapping[int, int], handled: Sequence[int]) -> dict[int, int]:
    """Where each of the ``handled`` shards starts: the resumed position, or 0 in a fresh epoch.

    Raises:
        ValueError: If a resumed state lacks one of them (it holds other ranks' shards only).
    """
    missing = [s for s in handled if resume is not None and s not in rows]
    if missing:
        raise ValueError(
            f"the loaded state_dict has no position for shards {missing} of {shards}: it holds other ranks' "
            "shards; load the states of every rank merged with ActivationDataset.merge_state_dicts"
        )
    return {s: rows.get(s, 0) for s in handled}


def _remove_plans(path: str, owner: int) -> None:
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)


class ActivationDataset(IterableDataset[torch.Tensor]):
    """The rows of one layer/key of one or more runs, as ``[batch_size, D]`` tensors.

    Args:
        store: Any :class:`~mi_crow.store.Store`; only its public API is used. An
            :class:`~mi_crow.store.ObjectStore` streams from object storage (also in DataLoader
            workers, forked or spawned); give it a ``cache_dir`` to serve later epochs from disk.
        run_ids: A run id or a list of them.
        layer: Layer signature whose activations are read.
        key: Tensor key of the activations (``[..., D]``; ``[B, T, D]`` becomes ``[B*T, D]``).
        batch_size: Rows per yielded tensor (the epoch's last may have fewer; under a plain
            DataLoader with ``k`` workers, the last of each worker's shard).
        shuffle: Shuffle chunks and, within windows of ``shuffle_buffer_bytes``, rows.
        seed: Seed of the order; the order is a function of ``seed``, the epoch and its snapshot.
        shuffle_buffer_bytes: Memory budget of one shuffle window (default 256 MiB).
        drop_padding: Drop the rows whose attention mask is 0: the mask ``[B, T]`` of
            activations ``[B, T, D]`` is read under ``mask_key`` from the layer itself (runs
            captured before masks were stored once per batch) or from the batch's inputs
            pseudo-layer ``"attention_masks"`` (what :class:`~mi_crow.store.ActivationCapture`
            and mi_crow 1.0 write). A batch with neither is a ``ValueError`` that says what to do.
        mask_key: Key of the attention mask (default ``"attention_mask"``).
        dtype: Convert rows to this dtype.
        device: Move batches to this device (from pinned memory when it is CUDA).
        pin_memory: Pin batches before moving them; default: when ``device`` is CUDA.
        drop_last: Drop the epoch's last batch if it is short (under a plain DataLoader with
            workers: each worker's short last batch).
        rank: This process's rank, for distributed training.
        world_size: Number of ranks; rank ``r`` reads the ``r``-th share of the chunks.
        prefetch: Batches made ready ahead on the background thread (0: read in the caller).
        read_ahead: Stored batches fetched concurrently ahead of the reader (0: one at a time,
            when needed). Each holds one stored batch's rows of the layer in memory.
        normalize: Scale rows with the statistics the runs' capture stored (``capture.stats``,
            :func:`~mi_crow.store.read_stats`, merged over ``run_ids``): ``"norm"`` multiplies them
            by :attr:`scaling_factor` ``= sqrt(d_in) / mean_norm`` (SAELens's norm scaling, so the
            mean row norm becomes ``sqrt(d_in)``); ``"standard"`` makes each dimension
            ``(x - mean) / sqrt(var + 1e-6)``. Applied in the output dtype (after ``dtype``), on
            ``device``. The statistics count the non-padding rows only. Recorded in
            ``state_dict()``: a resume with another ``normalize`` is refused.
        repeat: Go on epoch after epoch for as long as the consumer asks, calling
            ``set_epoch(epoch + 1)`` (a fresh snapshot) after each, so that a trainer taking an
            iterator of ``[batch, D]`` tensors (SAELens's) can train for any number of tokens;
            ``state_dict()`` stays exact across epochs. In this process or through
            :class:`ActivationLoader` (which repeats the epochs itself); a plain DataLoader's
            workers are refused. Raises ``ValueError`` if a fresh epoch yields no batch. With
            ``torch.distributed``, each ``set_epoch`` is a collective call: ranks must end their
            epochs at the same step (as DDP needs anyway), for example with ``drop_last``
            and shares of equal size.

    Attributes:
        stats: With ``normalize``, the layer's statistics merged over the runs
            (:class:`~mi_crow.store.LayerStats`); else ``None``.
        scaling_factor: With ``normalize="norm"``, ``sqrt(d_in) / mean_norm``; else ``None``
            (what SAELens calls the estimated norm scaling factor).

    Raises:
        ValueError: If an argument is invalid; if a run is not in the store, or the first
            stored batch of a run lacks ``layer`` or ``key`` (or, with ``drop_padding``, an
            attention mask), or a run without a batch yet records other layers in its metadata
            (the message lists the runs, layers or keys that exist); with ``normalize``, if a run
            has no statistics of the layer (the message names it).

    Examples:
        >>> import torch
        >>> from mi_crow.store import MemoryStore, ActivationDataset
        >>> store = MemoryStore()
        >>> for i in range(3):
        ...     _ = store.put_detector_metadata("r", i, {}, {"l": {"activations": torch.full((2, 5, 8), float(i))}})
        >>> ds = ActivationDataset(store, "r", "l", batch_size=4, shuffle=True, seed=1)
        >>> sum(b.shape[0] for b in ds), next(iter(ds)).shape
        (30, torch.Size([4, 8]))
        >>> len(ds), ds.num_rows, ds.d_in  # from the tensors' headers
        (8, 30, 8)
        >>> ActivationDataset(store, "r", "m")
        Traceback (most recent call last):
        ...
        ValueError: layer 'm' is not in batch 0 of run 'r'; its layers: ['l']
    """

    def __init__(
        self,
        store: Store,
        run_ids: str | Sequence[str],
        layer: str,
        key: str = "activations",
        *,
        batch_size: int = 4096,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer_bytes: int = 256 << 20,
        drop_padding: bool = False,
        mask_key: str = "attention_mask",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        pin_memory: bool | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
        read_ahead: int = 4,
        normalize: str | None = None,
        repeat: bool = False,
    ):
        super().__init__()
        self.run_ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
        if not self.run_ids:
            raise ValueError("run_ids must name at least one run")
        for run in self.run_ids:
            check_name(run, "run_id")
        if len(set(self.run_ids)) != len(self.run_ids):
            raise ValueError(f"run_ids has duplicates: {self.run_ids}")
        self.layer = check_layer(layer, "layer")
        self.key = check_name(key, "key")
        self.mask_key = check_name(mask_key, "mask_key")
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("shuffle_buffer_bytes", shuffle_buffer_bytes, 1),
            ("world_size", world_size, 1),
            ("rank", rank, 0),
            ("prefetch", prefetch, 0),
            ("read_ahead", read_ahead, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size, got rank={rank}, world_size={world_size}")
        if not isinstance(repeat, bool):
            raise ValueError(f"repeat must be a bool, got {repeat!r}")
        if normalize not in _NORMALIZE:
            raise ValueError(f"normalize must be one of {list(_NORMALIZE)}, got {normalize!r}")
        self.store = store
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer_bytes = shuffle_buffer_bytes
        self.drop_padding = drop_padding
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        cuda = self.device is not None and self.device.type == "cuda"
        self.pin_memory = cuda if pin_memory is None else pin_memory
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.prefetch = prefetch
        self.read_ahead = read_ahead
        self.repeat = repeat
        self.normalize = normalize
        self.epoch = 0
        self._snapshot: tuple[int, Snapshot] | None = None  # (epoch, its snapshot)
        self._resume: Resume | None = None  # for the next iteration
        self._state: dict[str, Any] | None = None  # where this process's last iteration got
        # What DataLoader workers read when they start an iteration: the plan (epoch, snapshot,
        # resume position) is written to a file by the process that made the dataset, its number
        # put in shared memory. Persistent workers keep their copy of the dataset across epochs;
        # this is how set_epoch and load_state_dict reach them. Slot 1 counts worker iterations.
        self._shared = torch.zeros(2, dtype=torch.int64).share_memory_()  # type: ignore[no-untyped-call]
        self._owner = os.getpid()
        self._plans = tempfile.mkdtemp(prefix="mi-crow-store-plans-")  # made before any worker copies it
        weakref.finalize(self, _remove_plans, self._plans, self._owner)
        self._worker_mark = 0
        self._tagged = False  # ActivationLoader's copy: yields (shard, rows, batch)
        # Per run: the layer whose mask_key holds its masks (the layer's own, in runs captured
        # before masks were stored once per batch, or the inputs pseudo-layer), tried first.
        self._mask_layer: dict[str, str] = {}
        self._sizes: dict[tuple[str, int], tuple[int, int]] = {}  # (run, batch) -> (rows, width)
        self._norm: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._check_names()
        self.stats: LayerStats | None = self._read_stats() if normalize is not None else None
        self.scaling_factor: float | None = None
        if normalize == "norm":
            assert self.stats is not None
            self.scaling_factor = math.sqrt(self.stats.d) / self.stats.mean_norm

    # ------------------------------------------------------------------ epochs, snapshots, state

    def set_epoch(self, epoch: int, snapshot: Mapping[str, Any] | None = None) -> None:
        """Use the order of ``epoch`` for the next iteration and take its snapshot (call it at each
        epoch, as with ``DistributedSampler``; persistent DataLoader workers see it too).

        Args:
            epoch: The epoch, ``>= 0``.
            snapshot: The batches the epoch reads, as :meth:`snapshot` returns them; default: a
                listing taken now. When ``torch.distributed`` is initialized, the listing is rank
                0's, sent to every rank (all ranks must call ``set_epoch``); without it, ranks
                reading a run that is still growing should pass one snapshot to all.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        taken = _snapshot_of(snapshot, self.run_ids, "snapshot") if snapshot is not None else self._take_snapshot()
        self.epoch = epoch
        self._snapshot = (epoch, taken)
        self._resume = None
        self._state = None
        self._publish()

    def snapshot(self) -> dict[str, list[list[int]]]:
        """The stored batches of every run now, as ``{run: [[start, stop], ...]}`` index ranges
        (JSON-serializable); with ``torch.distributed`` initialized, rank 0's (a collective call)."""
        return {run: _ranges(indices) for run, indices in self._take_snapshot().items()}

    def _take_snapshot(self) -> Snapshot:
        dist = torch.distributed
        if (
            get_worker_info() is None
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() == self.world_size > 1
        ):
            return self._broadcast_snapshot()
        return {run: sorted(self.store.list_run_batches(run)) for run in self.run_ids}

    def _broadcast_snapshot(self) -> Snapshot:
        """Rank 0 lists the runs; every rank gets its listing (so all read the same batches)."""
        dist = torch.distributed
        cuda = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        data = b""
        if dist.get_rank() == 0:
            listing = {run: _ranges(sorted(self.store.list_run_batches(run))) for run in self.run_ids}
            data = json.dumps(listing).encode()
        size = torch.tensor([len(data)], dtype=torch.int64, device=device)
        dist.broadcast(size, 0)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8)
        if data:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        buf = buf.to(device)
        dist.broadcast(buf, 0)
        return _snapshot_of(json.loads(bytes(buf.cpu().numpy())), self.run_ids, "the broadcast snapshot")

    def _publish(self, resume: Resume | None = None) -> None:
        """Write the next iteration's plan where this dataset's DataLoader workers read it."""
        if os.getpid() != self._owner or get_worker_info() is not None or self._snapshot is None:
            return
        version = int(self._shared[0]) + 1
        epoch, snapshot = self._snapshot
        plan = {
            "epoch": epoch,
            "snapshot": {run: _ranges(indices) for run, indices in snapshot.items()},
            "resume": None if resume is None else [resume[0], {str(s): n for s, n in resume[1].items()}, resume[2]],
        }
        path = os.path.join(self._plans, f"plan-{version}.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(plan, f)
        os.replace(path + ".tmp", path)
        self._shared[1] = 0
        self._shared[0] = version

    def _read_plan(self) -> tuple[int, Snapshot, Resume | None] | None:
        version = int(self._shared[0])
        if version == 0:
            return None
        with open(os.path.join(self._plans, f"plan-{version}.json"), encoding="utf-8") as f:
            plan = json.load(f)
        resume = plan["resume"]
        return (
            int(plan["epoch"]),
            _snapshot_of(plan["snapshot"], self.run_ids, "plan"),
            None
            if resume is None
            else (int(resume[0]), {int(s): int(n) for s, n in resume[1].items()}, int(resume[2])),
        )

    def _next_plan(self) -> tuple[int, Snapshot, Resume | None]:
        """In the calling process: the next iteration's epoch, snapshot and resume position (the
        position is used once)."""
        if self._snapshot is None or self._snapshot[0] != self.epoch:
            self._snapshot = (self.epoch, self._take_snapshot())
        resume, self._resume = self._resume, None
        return self.epoch, self._snapshot[1], resume

    def _config(self) -> dict[str, Any]:
        return {
            "run_ids": self.run_ids,
            "layer": self.layer,
            "key": self.key,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "shuffle_buffer_bytes": self.shuffle_buffer_bytes,
            "drop_padding": self.drop_padding,
            "normalize": self.normalize,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def _state_of(
        self, epoch: int, snapshot: Snapshot | None, shards: int | None, rows: Mapping[int, int], group: int
    ) -> dict[str, Any]:
        return {
            **self._config(),
            "epoch": epoch,
            "snapshot": None if snapshot is None else {run: _ranges(i) for run, i in snapshot.items()},
            "shards": shards,
            "rows": {str(s): n for s, n in sorted(rows.items())},
            "group": group,
            "order": _ORDER_VERSION,
        }

    def state_dict(self) -> dict[str, Any]:
        """Where the current (or last) epoch got: its number, snapshot, and the rows each shard of
        this rank has yielded (JSON-serializable).

        Exact when the dataset is iterated in this process (``num_workers=0``; reading still
        overlaps through the prefetch thread). Under DataLoader workers only the loader sees
        which batches were consumed: use :class:`ActivationLoader` and its ``state_dict()``.

        Raises:
            RuntimeError: If DataLoader workers iterated this dataset since it was last iterated here.
        """
        if int(self._shared[1]) > self._worker_mark:
            raise RuntimeError(
                "this ActivationDataset was iterated by DataLoader workers, whose progress the dataset "
                "cannot see: iterate it with mi_crow.store.ActivationLoader(dataset, num_workers=...) "
                "and save loader.state_dict() instead"
            )
        if self._state is not None:
            s = self._state
            return self._state_of(s["epoch"], s["snapshot"], s["shards"], s["rows"], s["group"])
        snapshot = self._snapshot[1] if self._snapshot is not None and self._snapshot[0] == self.epoch else None
        if self._resume is None:
            return self._state_of(self.epoch, snapshot, None, {}, self.batch_size)
        return self._state_of(self.epoch, snapshot, *self._resume)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next iteration yields exactly the rows that epoch had left.

        With the same ranks and workers the order is the uninterrupted one. With another number
        of ranks or workers (for example a fixed global batch size over fewer ranks) each rank
        takes over whole shards of the saved epoch: every remaining row is still read exactly once;
        load the state of every rank merged with :meth:`merge_state_dicts`.

        Raises:
            ValueError: If ``state`` was taken from a dataset with other settings of the order
                (runs, layer, key, shuffle, seed, shuffle_buffer_bytes, drop_padding), or is malformed.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        mine = self._config()
        differing = sorted(k for k in _ORDER_SETTINGS if state.get(k) != mine[k])
        if differing:
            raise ValueError(f"state_dict was taken from a dataset with other settings: {differing}")
        epoch = state.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"state_dict has an invalid epoch {epoch!r}")
        rows_field = state.get("rows")
        consumed = rows_field if isinstance(rows_field, int) else sum(dict(rows_field or {}).values())
        if self.shuffle and state.get("order") != _ORDER_VERSION and consumed:
            raise ValueError(
                f"state_dict is of a shuffled order of another version (order {state.get('order')!r}, this version "
                f"reads order {_ORDER_VERSION}): it cannot resume mid-epoch exactly; resume from the start of its "
                "epoch (drop its rows) or of the next"
            )
        group = state.get("group", state.get("batch_size"))
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ValueError(f"state_dict has an invalid group {group!r}")
        resume: Resume | None
        if isinstance(rows_field, int) and not isinstance(rows_field, bool):
            # The form of earlier versions: rows of this rank's one shard, iterated in-process.
            resume = (int(state["world_size"]), {int(state["rank"]): rows_field}, group) if rows_field else None
        else:
            shards = state.get("shards")
            if shards is None:
                resume = None
            else:
                if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
                    raise ValueError(f"state_dict has an invalid shard count {shards!r}")
                if not isinstance(rows_field, Mapping):
                    raise ValueError(f"state_dict rows must map shards to rows, got {rows_field!r}")
                rows: dict[int, int] = {}
                for s, n in rows_field.items():
                    shard = int(s) if isinstance(s, (int, str)) and str(s).isdigit() else -1
                    if not 0 <= shard < shards or isinstance(n, bool) or not isinstance(n, int) or n < 0:
                        raise ValueError(f"state_dict has an invalid position {s!r}: {n!r} (of {shards} shards)")
                    rows[shard] = n
                resume = (shards, rows, group)
        snapshot = state.get("snapshot")
        self.epoch = epoch
        self._snapshot = (epoch, _snapshot_of(snapshot, self.run_ids, "state_dict snapshot")) if snapshot else None
        self._resume = resume
        self._state = None
        self._publish(resume)

    @staticmethod
    def merge_state_dicts(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One state from the ``state_dict()`` of every rank (each holds only its own shards), to
        resume with another number of ranks.

        Raises:
            ValueError: If the states are of different epochs, snapshots, settings or shard counts,
                or disagree on a shard.
        """
        if not states:
            raise ValueError("merge_state_dicts needs at least one state")
        first = states[0]
        same = (*_ORDER_SETTINGS, "epoch", "snapshot", "shards", "group", "order")
        rows: dict[str, int] = {}
        for state in states:
            differing = sorted(k for k in same if state.get(k) != first.get(k))
            if differing:
                raise ValueError(f"the states differ in {differing}: they are not of one epoch of one dataset")
            for s, n in dict(state.get("rows") or {}).items():
                if rows.setdefault(str(s), n) != n:
                    raise ValueError(f"the states disagree on shard {s}: {rows[str(s)]} and {n} rows")
        return {**dict(first), "rows": dict(sorted(rows.items(), key=lambda kv: int(kv[0])))}

    # ------------------------------------------------------------------ reading

    def _chunks(self, epoch: int, snapshot: Snapshot) -> list[tuple[str, int]]:
        chunks = [(run, i) for run in self.run_ids for i in snapshot[run]]
        if self.shuffle:
            order = torch.randperm(len(chunks), generator=_generator(self.seed, epoch, "chunks")).tolist()
            chunks = [chunks[i] for i in order]
        return chunks

    def _load_rows(self, run: str, index: int) -> torch.Tensor:
        """Rows ``[n, D]`` of one stored batch (padding dropped if asked)."""
        acts = self._load_acts(run, index)
        if acts.dim() == 0:
            raise ValueError(f"{self.layer!r}/{self.key!r} of batch {index} of run {run!r} is 0-d; expected [..., D]")
        rows = acts.reshape(-1, acts.shape[-1]) if acts.dim() != 2 else acts
        if self.drop_padding:
            rows = rows[self._load_mask(run, index, tuple(acts.shape)).reshape(-1).to(torch.bool)]
        return rows

    def _load_acts(self, run: str, index: int) -> torch.Tensor:
        try:
            return self.store.get_detector_metadata_by_layer_by_key(run, index, self.layer, self.key)
        except FileNotFoundError:
            pass
        # A batch written with put_run_batch. (Not a batch of the per-layer layout without this
        # layer: get_run_batch would answer with another layer's activations.)
        batch: Any = None
        if not isinstance(self.store, LayoutStore) or self.store._exists(self.store._run_batch_file(run, index)):
            with contextlib.suppress(FileNotFoundError):
                batch = self.store.get_run_batch(run, index)
        if not isinstance(batch, dict) or self.key not in batch:
            raise FileNotFoundError(f"batch {index} of run {run!r} has no {self.layer!r}/{self.key!r} tensor")
        return batch[self.key]  # type: ignore[no-any-return]

    def _load_mask(self, run: str, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The attention mask ``[B, T]`` of a stored batch whose activations are ``shape``: from the
        layer's own keys (runs captured before) or the batch's inputs pseudo-layer."""
        first = self._mask_layer.get(run, _keys.INPUTS_LAYER)
        mask: torch.Tensor | None = None
        for layer in dict.fromkeys((first, self.layer, _keys.INPUTS_LAYER)):
            try:
                mask = self.store.get_detector_metadata_by_layer_by_key(run, index, layer, self.mask_key)
            except FileNotFoundError:
                continue
            self._mask_layer[run] = layer
            break
        if mask is None:
            raise ValueError(self._no_mask(run, index))
        if tuple(mask.shape) != shape[:-1]:
            raise ValueError(
                f"mask {self.mask_key!r} of batch {index} of run {run!r} has shape {tuple(mask.shape)}, "
                f"activations {shape}: expected {shape[:-1]}"
            )
        return mask

    def _no_mask(self, run: str, index: int) -> str:
        return (
            f"drop_padding=True needs each batch's attention mask, and batch {index} of run {run!r} has none "
            f"({self.mask_key!r} is neither under layer {self.layer!r} nor under the inputs pseudo-layer "
            f"{_keys.INPUTS_LAYER!r}): it was captured without one, for example with model(**enc) instead of "
            "cap.run(**enc). Capture through ActivationCapture with the attention mask passed to the model "
            "(cap.run(input_ids=..., attention_mask=...), or `mi-crow-store capture`), or read it with "
            "drop_padding=False (padding positions are then rows too)"
        )

    # ------------------------------------------------------------------ checks at construction

    def _check_names(self) -> None:
        """Refuse, before any epoch, a run the store lacks or a layer/key (or, with drop_padding,
        a mask) the runs' first stored batch lacks; a run without a batch yet is allowed. With
        ``torch.distributed``, rank 0 checks the stored batches, the other ranks the metadata."""
        dist = torch.distributed
        if (
            dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() == self.world_size > 1
            and dist.get_rank() != 0
        ):
            # Only rank 0 lists the runs (as it does for every epoch's snapshot); the other ranks
            # check what the runs' metadata records.
            for run in self.run_ids:
                self._check_recorded_layers(run)
            return
        runs: list[str] | None = None
        for run in self.run_ids:
            indices = self.store.list_run_batches(run)
            if not indices:
                runs = _runs(self.store) if runs is None else runs
                _check_run(self.store, run, runs)
                self._check_recorded_layers(run)
                continue
            names = _batch_names(self.store, run, indices[0])
            where = f"batch {indices[0]} of run {run!r}"
            layers = sorted(n for n in names if n != _RUN_BATCH)
            keys = names.get(self.layer, names.get(_RUN_BATCH))
            if keys is None:
                hint = _suggest(self.layer, layers)
                raise ValueError(f"layer {self.layer!r} is not in {where}{hint}; its layers: {_listed(layers)}")
            if self.key not in keys:
                raise ValueError(
                    f"key {self.key!r} is not in layer {self.layer!r} of {where}{_suggest(self.key, keys)}; "
                    f"its keys: {_listed(sorted(keys))}"
                )
            if self.drop_padding:
                for layer in (self.layer, _keys.INPUTS_LAYER):
                    if self.mask_key in names.get(layer, ()):
                        self._mask_layer[run] = layer
                        break
                else:
                    raise ValueError(self._no_mask(run, indices[0]))

    def _check_recorded_layers(self, run: str) -> None:
        """The layers a run's metadata records (``layers``: what its capture stores), if it does:
        for a run without a batch yet, and on the ranks other than 0."""
        layers = self.store.get_run_metadata(run).get("layers")
        if isinstance(layers, list) and all(isinstance(x, str) for x in layers) and self.layer not in layers:
            raise ValueError(
                f"layer {self.layer!r} is not among the layers run {run!r} is captured with (its metadata's "
                f"'layers'){_suggest(self.layer, layers)}: {_listed(sorted(layers))}"
            )

    def _read_stats(self) -> LayerStats:
        """The layer's statistics merged over the runs (``normalize``)."""
        merged: LayerStats | None = None
        for run in self.run_ids:
            try:
                stats = read_stats(self.store, run)
            except KeyError as e:
                raise ValueError(
                    f"normalize={self.normalize!r} needs the statistics of every run: {e.args[0]}"
                ) from None
            if self.layer not in stats:
                raise ValueError(
                    f"normalize={self.normalize!r}: run {run!r} has statistics of layers {sorted(stats)}, "
                    f"not of {self.layer!r}"
                )
            capture = self.store.get_run_metadata(run).get("capture")
            captured_key = capture.get("key") if isinstance(capture, dict) else None
            if isinstance(captured_key, str) and captured_key != self.key:
                raise ValueError(
                    f"normalize={self.normalize!r}: the statistics of run {run!r} describe key {captured_key!r}, "
                    f"not {self.key!r}"
                )
            merged = stats[self.layer] if merged is None else merged.merged(stats[self.layer])
        assert merged is not None
        if not merged.count or (self.normalize == "norm" and not merged.mean_norm > 0):
            raise ValueError(
                f"normalize={self.normalize!r}: the statistics of layer {self.layer!r} of runs {self.run_ids} count "
                f"{merged.count} rows of mean norm {merged.mean_norm}: nothing to scale by"
            )
        return merged

    # ------------------------------------------------------------------ sizes

    def __len__(self) -> int:
        """Batches this rank yields in an epoch of the current snapshot, as in this process or
        through :class:`ActivationLoader` (only the last may be short; ``drop_last`` drops it).

        A plain ``DataLoader(ds, batch_size=None, num_workers=k)`` yields up to ``k - 1`` more
        (each worker's shard ends with its own short batch), and with ``world_size > 1`` its
        rank's share depends on ``k``: ``len()`` of such a loader asks this method, which then
        answers for it (``k`` read from the calling loader); ``len(ActivationLoader(ds,
        num_workers=k))`` is the count with merged short batches. Reads only tensor headers (and
        masks, with ``drop_padding``), once per stored batch. It takes the epoch's snapshot if
        the epoch has none yet, which with ``torch.distributed`` initialized is a collective call
        (call it on every rank, as ``set_epoch``).
        """
        workers = _plain_loader_workers()
        if workers:
            return self._length_per_shard(workers)
        return self._length(1)

    @property
    def num_rows(self) -> int:
        """Rows of this rank's share of an epoch of the current snapshot (padding dropped with
        ``drop_padding``; counting a short last batch that ``drop_last`` drops), as for ``len``."""
        return self._rows(1)

    @property
    def d_in(self) -> int:
        """The width ``D`` of a row (what an SAE's ``d_in`` is), from the first stored batch's
        tensor header, or the runs' statistics when no batch is stored yet.

        Raises:
            ValueError: If no batch is stored yet and the runs have no statistics.
        """
        snapshot = self._epoch_snapshot()
        for run in self.run_ids:
            if snapshot[run]:
                return self._size(run, snapshot[run][0])[1]
        if self.stats is not None:
            return self.stats.d
        for run in self.run_ids:
            try:
                stats = read_stats(self.store, run)
            except (KeyError, ValueError):
                continue
            if self.layer in stats:
                return stats[self.layer].d
        raise ValueError(f"runs {self.run_ids} hold no batch yet (and no statistics): the row width is not known yet")

    def _epoch_snapshot(self) -> Snapshot:
        """The current epoch's snapshot (taken now, and kept for its iteration, if not yet)."""
        if self._snapshot is None or self._snapshot[0] != self.epoch:
            self._snapshot = (self.epoch, self._take_snapshot())
        return self._snapshot[1]

    def _mine(self, workers: int) -> list[tuple[str, int]]:
        """This rank's stored batches of the current epoch when each rank has ``workers`` shards."""
        chunks = self._chunks(self.epoch, self._epoch_snapshot())
        shards = self.world_size * workers
        return [c for i, c in enumerate(chunks) if (i % shards) // workers == self.rank]

    def _rows(self, workers: int) -> int:
        mine = self._mine(workers)
        todo = [c for c in mine if c not in self._sizes]
        if len(todo) > 1 and self.read_ahead > 1:
            with ThreadPoolExecutor(self.read_ahead, thread_name_prefix="mi-crow-store-size") as pool:
                list(pool.map(lambda c: self._size(*c), todo))
        return sum(self._size(run, index)[0] for run, index in mine)

    def _length(self, workers: int) -> int:
        rows = self._rows(workers)
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def _length_per_shard(self, workers: int) -> int:
        """Batches of this rank under a plain DataLoader with ``workers`` workers: each shard's own."""
        self._rows(workers)  # reads the headers concurrently
        chunks = self._chunks(self.epoch, self._epoch_snapshot())
        shards = self.world_size * workers
        total = 0
        for shard in range(self.rank * workers, (self.rank + 1) * workers):
            rows = sum(self._size(run, index)[0] for run, index in chunks[shard::shards])
            total += rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)
        return total

    def _size(self, run: str, index: int) -> tuple[int, int]:
        """(rows, width) of one stored batch, from its tensor header (and mask), cached."""
        cached = self._sizes.get((run, index))
        if cached is not None:
            return cached
        shape = self._shape(run, index)
        if not shape:
            raise ValueError(f"{self.layer!r}/{self.key!r} of batch {index} of run {run!r} is 0-d; expected [..., D]")
        rows = math.prod(shape[:-1])
        if self.drop_padding:
            rows = int(self._load_mask(run, index, shape).reshape(-1).to(torch.bool).sum())
        self._sizes[(run, index)] = (rows, shape[-1])
        return rows, shape[-1]

    def _shape(self, run: str, index: int) -> tuple[int, ...]:
        """The shape of the layer/key tensor of a stored batch: its safetensors header on a
        LayoutStore, else the tensor itself."""
        store = self.store
        if not isinstance(store, LayoutStore):
            return tuple(self._load_acts(run, index).shape)
        batch_dir = store._batch_dir(run, index)
        meta_key = f"{batch_dir}/{_keys.METADATA_FILE}"
        try:
            meta = store._read_json_object(meta_key)
        except FileNotFoundError:
            key, name = store._run_batch_file(run, index), self.key
        else:
            generation = named_generation(meta, store._where(meta_key))
            rel = _keys.in_generation(_keys.tensor_file(self.layer, self.key), generation)
            key, name = f"{batch_dir}/{rel}", _keys.TENSOR_NAME
        where = store._where(key)
        try:
            with store._open(key) as f:
                entry = tf.read_header(f, where).tensors.get(name)
        except FileNotFoundError:
            entry = None
        if entry is None:
            raise FileNotFoundError(f"batch {index} of run {run!r} has no {self.layer!r}/{self.key!r} tensor ({where})")
        return tuple(entry.shape)

    # ------------------------------------------------------------------ normalization

    def _normalized(self, batch: torch.Tensor) -> torch.Tensor:
        """``normalize`` applied to a batch, in its dtype (after conversion), on its device."""
        stats = self.stats
        assert stats is not None
        if batch.shape[-1] != stats.d:
            raise ValueError(
                f"normalize={self.normalize!r}: rows of layer {self.layer!r} have width {batch.shape[-1]}, its "
                f"statistics width {stats.d}"
            )
        if self.scaling_factor is not None:
            return batch * self.scaling_factor
        where = (batch.device, batch.dtype)
        consts = self._norm.get(where)
        if consts is None:
            mean = stats.mean.to(device=batch.device, dtype=batch.dtype)
            inv = (stats.var + _EPS).rsqrt().to(device=batch.device, dtype=batch.dtype)
            consts = self._norm[where] = (mean, inv)
        return (batch - consts[0]) * consts[1]

    def _fetch(self, run: str, index: int) -> torch.Tensor:
        """One stored batch's rows, ready to use: pages faulted in, converted when sequential."""
        rows = self._load_rows(run, index)
        _touch(rows)
        if not self.shuffle and self.dtype is not None:
            rows = rows.to(self.dtype)
        return rows

    def _fetched(self, chunks: Sequence[tuple[str, int]]) -> Iterator[tuple[str, int, torch.Tensor]]:
        """The rows of ``chunks`` in order, up to ``read_ahead`` of them fetched concurrently ahead."""
        if self.read_ahead == 0:
            for run, index in chunks:
                yield run, index, self._fetch(run, index)
            return
        pool = ThreadPoolExecutor(self.read_ahead, thread_name_prefix="mi-crow-store-read")
        pending: collections.deque[tuple[str, int, Future[torch.Tensor]]] = collections.deque()
        todo = iter(chunks)
        try:
            for run, index in todo:
                pending.append((run, index, pool.submit(self._fetch, run, index)))
                if len(pending) >= self.read_ahead:
                    break
            while pending:
                run, index, future = pending.popleft()
                rows = future.result()
                for nxt_run, nxt_index in todo:
                    pending.append((nxt_run, nxt_index, pool.submit(self._fetch, nxt_run, nxt_index)))
                    break
                yield run, index, rows
                del rows
        finally:
            for *_, future in pending:
                future.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    def _checked(self, rows: torch.Tensor, first: torch.Tensor | None, run: str, index: int) -> torch.Tensor:
        if first is not None and rows.shape[1:] != first.shape[1:]:
            raise ValueError(
                f"batch {index} of run {run!r} has rows of shape {tuple(rows.shape[1:])}, "
                f"earlier ones {tuple(first.shape[1:])}"
            )
        return rows

    def _blocks(
        self, epoch: int, chunks: Sequence[tuple[str, int]], shard: int, shards: int, skip: int, group: int
    ) -> Iterator[torch.Tensor]:
        """The shard's row stream, as consecutive blocks of rows, without its first ``skip`` rows.

        Sequential: each stored batch's rows as they come back from the store (memory-mapped by
        LocalStore: no copy; their pages are faulted in by the fetching threads).
        Shuffled: windows of stored batches up to ``shuffle_buffer_bytes``; each window's rows
        are permuted and gathered straight into blocks of ``group`` rows (no window-sized copy is
        ever made); ``group`` is the batch size the epoch began with, so that the stream, and where
        a position in it is, stays the same when an epoch is resumed with another batch size.
        """
        first: torch.Tensor | None = None
        if not self.shuffle:
            for run, index, rows in self._fetched(chunks):
                rows = self._checked(rows, first, run, index)
                first = rows if first is None else first
                if skip >= rows.shape[0]:
                    skip -= rows.shape[0]
                    continue
                rows, skip = rows[skip:], 0
                yield rows
            return
        window: list[torch.Tensor] = []
        size = number = 0
        pool = _BufferPool(self.prefetch + 3)
        for position, (run, index, rows) in enumerate(self._fetched(chunks)):
            rows = self._checked(rows, first, run, index)
            first = rows if first is None else first
            window.append(rows)
            size += rows.numel() * rows.element_size()
            if size < self._window_bytes(number) and position + 1 < len(chunks):
                continue
            number += 1
            n = sum(r.shape[0] for r in window)
            if n <= skip:  # resuming: this whole window was yielded before
                skip -= n
            else:
                order = torch.randperm(n, generator=_generator(self.seed, epoch, shard, shards, number))
                yield from self._gather(window, order, skip, pool, group)
                skip = 0
            window, size = [], 0

    def _window_bytes(self, done: int) -> int:
        """The budget of the shard's window after ``done`` windows: the first three take 1/8, 1/4
        and 1/2 of ``shuffle_buffer_bytes``, so the first batch of an epoch comes after an eighth
        of a window is read, not a whole one."""
        return max(1, self.shuffle_buffer_bytes >> max(0, _RAMP - done))

    def _gather(
        self, window: list[torch.Tensor], order: torch.Tensor, skip: int, pool: _BufferPool, group: int
    ) -> Iterator[torch.Tensor]:
        """Rows ``order`` of the window's concatenation, ``group`` at a time, less the first ``skip``.

        Each block holds the rows ``order[i:i + group]``, grouped by the stored batch they
        come from (so each row is copied once, straight into the output); which rows form a
        batch is what the permutation decides.
        """
        sizes = torch.tensor([r.shape[0] for r in window])
        ends = sizes.cumsum(0)
        starts = ends - sizes
        dtype = self.dtype or window[0].dtype
        for i in range(skip - skip % group, order.shape[0], group):
            wanted = order[i : i + group]
            which = torch.searchsorted(ends, wanted, right=True)
            by_chunk = torch.argsort(which, stable=True)
            wanted, which = wanted[by_chunk], which[by_chunk]
            counts = torch.bincount(which, minlength=len(window)).tolist()
            out = pool.take((wanted.shape[0], *window[0].shape[1:]), dtype)
            at = 0
            for c, count in enumerate(counts):
                if count:
                    local = wanted[at : at + count] - starts[c]
                    if window[c].dtype == dtype:
                        torch.index_select(window[c], 0, local, out=out[at : at + count])
                    else:
                        out[at : at + count] = window[c].index_select(0, local)
                    at += count
            # Always a view: it holds the storage, so the pool cannot reuse the buffer while the
            # batch is queued or held by the consumer (the pool itself holds ``out``).
            yield out[max(skip - i, 0) :]

    def _prefetched(self, blocks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Run ``blocks`` on a daemon thread, ``prefetch`` blocks ahead; re-raise its errors here."""
        if self.prefetch == 0:
            yield from blocks
            return
        q: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def hand(item: Any) -> bool:
            """Queue ``item`` unless the consumer stopped (then False). Every put, the end and an
            error included, waits this way: a consumer that stops with the queue full never takes
            another item, and a plain put would block this thread for ever."""
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for block in blocks:
                    if self.pin_memory and torch.cuda.is_available():
                        block = block.pin_memory()
                    if not hand(block):
                        return
                hand(_DONE)
            except BaseException as e:  # handed to the consumer, which re-raises it
                hand(e)

        thread = threading.Thread(target=produce, name="mi-crow-store-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)

    def _batches(self, blocks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        bs = self.batch_size
        carry: list[torch.Tensor] = []
        have = 0
        for block in blocks:
            start = 0
            if have:
                take = block[: bs - have]
                carry.append(take)
                have += take.shape[0]
                start = take.shape[0]
                if have < bs:
                    continue
                yield torch.cat(carry)
                carry, have = [], 0
            while block.shape[0] - start >= bs:
                yield block[start : start + bs]
                start += bs
            if start < block.shape[0]:
                carry, have = [block[start:]], block.shape[0] - start
        if have:
            yield torch.cat(carry) if len(carry) > 1 else carry[0]

    def __iter__(self) -> Iterator[torch.Tensor]:
        """One epoch (``set_epoch`` chooses which) of this rank's and worker's rows; with
        ``repeat``, one epoch after another."""
        info = get_worker_info()
        if info is not None and self.repeat and not self._tagged:
            raise ValueError(
                "ActivationDataset(repeat=True) cannot be iterated by a plain DataLoader's workers (each worker "
                "would start the next epoch on its own, and no state_dict could say where they got): use "
                f"mi_crow.store.ActivationLoader(dataset, num_workers={info.num_workers}), which repeats the "
                "epochs itself, or num_workers=0"
            )
        if _collated_by_dataloader():
            warnings.warn(
                "ActivationDataset makes its own [batch_size, D] batches, and this DataLoader batches them again "
                "(each becomes [1, batch_size, D]): pass batch_size=None to the DataLoader, or use "
                "mi_crow.store.ActivationLoader(dataset, num_workers=...)",
                UserWarning,
                stacklevel=2,
            )
        epoch, batches, resumed = self._start()
        if self._tagged:
            return batches  # type: ignore[return-value]  # ActivationLoader merges the short batches and repeats epochs itself
        positions = self._state["rows"] if self._state is not None and info is None else {}
        merged = _merged(batches, positions, self.batch_size, self.drop_last)
        if self.repeat:
            return self._repeating(epoch, merged, resumed)
        return merged

    def _start(self) -> tuple[int, Iterator[tuple[int, int, torch.Tensor]], bool]:
        """The next iteration: its epoch, its batches as ``(shard, shard's rows after it, batch)``
        and whether it resumes a saved position."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        here, total = self.rank * workers + worker, self.world_size * workers
        plan = self._read_plan() if info is not None else None
        if info is not None and not self._tagged:  # a plain DataLoader's worker: its progress is unseen
            self._shared[1] += 1  # not exact under races between workers; only compared with a mark
        if plan is None:
            resumed = self._resume is not None
            plan = self._next_plan()
            if resumed and info is None:
                self._publish()  # the position was used: workers started later begin the epoch
        epoch, snapshot, resume = plan
        shards, rows, group = resume if resume is not None else (total, {}, self.batch_size)
        positions = _positions(resume, shards, rows, [s for s in range(shards) if s % total == here])
        if info is None:
            self._state = {"epoch": epoch, "snapshot": snapshot, "shards": shards, "rows": positions, "group": group}
            self._worker_mark = int(self._shared[1])
        batches = self._iterate(epoch, self._chunks(epoch, snapshot), shards, dict(positions), group)
        return epoch, batches, resume is not None

    def _repeating(self, epoch: int, batches: Iterator[torch.Tensor], resumed: bool) -> Iterator[torch.Tensor]:
        """``repeat``: after each epoch, ``set_epoch(epoch + 1)`` (a fresh snapshot) and go on."""
        while True:
            count = 0
            for batch in batches:
                count += 1
                yield batch
            if not count and not resumed:
                raise ValueError(_no_rows(epoch, self.run_ids, self.layer, self.rank))
            self.set_epoch(epoch + 1)
            epoch, more, resumed = self._start()
            batches = _merged(
                more, self._state["rows"] if self._state is not None else {}, self.batch_size, self.drop_last
            )

    def _iterate(
        self,
        epoch: int,
        chunks: list[tuple[str, int]],
        shards: int,
        positions: dict[int, int],
        group: int,
        tagged: bool = True,
    ) -> Iterator[Any]:
        """``(shard, the shard's rows up to the end of this batch, batch)`` for each batch of
        each of the ``positions``' shards, from its position on (each shard's last batch may be
        short: :func:`_merged` makes them whole); just the batches if not ``tagged``."""
        # Several shards in one iterator only when resuming with fewer ranks or workers than the
        # state was taken with: each is read to its end, in turn.
        for shard, start in positions.items():
            at = start
            blocks = self._blocks(epoch, chunks[shard::shards], shard, shards, start, group)
            for batch in self._batches(self._prefetched(blocks)):
                at += batch.shape[0]
                if self.device is not None:
                    batch = batch.to(self.device, non_blocking=self.pin_memory)
                if self.stats is not None:
                    batch = self._normalized(batch)
                yield (shard, at, batch) if tagged else batch


def _batch_names(store: Store, run: str, index: int) -> dict[str, list[str]]:
    """``{layer: [key, ...]}`` of one stored batch (``_RUN_BATCH`` for a put_run_batch file's
    keys): from its metadata.json or the file's safetensors header on a LayoutStore (no tensor
    data read), else by loading the batch through the public API."""
    if isinstance(store, LayoutStore):
        meta_key = f"{store._batch_dir(run, index)}/{_keys.METADATA_FILE}"
        where = store._where(meta_key)
        try:
            meta = store._read_json_object(meta_key)
        except FileNotFoundError:
            pass
        else:
            if _keys.TENSOR_NAMES_FIELD not in meta:
                raise ValueError(f"{where} has no {_keys.TENSOR_NAMES_FIELD!r} field")
            return store._read_names_field(meta[_keys.TENSOR_NAMES_FIELD], where)
        key = store._run_batch_file(run, index)
        with store._open(key) as f:
            header = tf.read_header(f, store._where(key))
        return {_RUN_BATCH: [k for k in header.tensors if k != _keys.EMPTY_LIST_NAME]}
    _, tensors = store.get_detector_metadata(run, index)
    if tensors:
        return {layer: list(keys) for layer, keys in tensors.items()}
    batch = store.get_run_batch(run, index)
    return {_RUN_BATCH: list(batch) if isinstance(batch, dict) else []}


def _runs(store: Store) -> list[str] | None:
    """The store's runs; ``None`` for a store that cannot list them (``list_runs`` is optional)."""
    try:
        return store.list_runs()
    except NotImplementedError:
        return None


def _check_run(store: Store, run: str, runs: list[str] | None) -> None:
    """A run without a stored batch must be in the store (listed, or with metadata where the
    store cannot list its runs).

    Raises:
        ValueError: If it is not, listing the store's runs.
    """
    if runs is None:
        if not store.get_run_metadata(run):
            raise ValueError(f"run {run!r} is not in the store: it holds no batch and no metadata of that run")
    elif run not in runs:
        raise ValueError(f"run {run!r} is not in the store{_suggest(run, runs)}; its runs: {_listed(runs)}")


def _listed(names: Sequence[str], most: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > most else ''}]"


def _suggest(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _plain_loader_workers() -> int:
    """The ``num_workers`` of a plain ``DataLoader`` (not an :class:`ActivationLoader`) whose
    ``__len__`` is calling ``len(dataset)``; 0 if none (or if torch's internals differ)."""
    try:
        frame: types.FrameType | None = _frame(2)
        for _ in range(3):
            if frame is None:
                return 0
            owner = frame.f_locals.get("self")
            if frame.f_code.co_name == "__len__" and isinstance(owner, DataLoader):
                if isinstance(owner, ActivationLoader) or owner.batch_size is not None:
                    return 0
                workers = owner.num_workers
                return workers if isinstance(workers, int) and workers > 0 else 0
            frame = frame.f_back
    except Exception:  # torch's DataLoader changed: the count for this process
        return 0
    return 0


def _collated_by_dataloader() -> bool:
    """Whether ``iter(dataset)`` is being called by a DataLoader that batches what it yields
    (``DataLoader(ds)`` without ``batch_size=None``): torch's iterable-dataset fetcher, created
    with ``auto_collation``, calls it in its ``__init__``. Looks a few frames up; ``False`` if
    torch's internals are not what they were (never an error)."""
    try:
        from torch.utils.data._utils.fetch import _IterableDatasetFetcher

        frame: types.FrameType | None = _frame(2)
        for _ in range(4):
            if frame is None:
                return False
            owner = frame.f_locals.get("self")
            if isinstance(owner, _IterableDatasetFetcher):
                return getattr(owner, "auto_collation", False) is True
            frame = frame.f_back
    except Exception:  # torch moved or renamed its fetcher: no warning, never a failure
        return False
    return False


def _no_rows(epoch: int, runs: Sequence[str], layer: str, rank: int) -> str:
    return (
        f"repeat=True: epoch {epoch} of runs {list(runs)} (layer {layer!r}) gave rank {rank} no batch, so repeating "
        "would never yield one: the runs hold no batch yet, or fewer rows than one batch with drop_last, or fewer "
        "stored batches than ranks x workers"
    )


def _merged(
    batches: Iterator[tuple[int, int, torch.Tensor]], positions: dict[int, int], size: int, drop_last: bool
) -> Iterator[torch.Tensor]:
    """Batches of ``size`` rows from tagged batches of several shards, only the last one short.

    A shard's last batch of an epoch may be short; it is held, and the held rows of several
    shards are handed out together as soon as they make ``size`` rows, so only the epoch's very
    last batch can be short (dropped with ``drop_last``). ``positions`` (shard -> rows handed out)
    advances only by rows actually handed out: a shard whose held rows are not (or only partly)
    handed out resumes with them, since a position is any number of rows into its stream.
    """
    held: collections.deque[tuple[int, int, torch.Tensor]] = collections.deque()  # (shard, start, rows)
    have = 0
    for shard, end, batch in batches:
        n = batch.shape[0]
        if n >= size:
            positions[shard] = end
            yield batch
            continue
        held.append((shard, end - n, batch))
        have += n
        if have < size:
            continue
        parts = []
        need = size
        while need:
            s, start, rows = held[0]
            k = min(need, rows.shape[0])
            parts.append(rows[:k])
            positions[s] = start + k
            need -= k
            if k == rows.shape[0]:
                held.popleft()
            else:
                held[0] = (s, start + k, rows[k:])
        have -= size
        yield torch.cat(parts)
    if held and not drop_last:
        for s, start, rows in held:
            positions[s] = start + rows.shape[0]
        yield torch.cat([rows for *_, rows in held]) if len(held) > 1 else held[0][2]


class ActivationLoader(DataLoader):  # type: ignore[type-arg]
    """A ``torch.utils.data.DataLoader`` over an :class:`ActivationDataset` whose
    ``state_dict()`` is exact under workers (as torchdata's ``StatefulDataLoader``).

    The dataset's own batches are passed through (``batch_size=None``); each worker reads its
    shards, and the loader records, for every batch it hands out, how far its shard got. So a
    checkpoint taken at any step resumes exactly, with ``num_workers=k``, persistent workers,
    and another number of ranks or workers (see :meth:`ActivationDataset.load_state_dict`).

    Unlike a plain ``DataLoader(ds, batch_size=None, num_workers=k)``, which yields each worker's
    short last batch as it comes (up to ``k`` short batches an epoch, some mid-epoch), the loader
    holds the short ends of the shards and hands them out merged into whole batches: only the
    epoch's very last batch may be short (``drop_last`` on the dataset drops it). A shard's
    position advances only by the rows handed out, so the state stays exact while rows are held.
    With the dataset's ``repeat``, the loader itself calls ``set_epoch(epoch + 1)`` after each
    epoch and goes on. ``len(loader)``, :attr:`num_rows` and :attr:`d_in` size a training loop.

    Args:
        dataset: The dataset; ``set_epoch``/``load_state_dict`` may be called on it or here.
        num_workers: DataLoader worker processes (0: read in this process).
        **kwargs: Other ``DataLoader`` arguments (``pin_memory``, ``persistent_workers``,
            ``prefetch_factor``, ``multiprocessing_context``, ``timeout``, ``worker_init_fn``...);
            not ``batch_size``, ``shuffle``, ``sampler`` or ``collate_fn`` (the dataset batches
            and orders its rows).

    Examples:
        >>> import torch
        >>> from mi_crow.store import ActivationDataset, ActivationLoader, MemoryStore
        >>> store = MemoryStore()
        >>> for i in range(4):
        ...     _ = store.put_detector_metadata("r", i, {}, {"l": {"activations": torch.randn(8, 16)}})
        >>> loader = ActivationLoader(ActivationDataset(store, "r", "l", batch_size=4, shuffle=True))
        >>> first = next(iter(loader))
        >>> state = loader.state_dict()     # save it with the checkpoint
        >>> state["rows"]
        {'0': 4}
    """

    def __init__(self, dataset: ActivationDataset, num_workers: int = 0, **kwargs: Any):
        if not isinstance(dataset, ActivationDataset):
            raise TypeError(f"ActivationLoader needs an ActivationDataset, got {type(dataset).__name__}")
        for name in ("batch_size", "shuffle", "sampler", "batch_sampler", "collate_fn", "drop_last"):
            if name in kwargs:
                raise ValueError(
                    f"ActivationLoader takes no {name}=: the dataset makes its batches (set batch_size, shuffle, "
                    "drop_last on the ActivationDataset)"
                )
        # The workers get a copy that reports its shard's position with every batch; it shares
        # the plans (and their shared memory) with ``dataset``, where epochs and states are set.
        worker_copy = copy.copy(dataset)
        worker_copy._tagged = True
        super().__init__(worker_copy, batch_size=None, num_workers=num_workers, **kwargs)
        self.source = dataset
        self._position: dict[str, Any] | None = None

    def set_epoch(self, epoch: int, snapshot: Mapping[str, Any] | None = None) -> None:
        """:meth:`ActivationDataset.set_epoch`."""
        self.source.set_epoch(epoch, snapshot)
        self._position = None

    def __iter__(self) -> Iterator[torch.Tensor]:  # type: ignore[override]
        epoch, batches, resumed = self._epoch()
        if self.source.repeat:
            return self._repeating(epoch, batches, resumed)
        return batches

    def _epoch(self) -> tuple[int, Iterator[torch.Tensor], bool]:
        """The next epoch's batches (short ones merged across shards), its number and whether
        it resumes a saved position."""
        ds, copy_ = self.source, self.dataset
        assert isinstance(copy_, ActivationDataset)
        epoch, snapshot, resume = ds._next_plan()
        ds._publish(resume)  # what the workers read when they start this iteration
        copy_.epoch, copy_._snapshot, copy_._resume = epoch, (epoch, snapshot), resume  # read here with 0 workers
        workers = max(1, self.num_workers)
        total = ds.world_size * workers
        shards, rows, group = resume if resume is not None else (total, {}, ds.batch_size)
        mine = range(ds.rank * workers, (ds.rank + 1) * workers)
        # Checked here too, before any worker starts (each worker would say it as well).
        positions = _positions(resume, shards, rows, [s for s in range(shards) if s % total in mine])
        self._position = {"epoch": epoch, "snapshot": snapshot, "shards": shards, "rows": positions, "group": group}
        return epoch, _merged(super().__iter__(), positions, ds.batch_size, ds.drop_last), resume is not None

    def __len__(self) -> int:
        """Batches this rank's loader yields in an epoch of the current snapshot (only the last
        may be short): :meth:`ActivationDataset.__len__` for this loader's workers. With
        ``repeat``, the batches of one epoch."""
        return self.source._length(max(1, self.num_workers))

    @property
    def num_rows(self) -> int:
        """:attr:`ActivationDataset.num_rows` for this loader's workers (with ``world_size > 1`` a
        rank's share of the stored batches depends on them)."""
        return self.source._rows(max(1, self.num_workers))

    @property
    def d_in(self) -> int:
        """:attr:`ActivationDataset.d_in`."""
        return self.source.d_in

    def _repeating(self, epoch: int, batches: Iterator[torch.Tensor], resumed: bool) -> Iterator[torch.Tensor]:
        """``repeat``: after each epoch, ``set_epoch(epoch + 1)`` on the dataset (a fresh snapshot,
        which persistent workers see too) and the next epoch."""
        while True:
            count = 0
            for batch in batches:
                count += 1
                yield batch
            if not count and not resumed:
                raise ValueError(_no_rows(epoch, self.source.run_ids, self.source.layer, self.source.rank))
            self.source.set_epoch(epoch + 1)
            epoch, batches, resumed = self._epoch()

    def state_dict(self) -> dict[str, Any]:
        """Where this rank got in the current epoch, in the form of :meth:`ActivationDataset.state_dict`
        (exact at every step, whatever ``num_workers``)."""
        if self._position is None:
            state = self.source.state_dict() if int(self.source._shared[1]) == 0 else None
            if state is not None:
                return state
            return self.source._state_of(self.source.epoch, None, None, {}, self.source.batch_size)
        p = self._position
        return self.source._state_of(p["epoch"], p["snapshot"], p["shards"], p["rows"], p["group"])

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """:meth:`ActivationDataset.load_state_dict`: the next iteration resumes there."""
        self.source.load_state_dict(state)
        self._position = None

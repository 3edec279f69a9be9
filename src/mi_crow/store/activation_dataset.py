"""``ActivationDataset``: stored activations as a shuffled, sharded, resumable training stream.

The rows of one layer/key across every stored batch of one or more runs are read as a stream
of ``[batch_size, D]`` tensors. One epoch's order is a deterministic function of ``seed`` and
the epoch:

1. the stored batches ("chunks") of all runs are listed, and with ``shuffle`` permuted;
2. chunk ``i`` of that order belongs to shard ``i % shards``, where the shards are
   ``world_size`` ranks times the DataLoader workers of each (so every row is read by exactly
   one worker of one rank);
3. each shard reads its chunks in order and groups consecutive ones into windows of at most
   ``shuffle_buffer_bytes`` (at least one chunk); with ``shuffle`` the rows of each window
   are permuted, which mixes rows across stored batches;
4. the concatenated rows are cut into batches of ``batch_size`` rows; only the last of the
   epoch may be smaller (or dropped with ``drop_last``).

Reading runs on a background thread that keeps up to ``prefetch`` windows ready, so the
training step does not wait on the disk. Memory is bounded by about
``(prefetch + 2) * shuffle_buffer_bytes``.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mi_crow.store._names import check_layer, check_name
from mi_crow.store.store import Store

_DONE = object()


def _seed(*parts: object) -> int:
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


_use_count = getattr(torch._C, "_storage_Use_Count", None)


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
        # A buffer sent to another process (DataLoader workers move a batch's storage into shared
        # memory in place, and the receiver maps that same memory) is never written again.
        self.buffers = [(buf, idle) for buf, idle in self.buffers if not buf.is_shared()]  # type: ignore[no-untyped-call]
        if _use_count is not None:
            for buf, idle in self.buffers:
                if buf.shape == shape and buf.dtype == dtype and self._count(buf) == idle:
                    return buf
        out = torch.empty(shape, dtype=dtype)
        if _use_count is not None and len(self.buffers) < self.size:
            self.buffers.append((out, self._count(out)))
        return out


def _touch(rows: torch.Tensor) -> None:
    """Fault in the pages of a (possibly memory-mapped) tensor: read one element per 4 KiB."""
    if rows.numel() and rows.is_contiguous():
        rows.reshape(-1).view(torch.uint8)[::4096].sum()


class ActivationDataset(IterableDataset[torch.Tensor]):
    """The rows of one layer/key of one or more runs, as ``[batch_size, D]`` tensors.

    Args:
        store: Any :class:`~mi_crow.store.Store`; only its public API is used.
        run_ids: A run id or a list of them.
        layer: Layer signature whose activations are read.
        key: Tensor key of the activations (``[..., D]``; ``[B, T, D]`` becomes ``[B*T, D]``).
        batch_size: Rows per yielded tensor (the last of an epoch may have fewer).
        shuffle: Shuffle chunks and, within windows of ``shuffle_buffer_bytes``, rows.
        seed: Seed of the order; the order is a function of ``seed`` and the epoch.
        shuffle_buffer_bytes: Memory budget of one shuffle window (default 256 MiB).
        drop_padding: Drop the rows whose mask is 0; the mask is read from the same layer
            under ``mask_key``, shape ``[B, T]`` for activations ``[B, T, D]``.
        mask_key: Key of the attention mask (default ``"attention_mask"``).
        dtype: Convert rows to this dtype.
        device: Move batches to this device (from pinned memory when it is CUDA).
        pin_memory: Pin batches before moving them; default: when ``device`` is CUDA.
        drop_last: Drop the last, smaller batch of an epoch.
        rank: This process's rank, for distributed training.
        world_size: Number of ranks; rank ``r`` reads the ``r``-th share of the chunks.
        prefetch: Windows read ahead on the background thread (0: read in the caller).

    Examples:
        >>> import torch
        >>> from mi_crow.store import MemoryStore, ActivationDataset
        >>> store = MemoryStore()
        >>> for i in range(3):
        ...     _ = store.put_detector_metadata("r", i, {}, {"l": {"activations": torch.full((2, 5, 8), float(i))}})
        >>> ds = ActivationDataset(store, "r", "l", batch_size=4, shuffle=True, seed=1)
        >>> sum(b.shape[0] for b in ds), next(iter(ds)).shape
        (30, torch.Size([4, 8]))
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
    ):
        super().__init__()
        self.run_ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
        if not self.run_ids:
            raise ValueError("run_ids must name at least one run")
        for run in self.run_ids:
            check_name(run, "run_id")
        self.layer = check_layer(layer, "layer")
        self.key = check_name(key, "key")
        self.mask_key = check_name(mask_key, "mask_key")
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("shuffle_buffer_bytes", shuffle_buffer_bytes, 1),
            ("world_size", world_size, 1),
            ("rank", rank, 0),
            ("prefetch", prefetch, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size, got rank={rank}, world_size={world_size}")
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
        self.epoch = 0
        self._resume: dict[str, Any] | None = None
        self._position: dict[str, int] = {"epoch": 0, "rows": 0}

    # ------------------------------------------------------------------ epochs and state

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` for the next iteration (call it at each epoch, as with
        ``DistributedSampler``)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

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
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """Where the current (or last) epoch got: its number and the rows already yielded.

        Exact when iterating in the training process (``num_workers=0``; reading still
        overlaps through the prefetch thread).
        """
        return {**self._config(), "epoch": self._position["epoch"], "rows": self._position["rows"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration yields exactly the rows that epoch had left, in order.

        Raises:
            ValueError: If ``state`` was taken from a dataset configured differently.
        """
        mine = self._config()
        differing = sorted(k for k in mine if state.get(k) != mine[k])
        if differing:
            raise ValueError(f"state_dict was taken from a dataset with other settings: {differing}")
        self.epoch = int(state["epoch"])
        self._resume = {"epoch": self.epoch, "rows": int(state["rows"])}

    # ------------------------------------------------------------------ reading

    def _chunks(self, epoch: int) -> list[tuple[str, int]]:
        chunks = [(run, i) for run in self.run_ids for i in self.store.list_run_batches(run)]
        if self.shuffle:
            order = torch.randperm(len(chunks), generator=_generator(self.seed, epoch, "chunks")).tolist()
            chunks = [chunks[i] for i in order]
        return chunks

    def _load_rows(self, run: str, index: int) -> torch.Tensor:
        """Rows ``[n, D]`` of one stored batch (padding dropped if asked)."""
        try:
            acts = self.store.get_detector_metadata_by_layer_by_key(run, index, self.layer, self.key)
        except FileNotFoundError:
            batch = self.store.get_run_batch(run, index)
            if not isinstance(batch, dict) or self.key not in batch:
                raise FileNotFoundError(
                    f"batch {index} of run {run!r} has no {self.layer!r}/{self.key!r} tensor"
                ) from None
            acts = batch[self.key]
        if acts.dim() == 0:
            raise ValueError(f"{self.layer!r}/{self.key!r} of batch {index} of run {run!r} is 0-d; expected [..., D]")
        rows = acts.reshape(-1, acts.shape[-1]) if acts.dim() != 2 else acts
        if self.drop_padding:
            mask = self.store.get_detector_metadata_by_layer_by_key(run, index, self.layer, self.mask_key)
            if tuple(mask.shape) != tuple(acts.shape[:-1]):
                raise ValueError(
                    f"mask {self.mask_key!r} of batch {index} of run {run!r} has shape {tuple(mask.shape)}, "
                    f"activations {tuple(acts.shape)}: expected {tuple(acts.shape[:-1])}"
                )
            rows = rows[mask.reshape(-1).to(torch.bool)]
        return rows

    def _checked(self, rows: torch.Tensor, first: torch.Tensor | None, run: str, index: int) -> torch.Tensor:
        if first is not None and rows.shape[1:] != first.shape[1:]:
            raise ValueError(
                f"batch {index} of run {run!r} has rows of shape {tuple(rows.shape[1:])}, "
                f"earlier ones {tuple(first.shape[1:])}"
            )
        return rows

    def _blocks(self, epoch: int, shard: int, shards: int, skip: int) -> Iterator[torch.Tensor]:
        """The shard's row stream, as consecutive blocks of rows, without its first ``skip`` rows.

        Sequential: each stored batch's rows as they come back from the store (memory-mapped by
        LocalStore: no copy; their pages are faulted in here, on the prefetch thread).
        Shuffled: windows of stored batches up to ``shuffle_buffer_bytes``; each window's rows
        are permuted and gathered straight into blocks of ``batch_size`` rows (no window-sized
        copy is ever made).
        """
        chunks = self._chunks(epoch)[shard::shards]
        first: torch.Tensor | None = None
        if not self.shuffle:
            for run, index in chunks:
                rows = self._checked(self._load_rows(run, index), first, run, index)
                first = rows if first is None else first
                if skip >= rows.shape[0]:
                    skip -= rows.shape[0]
                    continue
                rows, skip = rows[skip:], 0
                _touch(rows)
                yield rows if self.dtype is None else rows.to(self.dtype)
            return
        window: list[torch.Tensor] = []
        size = number = 0
        pool = _BufferPool(self.prefetch + 3)
        for position, (run, index) in enumerate(chunks):
            rows = self._checked(self._load_rows(run, index), first, run, index)
            first = rows if first is None else first
            window.append(rows)
            size += rows.numel() * rows.element_size()
            if size < self.shuffle_buffer_bytes and position + 1 < len(chunks):
                continue
            number += 1
            n = sum(r.shape[0] for r in window)
            if n <= skip:  # resuming: this whole window was yielded before
                skip -= n
            else:
                order = torch.randperm(n, generator=_generator(self.seed, epoch, shard, shards, number))
                yield from self._gather(window, order, skip, pool)
                skip = 0
            window, size = [], 0

    def _gather(
        self, window: list[torch.Tensor], order: torch.Tensor, skip: int, pool: _BufferPool
    ) -> Iterator[torch.Tensor]:
        """Rows ``order`` of the window's concatenation, ``batch_size`` at a time, less the first ``skip``.

        Each batch holds the rows ``order[i:i + batch_size]``, grouped by the stored batch they
        come from (so each row is copied once, straight into the output); which rows form a
        batch is what the permutation decides.
        """
        sizes = torch.tensor([r.shape[0] for r in window])
        ends = sizes.cumsum(0)
        starts = ends - sizes
        dtype = self.dtype or window[0].dtype
        for i in range(skip - skip % self.batch_size, order.shape[0], self.batch_size):
            wanted = order[i : i + self.batch_size]
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

        def produce() -> None:
            try:
                for block in blocks:
                    if self.pin_memory and torch.cuda.is_available():
                        block = block.pin_memory()
                    while not stop.is_set():
                        try:
                            q.put(block, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(_DONE)
            except BaseException as e:  # handed to the consumer, which re-raises it
                q.put(e)

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
        if have and not self.drop_last:
            yield torch.cat(carry) if len(carry) > 1 else carry[0]

    def __iter__(self) -> Iterator[torch.Tensor]:
        """One epoch (``set_epoch`` chooses which) of this rank's and worker's rows."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        shard, shards = self.rank * workers + worker, self.world_size * workers
        epoch = self.epoch
        skip = 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            skip = self._resume["rows"]
        self._resume = None
        self._position = {"epoch": epoch, "rows": skip}
        return self._iterate(epoch, shard, shards, skip)

    def _iterate(self, epoch: int, shard: int, shards: int, skip: int) -> Iterator[torch.Tensor]:
        for batch in self._batches(self._prefetched(self._blocks(epoch, shard, shards, skip))):
            self._position["rows"] += batch.shape[0]
            if self.device is not None:
                batch = batch.to(self.device, non_blocking=self.pin_memory)
            yield batch

"""``ActivationCapture``: activations of a running model, straight into a store.

Inside ``with ActivationCapture(model, store, run_id, layers) as cap:`` every forward call of
``model`` becomes one store batch ``{layer: {key: tensor}}`` (the per-batch layout of
``put_detector_metadata``), with consecutive batch indices. Hooks copy each hooked module's
output (or input) off the model's path; a writer thread persists batch ``b`` while the model
runs batch ``b + 1``. On CUDA the device-to-host copies go to pinned buffers on a side stream,
so the model never waits for them; on CPU the copy is an ordinary one. At most ``max_pending``
batches wait for the writer (backpressure when the disk is slower than the model), so memory
is bounded by about ``max_pending + 1`` batches of captured tensors.

Many processes (one per GPU, on any number of machines) capture into one run by each taking a
``rank`` of ``world_size``: rank ``r`` stores its batches at indices ``r, r + W, r + 2W, ...``, so
no two writers ever write the same index, on any backend. Each one merges its own counts into
the run's metadata (``capture.writers``) with :meth:`Store.update_run_metadata`, a conditional
update, so no writer's counts are lost, and each resumes its own share after a crash.
"""

from __future__ import annotations

import datetime
import difflib
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

from mi_crow.store._backend import Capabilities
from mi_crow.store._layout import LayoutStore
from mi_crow.store._names import check_name
from mi_crow.store.store import Store

_STOP = object()
_FREE_SHAPES = 4  # recycled host buffers are kept for this many (shape, dtype) pairs


def extract_tensor(value: Any) -> torch.Tensor | None:
    """The activation tensor in what a module returned or received.

    A tensor is itself; a tuple or list gives its first tensor (Hugging Face layers return
    ``(hidden_states, ...)``); a ``ModelOutput``/dict gives ``last_hidden_state``,
    ``hidden_states`` or its first tensor value.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        for name in ("last_hidden_state", "hidden_states"):
            if isinstance(value.get(name), torch.Tensor):
                return value[name]  # type: ignore[no-any-return]
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = extract_tensor(item)
            if found is not None:
                return found
    return None


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process: the arguments where given; otherwise those of
    ``torch.distributed`` when it is initialized; otherwise the ``RANK`` and ``WORLD_SIZE``
    environment variables when both are set (``torchrun`` and most job launchers set them);
    otherwise ``0`` and ``1``.

    Raises:
        ValueError: If a value is not an int, ``world_size < 1``, ``rank`` is not in
            ``0..world_size - 1``, or an environment variable that is used is not such a number
            (the message names the variable and its value).

    Examples:
        >>> from mi_crow.store.capture import resolve_rank
        >>> resolve_rank(1, 4)
        (1, 4)
    """
    if rank is None or world_size is None:
        default_rank, default_world = _default_rank()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1} for world_size {world_size}, got {rank}")
    return rank, world_size


def _default_rank() -> tuple[int, int]:
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    env_rank, env_world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if env_rank is None or env_world is None:
        return 0, 1
    rank, world = _env_int("RANK", env_rank, 0), _env_int("WORLD_SIZE", env_world, 1)
    if rank >= world:
        raise ValueError(
            f"the environment variable RANK={env_rank!r} must be less than WORLD_SIZE={env_world!r} "
            "(ranks are numbered from 0)"
        )
    return rank, world


def _env_int(name: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"the environment variable {name}={value!r} must be an integer >= {minimum}")
    return number


def _library_version() -> str:
    from mi_crow.store import __version__

    return __version__


class ActivationCapture:
    """Capture the outputs (or inputs) of named modules of ``model`` into ``store``.

    Args:
        model: Any ``torch.nn.Module``; each of its forward calls in the context is one batch.
        store: The store to write to (``put_detector_metadata`` per batch). With this package's
            stores the host buffers of a written batch are reused for later batches; a store
            of another kind may keep the tensors it is given, so it gets fresh ones each batch.
        run_id: The run; if it already has batches, the capture continues after the last one
            of this rank (see ``completed`` and ``next_batch``).
        layers: Names from ``model.named_modules()`` (a name or a list of them).
        key: Tensor key of the activations (default ``"activations"``).
        dtype: Convert activations to this dtype on the device before copying them out.
        inputs: Capture each module's input instead of its output.
        max_pending: Batches that may wait for the writer before the model is made to wait.
        metadata: Extra JSON fields for the run's metadata.
        rank: This writer's number among ``world_size`` processes capturing into the run; it
            stores its batches at indices ``rank, rank + world_size, rank + 2 * world_size, ...``.
            Default (for both): from ``torch.distributed`` when initialized, else the ``RANK`` and
            ``WORLD_SIZE`` environment variables when both are set, else ``0`` of ``1``
            (:func:`resolve_rank`).
        world_size: How many processes capture into the run.

    Attributes:
        next_batch: The index the next forward call is stored at; after that, the next index of
            this rank. It may be set to another index of this rank (``rank`` modulo
            ``world_size``) that the run does not hold yet, to fill a gap.
        completed: How many of this rank's batches the run held when the capture was entered: a
            process resuming its share after a crash skips that many of its own inputs.
        batches: This rank's batches in the run (stored before and during this capture).
        tokens: This rank's tokens in the run.
        bytes: Bytes of tensors this capture wrote.

    The run's metadata (``meta.json``) is merged with :meth:`Store.update_run_metadata` when the
    capture is entered, at most once a second while it runs and when it closes:
    ``capture.world_size``, ``capture.writers[str(rank)] = {batches, tokens, last_batch, updated}``
    for each writer, and ``capture.batches`` / ``capture.tokens`` summed over the writers; other
    fields are kept. Batches committed after a writer's entry was last written (a crash) are
    counted from their own metadata when that rank resumes.

    Raises:
        ValueError: If a layer name is unknown (the message names it and lists near names),
            a name is invalid, or a setting is out of range; nothing is written then. On
            entering, if the run holds batches captured with another ``world_size`` (both named).

    Examples:
        >>> import torch
        >>> from mi_crow.store import ActivationCapture, MemoryStore
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> store = MemoryStore()
        >>> with ActivationCapture(model, store, "run", ["0", "2"]) as cap:
        ...     _ = model(torch.randn(3, 4))
        ...     _ = model(torch.randn(5, 4))
        >>> store.list_run_batches("run")
        [0, 1]
        >>> store.get_detector_metadata_by_layer_by_key("run", 1, "0", "activations").shape
        torch.Size([5, 8])
    """

    def __init__(
        self,
        model: nn.Module,
        store: Store,
        run_id: str,
        layers: str | Sequence[str],
        *,
        key: str = "activations",
        dtype: torch.dtype | None = None,
        inputs: bool = False,
        max_pending: int = 2,
        metadata: Mapping[str, Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.model = model
        self.store = store
        self.run_id = check_name(run_id, "run_id")
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        if not self.layers:
            raise ValueError("layers must name at least one module of the model")
        self.key = check_name(key, "key")
        modules = dict(model.named_modules())
        for layer in self.layers:
            if layer not in modules or layer == "":
                near = difflib.get_close_matches(str(layer), [n for n in modules if n], n=5, cutoff=0.5)
                hint = f"; similar names: {near}" if near else ""
                raise ValueError(f"layer {layer!r} is not a module of {type(model).__name__}{hint}")
            check_name(layer, "layer")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers has duplicates: {self.layers}")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        self.dtype = dtype
        self.inputs = inputs
        self.max_pending = max_pending
        self.extra_metadata = dict(metadata or {})
        self._modules = modules
        self._handles: list[Any] = []
        self._current: dict[str, torch.Tensor] | None = None
        self._extras: dict[str, torch.Tensor] = {}
        self._events: list[Any] = []
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._error_raised = False
        # Host buffers of written batches, by (shape, dtype, pinned), for the next batches.
        # At most the buffers of every batch that can be in flight at once, for a few shapes.
        self._free: OrderedDict[tuple[tuple[int, ...], torch.dtype, bool], list[torch.Tensor]] = OrderedDict()
        self._free_lock = threading.Lock()
        self._free_per_shape = (max_pending + 2) * (len(self.layers) + 2)
        # Only a store that declares it keeps no reference to the tensors once a write returned
        # (a LayoutStore backend whose capabilities say so) gets its host buffers reused; any
        # other store may keep them (a cache, an asynchronous upload), so its batches get fresh ones.
        caps = getattr(store, "capabilities", None) if isinstance(store, LayoutStore) else None
        self._recycle = isinstance(caps, Capabilities) and not caps.keeps_payload
        self._side_stream: Any = None
        self._next = self.rank
        self.completed = 0
        self.batches = 0
        self.tokens = 0
        self.bytes = 0
        self._last_batch: int | None = None  # this rank's last stored batch
        self._meta_written = 0.0

    @property
    def next_batch(self) -> int:
        """The index the next forward call is stored at (settable to a free index of this rank)."""
        return self._next

    @next_batch.setter
    def next_batch(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"next_batch must be an int >= 0, got {index!r}")
        if index % self.world_size != self.rank:
            raise ValueError(
                f"batch index {index} belongs to rank {index % self.world_size} of {self.world_size}, not to "
                f"this capture's rank {self.rank}"
            )
        self._next = index

    # ------------------------------------------------------------------ context

    def __enter__(self) -> ActivationCapture:
        rank, world = self.rank, self.world_size
        existing = self.store.list_run_batches(self.run_id)
        prior = self.store.get_run_metadata(self.run_id)
        capture = _capture_of(prior)
        recorded = _recorded_world_size(capture)
        if existing and (recorded or 1) != world:
            raise ValueError(
                f"run {self.run_id!r} was captured with world_size {recorded or 1} and this capture has world_size "
                f"{world}: continue it with world_size={recorded or 1}, or capture into another run"
            )
        own = [index for index in existing if index % world == rank]
        self.completed = len(own)
        self.next_batch = own[-1] + world if own else rank
        mine = _writers_of(capture).get(str(rank), {})
        self.batches = _count(mine.get("batches"))
        self.tokens = _count(mine.get("tokens"))
        last = mine.get("last_batch")
        for index in own:  # batches committed after this writer's counts were last written (a crash)
            if not isinstance(last, int) or index > last:
                meta, _ = self.store.get_detector_metadata(self.run_id, index)
                self.batches += 1
                self.tokens += _count(meta.get("tokens"))
        self._last_batch = own[-1] if own else None
        self._publish()
        self._error, self._error_raised = None, False
        self._meta_written = time.monotonic()
        self._thread = threading.Thread(target=self._write_loop, name="mi-crow-store-capture", daemon=True)
        self._thread.start()
        self._handles.append(self.model.register_forward_pre_hook(self._begin))
        self._handles.append(self.model.register_forward_hook(self._end))
        for layer in self.layers:
            module = self._modules[layer]
            if self.inputs:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(layer), with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(self._output_hook(layer)))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks, write every committed batch, and raise any writer error."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._current = None
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
            if self._error is None:
                self._publish()
        if not self._error_raised:
            self._raise_writer_error()

    # ------------------------------------------------------------------ running the model

    def run(self, **inputs: Any) -> Any:
        """Call the model on ``inputs`` (no gradients); store ``attention_mask`` and
        ``input_ids`` from them next to each layer's activations. Returns the model's output.
        """
        self._raise_writer_error()
        self._extras = {
            k: inputs[k] for k in ("attention_mask", "input_ids") if isinstance(inputs.get(k), torch.Tensor)
        }
        try:
            with torch.no_grad():
                return self.model(**inputs)
        finally:
            self._extras = {}

    # ------------------------------------------------------------------ hooks

    def _begin(self, module: nn.Module, args: Any) -> None:
        self._raise_writer_error()
        self._current = {}
        self._events = []

    def _end(self, module: nn.Module, args: Any, output: Any) -> None:
        current, self._current = self._current, None
        if current is None:
            return
        missing = [layer for layer in self.layers if layer not in current]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in this forward call; nothing was stored for it")
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        extras = {name: self._to_host(t) for name, t in self._extras.items()}
        for layer in self.layers:
            tensors[layer] = {self.key: current[layer], **extras}
        first = current[self.layers[0]]
        mask = self._extras.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else int(first.numel() // max(1, first.shape[-1]))
        index = self._next
        self._next += self.world_size
        self._queue.put((index, tensors, self._events, tokens))  # blocks when the writer is behind
        self._events = []

    def _capture(self, layer: str, value: Any) -> None:
        if self._current is None:
            return  # a submodule called outside a forward call of the model
        tensor = extract_tensor(value)
        if tensor is None:
            raise TypeError(f"layer {layer!r} produced {type(value).__name__}, which holds no tensor to capture")
        if layer in self._current:
            raise RuntimeError(f"layer {layer!r} ran twice in one forward call; capture one call of it per batch")
        self._current[layer] = self._to_host(tensor)

    def _output_hook(self, layer: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._capture(layer, output)

        return hook

    def _input_hook(self, layer: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            found = extract_tensor(args) if args else None
            self._capture(layer, found if found is not None else kwargs.get("hidden_states", kwargs))

        return hook

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A private CPU copy of ``tensor``; on CUDA an async copy into a pinned buffer."""
        t = tensor.detach()
        if self.dtype is not None and t.dtype != self.dtype and t.is_floating_point():
            t = t.to(self.dtype)  # on the device: fewer bytes to move
        if t.device.type != "cuda":
            # A recycled buffer: memory the process has touched before (a fresh allocation is
            # faulted in page by page, several times slower on a VM with a memory balloon).
            out = self._take_buffer(tuple(t.shape), t.dtype, pinned=False)
            out.copy_(t)
            return out
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=t.device)  # type: ignore[no-untyped-call]
        out = self._take_buffer(tuple(t.shape), t.dtype, pinned=True)
        stream = self._side_stream
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            out.copy_(t, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        t.record_stream(stream)  # the caching allocator must not reuse t's memory before the copy ends
        self._events.append(event)
        return out

    def _take_buffer(self, shape: tuple[int, ...], dtype: torch.dtype, *, pinned: bool) -> torch.Tensor:
        with self._free_lock:
            free = self._free.get((shape, dtype, pinned))
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype, pin_memory=pinned)

    def _give_back(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        """Recycle a written batch's host buffers (all made by ``_to_host``), when the store is
        known to keep no reference to them once ``put_detector_metadata`` returned."""
        if not self._recycle:
            return
        unique = {id(t): t for keys in tensors.values() for t in keys.values()}  # masks are shared by layers
        with self._free_lock:
            for t in unique.values():
                key = (tuple(t.shape), t.dtype, t.is_pinned())
                free = self._free.setdefault(key, [])
                self._free.move_to_end(key)
                if len(free) < self._free_per_shape:
                    free.append(t)
            while len(self._free) > _FREE_SHAPES:  # shapes that vary batch to batch: keep the latest
                self._free.popitem(last=False)

    # ------------------------------------------------------------------ writer

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # keep draining so the model is never blocked; the error is raised there
            index, tensors, events, tokens = item
            try:
                for event in events:
                    event.synchronize()
                self.store.put_detector_metadata(self.run_id, index, {"tokens": tokens}, tensors)
                self.batches += 1
                self.tokens += tokens
                self.bytes += sum(t.numel() * t.element_size() for keys in tensors.values() for t in keys.values())
                self._last_batch = index if self._last_batch is None else max(self._last_batch, index)
                # This writer's counts are merged into the run's metadata at most once a second and
                # at close; after a crash the batches past its ``last_batch`` are counted from their
                # own metadata on resume.
                if time.monotonic() - self._meta_written >= 1.0:
                    self._publish()
                self._give_back(tensors)
            except BaseException as e:  # raised in the caller at its next call, or at exit
                self._error = e

    def _raise_writer_error(self) -> None:
        """Raise the writer's error; once it failed, the capture stays failed (no gaps)."""
        if self._error is not None:
            self._error_raised = True
            last = self.batches_written_through()
            first = self.rank if last < 0 else last + self.world_size
            raise RuntimeError(
                f"writing captured activations of run {self.run_id!r} failed; batches from index "
                f"{first} on were not stored: {self._error}"
            ) from self._error

    def batches_written_through(self) -> int:
        """The index of the last batch this writer stored (-1 if none)."""
        return -1 if self._last_batch is None else self._last_batch

    # ------------------------------------------------------------------ run metadata

    def _publish(self) -> None:
        """Merge this writer's counts (and the capture's settings) into the run's metadata."""
        config = getattr(self.model, "config", None)
        param = next(self.model.parameters(), None)
        now = _now()
        entry = {"batches": self.batches, "tokens": self.tokens, "last_batch": self._last_batch, "updated": now}
        settings = {
            "model": {
                "name_or_path": getattr(config, "_name_or_path", None) or getattr(self.model, "name_or_path", None),
                "class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
                "dtype": str(param.dtype).removeprefix("torch.") if param is not None else None,
            },
            "layers": self.layers,
        }
        fields = {
            "key": self.key,
            "dtype": str(self.dtype).removeprefix("torch.") if self.dtype is not None else None,
            "inputs": self.inputs,
            "library": f"mi-crow-store {_library_version()}",
        }
        me, world, run_id, extra = str(self.rank), self.world_size, self.run_id, self.extra_metadata

        def merge(meta: dict[str, Any]) -> dict[str, Any]:
            # A pure function of ``meta``: update_run_metadata may call it again after a lost race.
            capture = _capture_of(meta)
            writers = _writers_of(capture)
            recorded = _recorded_world_size(capture)
            if (
                recorded is not None
                and recorded != world
                and any(_count(w.get("batches")) for k, w in writers.items() if k != me)
            ):
                raise ValueError(
                    f"run {run_id!r} was captured with world_size {recorded} and this capture has world_size "
                    f"{world}: continue it with world_size={recorded}, or capture into another run"
                )
            writers[me] = entry
            ordered = dict(
                sorted(
                    writers.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0, kv[0])
                )
            )
            lasts = [w["last_batch"] for w in ordered.values() if isinstance(w.get("last_batch"), int)]
            return {
                **meta,
                **extra,
                **settings,
                "capture": {
                    **capture,
                    **fields,
                    "world_size": world,
                    "writers": ordered,
                    "batches": sum(_count(w.get("batches")) for w in ordered.values()),
                    "tokens": sum(_count(w.get("tokens")) for w in ordered.values()),
                    "last_batch": max(lasts, default=None),
                    "updated": now,
                },
            }

        self.store.update_run_metadata(self.run_id, merge)
        self._meta_written = time.monotonic()


def _capture_of(meta: Any) -> dict[str, Any]:
    """The ``capture`` field of run metadata (``{}`` if missing or not an object)."""
    capture = meta.get("capture") if isinstance(meta, dict) else None
    return capture if isinstance(capture, dict) else {}


def _writers_of(capture: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``capture.writers``; a run captured before there were writers reads as writer ``"0"``."""
    writers = capture.get("writers")
    if isinstance(writers, dict):
        return {str(k): dict(v) for k, v in writers.items() if isinstance(v, dict)}
    if "batches" in capture or "last_batch" in capture:
        return {
            "0": {
                "batches": _count(capture.get("batches")),
                "tokens": _count(capture.get("tokens")),
                "last_batch": capture.get("last_batch") if isinstance(capture.get("last_batch"), int) else None,
                "updated": capture.get("updated"),
            }
        }
    return {}


def _recorded_world_size(capture: dict[str, Any]) -> int | None:
    """The world size a run was captured with: ``capture.world_size``, 1 for a run captured before
    ranks were recorded, ``None`` for a run never captured."""
    world = capture.get("world_size")
    if isinstance(world, int) and not isinstance(world, bool) and world >= 1:
        return world
    return 1 if _writers_of(capture) else None


def _count(value: Any) -> int:
    """A count read from metadata (0 if missing or not a non-negative int)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

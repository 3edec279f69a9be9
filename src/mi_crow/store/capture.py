"""``ActivationCapture``: activations of a running model, straight into a store.

Inside ``with ActivationCapture(model, store, run_id, layers) as cap:`` every forward call of
``model`` becomes one store batch ``{layer: {key: tensor}}`` (the per-batch layout of
``put_detector_metadata``), with consecutive batch indices. Hooks copy each hooked module's
output (or input) off the model's path; a writer thread persists batch ``b`` while the model
runs batch ``b + 1``. On CUDA the device-to-host copies go to pinned buffers on a side stream,
so the model never waits for them; on CPU the copy is an ordinary one. At most ``max_pending``
batches wait for the writer (backpressure when the disk is slower than the model), so memory
is bounded by about ``max_pending + 1`` batches of captured tensors.
"""

from __future__ import annotations

import datetime
import difflib
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
        run_id: The run; if it already has batches, the capture continues after the last.
        layers: Names from ``model.named_modules()`` (a name or a list of them).
        key: Tensor key of the activations (default ``"activations"``).
        dtype: Convert activations to this dtype on the device before copying them out.
        inputs: Capture each module's input instead of its output.
        max_pending: Batches that may wait for the writer before the model is made to wait.
        metadata: Extra JSON fields for the run's metadata.

    Raises:
        ValueError: If a layer name is unknown (the message names it and lists near names),
            a name is invalid, or a setting is out of range; nothing is written then.

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
    ):
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
        self.next_batch = 0
        self.batches = 0
        self.tokens = 0
        self.bytes = 0
        self._run_meta: dict[str, Any] = {}

    # ------------------------------------------------------------------ context

    def __enter__(self) -> ActivationCapture:
        existing = self.store.list_run_batches(self.run_id)
        self.next_batch = existing[-1] + 1 if existing else 0
        prior = self.store.get_run_metadata(self.run_id)
        capture = prior.get("capture", {}) if isinstance(prior, dict) else {}
        self.batches = int(capture.get("batches", 0))
        self.tokens = int(capture.get("tokens", 0))
        last = capture.get("last_batch")
        for index in existing:  # batches committed after the metadata was last written (a crash)
            if last is None or index > last:
                meta, _ = self.store.get_detector_metadata(self.run_id, index)
                self.batches += 1
                self.tokens += int(meta.get("tokens", 0))
        param = next(self.model.parameters(), None)
        config = getattr(self.model, "config", None)
        self._run_meta = {
            **(prior if isinstance(prior, dict) else {}),
            **self.extra_metadata,
            "model": {
                "name_or_path": getattr(config, "_name_or_path", None) or getattr(self.model, "name_or_path", None),
                "class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
                "dtype": str(param.dtype).removeprefix("torch.") if param is not None else None,
            },
            "layers": self.layers,
            "capture": {
                "key": self.key,
                "dtype": str(self.dtype).removeprefix("torch.") if self.dtype is not None else None,
                "inputs": self.inputs,
                "batches": self.batches,
                "tokens": self.tokens,
                "last_batch": existing[-1] if existing else None,
                "library": f"mi-crow-store {_library_version()}",
                "updated": _now(),
            },
        }
        self.store.put_run_metadata(self.run_id, self._run_meta)
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
                self.store.put_run_metadata(self.run_id, self._run_meta)
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
        index = self.next_batch
        self.next_batch += 1
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
                capture = self._run_meta["capture"]
                capture.update(batches=self.batches, tokens=self.tokens, last_batch=index, updated=_now())
                # The run's counts are rewritten at most once a second and at close; after a crash
                # the batches past ``last_batch`` are counted from their own metadata on resume.
                if time.monotonic() - self._meta_written >= 1.0:
                    self.store.put_run_metadata(self.run_id, self._run_meta)
                    self._meta_written = time.monotonic()
                self._give_back(tensors)
            except BaseException as e:  # raised in the caller at its next call, or at exit
                self._error = e

    def _raise_writer_error(self) -> None:
        """Raise the writer's error; once it failed, the capture stays failed (no gaps)."""
        if self._error is not None:
            self._error_raised = True
            raise RuntimeError(
                f"writing captured activations of run {self.run_id!r} failed; batches from index "
                f"{self.batches_written_through() + 1} on were not stored: {self._error}"
            ) from self._error

    def batches_written_through(self) -> int:
        """The index of the last batch the writer stored (-1 if none)."""
        last = self._run_meta.get("capture", {}).get("last_batch")
        return -1 if last is None else int(last)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

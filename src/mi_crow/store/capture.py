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
import inspect
import json
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

from mi_crow.store._backend import Capabilities
from mi_crow.store._interop import calls_forward_directly, hook_aliases, unwrap_model, wrap_forward
from mi_crow.store._keys import INPUT_IDS_KEY, INPUTS_LAYER, MASK_KEY
from mi_crow.store._layout import LayoutStore
from mi_crow.store._names import check_name
from mi_crow.store._progress import progress_bar
from mi_crow.store.stats import STATS_FIELD, LayerStats, merge_writer_stats
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


Element = int | str  # which element of a module's tuple/list (int) or mapping/ModelOutput (str) output


def suggest_layers(name: str, names: Iterable[str], n: int = 5) -> list[str]:
    """Module names of ``names`` the user may have meant by ``name``, best first.

    Prefix fixes come first: ``name`` without leading components (``transformer.h.1`` on a
    ``GPT2Model``, whose blocks are ``h.1``), with a prefix added (``h.1`` on a ``GPT2LMHeadModel``
    is ``transformer.h.1``) or with one prefix replaced by another (``model.h.1``); then near
    typos (``difflib``).

    Args:
        name: The name that is not a module.
        names: The model's module names (``dict(model.named_modules())``; ``""`` is skipped).
        n: At most this many suggestions.

    Returns:
        Up to ``n`` names of ``names``, without duplicates (empty if nothing is close).

    Examples:
        >>> from mi_crow.store.capture import suggest_layers
        >>> suggest_layers("h.1", ["transformer", "transformer.h.0", "transformer.h.1", "lm_head"])
        ['transformer.h.1']
        >>> suggest_layers("transformer.h.1", ["h", "h.0", "h.1", "ln_f"])
        ['h.1']
        >>> suggest_layers("encoder.layers.1", ["encoder.layer.0", "encoder.layer.1", "pooler"])
        ['encoder.layer.1', 'encoder.layer.0']
    """
    known = [x for x in dict.fromkeys(names) if x]
    found: list[str] = []
    parts = name.split(".")
    tails = [".".join(parts[i:]) for i in range(1, len(parts))]
    found += [tail for tail in tails if tail in known]  # a prefix too many
    found += sorted((x for x in known if x.endswith("." + name)), key=len)  # a prefix missing
    for tail in tails:  # another prefix; a tail of one component ("1") matches too much to mean anything
        if "." in tail:
            found += sorted((x for x in known if x.endswith("." + tail)), key=len)
    found += difflib.get_close_matches(name, known, n=n, cutoff=0.5)
    return list(dict.fromkeys(found))[:n]


def _describe(value: Any) -> str:
    """What a module's output (or input) holds, for an error message."""
    if isinstance(value, torch.Tensor):
        return f"a Tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {list(value)}"
    if isinstance(value, (tuple, list)):
        kinds = ", ".join(type(v).__name__ for v in value[:8]) + (", ..." if len(value) > 8 else "")
        return f"a {type(value).__name__} of length {len(value)} ({kinds})"
    return f"a {type(value).__name__}"


def _check_elements(element: Element | Mapping[str, Element] | None, layers: list[str]) -> dict[str, Element | None]:
    """``element`` as ``{layer: element or None}``, checked (``ValueError`` naming the bad value)."""

    def checked(value: Any, where: str) -> Element:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
            raise ValueError(
                f"{where} must be an int (an index into a tuple or list) or a non-empty str (a key of a "
                f"mapping or ModelOutput), got {type(value).__name__} {value!r}"
            )
        return value

    if element is None:
        return dict.fromkeys(layers)
    if isinstance(element, Mapping):
        unknown = [k for k in element if k not in layers]
        if unknown:
            raise ValueError(f"element names layers {unknown} that are not captured; the captured layers are {layers}")
        return {layer: checked(element[layer], f"element[{layer!r}]") if layer in element else None for layer in layers}
    return dict.fromkeys(layers, checked(element, "element"))


def select_element(value: Any, element: Element, layer: str, what: str = "output") -> torch.Tensor:
    """Element ``element`` of a module's ``value``: ``value[element]`` of a tuple or list (an
    int, negative from the end), of a mapping or ``ModelOutput`` (a str key), or of a
    ``ModelOutput`` by position (an int, as its ``to_tuple()``).

    Raises:
        ValueError: If ``value`` has no such element or it is not a tensor; the message names
            the layer, the element and what ``value`` holds.
    """
    where = f"element {element!r} of the {what} of layer {layer!r}"
    be = "are" if what.endswith("s") else "is"
    if isinstance(element, int):
        items: Any = value.to_tuple() if isinstance(value, Mapping) and hasattr(value, "to_tuple") else value
        if not isinstance(items, (tuple, list)):
            raise ValueError(f"{where}: an int selects from a tuple or list, and the {what} {be} {_describe(value)}")
        if not -len(items) <= element < len(items):
            raise ValueError(f"{where} is out of range: the {what} {be} {_describe(items)}")
        found = items[element]
    else:
        if not isinstance(value, Mapping):
            raise ValueError(
                f"{where}: a str selects from a mapping or ModelOutput, and the {what} {be} {_describe(value)}"
            )
        if element not in value:
            raise ValueError(f"{where} does not exist: the {what} {be} {_describe(value)}")
        found = value[element]
    if not isinstance(found, torch.Tensor):
        raise ValueError(f"{where} is {_describe(found)}, not a tensor: the {what} {be} {_describe(value)}")
    return found


def _positions(function: Any, names: Sequence[str]) -> dict[str, int]:
    """The positional index of each of ``names`` among ``function``'s parameters (those it has)."""
    try:
        params = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a builtin or C function without a signature
        return {}
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {name: positional.index(name) for name in names if name in positional}


def _is_ids(value: Any) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and not (value.is_floating_point() or value.is_complex())
        and (value.dtype != torch.bool)
    )


def _rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows ``[n, d]`` a batch's statistics cover: the non-padding ones when ``mask`` (``[B, T]``)
    matches the tensor's leading dimensions (a ``[B, T]`` tensor is rows of width 1), all otherwise."""
    if mask is not None and t.dim() >= mask.dim() and tuple(t.shape[: mask.dim()]) == tuple(mask.shape):
        picked = t[mask != 0]
        return picked.reshape(-1, 1) if t.dim() == mask.dim() else picked.reshape(-1, picked.shape[-1])
    if t.dim() == 0:
        return t.reshape(1, 1)
    return t.reshape(-1, t.shape[-1])


_STATS_CHUNK = 1 << 22  # elements: the float64 scratch of a layer's statistics stays near 32 MiB


def _stats_of(rows: torch.Tensor, scratch: dict[int, torch.Tensor]) -> LayerStats:
    """``LayerStats.of(rows)``: the same two-pass sums in float64, computed in place in a reused
    scratch buffer (``scratch``, by width), a chunk of rows at a time, so that the writer thread
    neither allocates nor faults in fresh memory for them (several times faster)."""
    n, d = int(rows.shape[0]), int(rows.shape[1])
    step = max(1, _STATS_CHUNK // max(1, d))
    stats = LayerStats.empty(d)
    for start in range(0, n, step):
        chunk = rows[start : start + step]
        m = int(chunk.shape[0])
        buf = scratch.get(d)
        if buf is None or buf.shape[0] < m:
            buf = scratch[d] = torch.empty(min(n, step), d, dtype=torch.float64)
        x = buf[:m]
        x.copy_(chunk)
        mean = x.sum(0).div_(m)
        norms = torch.linalg.vector_norm(x, dim=1)
        m2 = x.sub_(mean).mul_(x).sum(0)
        stats = stats.merged(LayerStats(m, mean, m2, float(norms.sum()), float(norms.square().sum())))
    return stats


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

    Every forward call of ``model`` inside the context is one store batch::

        {layer: {key: activations} for each captured layer,
         "attention_masks": {"attention_mask": mask, "input_ids": ids}}

    The model's inputs are stored once per batch, not once per layer, in the pseudo-layer
    ``"attention_masks"`` (the one mi_crow 1.0's own capture keeps its attention masks in), each
    key only when the forward call had it. They are taken from the model's own call, so
    ``model(**enc)`` records them as :meth:`run` does: ``input_ids`` and ``attention_mask`` passed
    by name or in their positions of ``model.forward``, or an integer tensor as the first
    positional argument (as ids). :meth:`run`'s inputs win. Only a 2-D mask that has the shape of
    the ids (when there are ids) is the batch's padding mask; another one (a 4-D attention mask, a
    cache step's longer mask) is not stored. A batch's metadata is ``{"tokens": n, "masked": b}``:
    ``n`` counts the mask's non-zero entries when the batch has a mask (``b`` true), else the
    rows of the first layer's activations.

    Args:
        model: Any ``torch.nn.Module`` (an nnsight ``LanguageModel``: its torch module); each of
            its forward calls in the context is one batch.
        store: The store to write to (``put_detector_metadata`` per batch). With this package's
            stores the host buffers of a written batch are reused for later batches; a store
            of another kind may keep the tensors it is given, so it gets fresh ones each batch.
        run_id: The run; if it already has batches, the capture continues after the last one
            of this rank (see ``completed`` and ``next_batch``).
        layers: Names from ``model.named_modules()`` (a name or a list of them); not
            ``"attention_masks"``, the name of the batch's inputs.
        key: Tensor key of the activations (default ``"activations"``).
        dtype: Convert activations to this dtype on the device before copying them out.
        inputs: Capture each module's input instead of its output.
        element: Which element to capture of a module output that is a tuple or list (an ``int``
            index, negative from the end) or a mapping or ``ModelOutput`` (a ``str`` key; an
            ``int`` indexes a ``ModelOutput`` as its ``to_tuple()``). With ``inputs=True``, an
            ``int`` is a positional argument and a ``str`` a parameter by name. A mapping
            ``{layer: element}`` gives it per layer; the other layers keep the default: the tensor
            itself, a tuple's or list's first tensor (Hugging Face layers return
            ``(hidden_states, ...)``), a mapping's ``last_hidden_state``, ``hidden_states`` or
            first tensor (:func:`extract_tensor`).
        max_pending: Batches that may wait for the writer before the model is made to wait.
        metadata: Extra JSON fields for the run's metadata.
        rank: This writer's number among ``world_size`` processes capturing into the run; it
            stores its batches at indices ``rank, rank + world_size, rank + 2 * world_size, ...``.
            Default (for both): from ``torch.distributed`` when initialized, else the ``RANK`` and
            ``WORLD_SIZE`` environment variables when both are set, else ``0`` of ``1``
            (:func:`resolve_rank`).
        world_size: How many processes capture into the run.
        stats: Keep per-layer statistics of the stored rows in the run's metadata (computed in
            the writer thread, off the model's path); ``False`` leaves them out.
        progress: Show a progress bar of the stored batches and tokens (``None``: unless in quiet
            mode, :func:`mi_crow.store.disable_progress_bars`).

    Attributes:
        next_batch: The index the next forward call is stored at; after that, the next index of
            this rank. It may be set to another index of this rank (``rank`` modulo
            ``world_size``) that the run does not hold yet, to fill a gap.
        completed: How many of this rank's batches the run held when the capture was entered: a
            process resuming its share after a crash skips that many of its own inputs.
        batches: This rank's batches in the run (stored before and during this capture).
        tokens: This rank's tokens in the run.
        bytes: Bytes of tensors this capture wrote.
        layer_stats: This rank's running statistics, ``{layer: LayerStats}`` (:class:`mi_crow.store.LayerStats`).

    The run's metadata (``meta.json``) is merged with :meth:`Store.update_run_metadata` when the
    capture is entered, at most once a second while it runs (less often when a merge takes long:
    the writer spends at most about 5% of its time on them) and when it closes:
    ``capture.world_size``, ``capture.element``,
    ``capture.writers[str(rank)] = {batches, tokens, last_batch, masked, stats, updated}`` for
    each writer, ``capture.batches`` / ``capture.tokens`` summed over the writers,
    ``capture.masked`` (true only if every batch of every writer had a mask) and
    ``capture.stats`` (every writer's statistics merged, as
    :func:`mi_crow.store.read_stats` reads them); other fields are kept. Batches committed
    after a writer's entry was last written (a crash) are counted, and their statistics computed
    from their stored tensors, when that rank resumes.

    Statistics (:class:`mi_crow.store.LayerStats`: count, mean, variance, norms) cover,
    for each layer, the stored rows of every batch: the non-padding rows when the batch has a
    mask that matches the activations' leading dimensions (``[B, T, D]`` are ``B * T`` rows of
    ``D``, those where the mask is 0 left out), all rows otherwise. ``capture.stats[layer]`` is
    there only when every writer's statistics cover every batch it stored: a writer with
    ``stats=False`` or of a version without statistics, a layer added on resume, or one whose
    width changed from batch to batch (``capture.writers[rank].stats_skipped[layer]`` says why)
    leave that layer out, so the figures never describe part of the run as if it were all of it.

    Raises:
        ValueError: If a layer name is unknown (the message names it and suggests the names
            meant: prefix fixes and near typos, :func:`suggest_layers`), a name is invalid, or
            a setting is out of range; nothing is written then. On entering, if the run holds
            batches captured with another ``world_size`` (both named). In a forward call, if
            ``element`` does not select a tensor of a module's output (the message names the
            layer, the element and what the output holds); nothing is stored for that call.
        TypeError: If ``model`` is not a torch module (nor a model that wraps one).

    Examples:
        >>> import torch
        >>> from mi_crow.store import ActivationCapture, MemoryStore
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> store = MemoryStore()
        >>> with ActivationCapture(model, store, "run", ["0", "2"], progress=False) as cap:
        ...     _ = model(torch.randn(3, 4))
        ...     _ = model(torch.randn(5, 4))
        >>> store.list_run_batches("run")
        [0, 1]
        >>> store.get_detector_metadata_by_layer_by_key("run", 1, "0", "activations").shape
        torch.Size([5, 8])
        >>> store.get_run_metadata("run")["capture"]["stats"]["2"]["count"]
        8
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
        element: Element | Mapping[str, Element] | None = None,
        max_pending: int = 2,
        metadata: Mapping[str, Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        stats: bool = True,
        progress: bool | None = None,
    ):
        self.rank, self.world_size = resolve_rank(rank, world_size)
        model = unwrap_model(model)
        self.model = model
        self.store = store
        self.run_id = check_name(run_id, "run_id")
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        if not self.layers:
            raise ValueError("layers must name at least one module of the model")
        self.key = check_name(key, "key")
        # TransformerLens's TransformerBridge also answers to HookedTransformer's hook names.
        modules = {**hook_aliases(model), **dict(model.named_modules())}
        for layer in self.layers:
            if not isinstance(layer, str):
                raise ValueError(f"layer names must be str, got {type(layer).__name__} {layer!r}")
            if layer == INPUTS_LAYER:
                raise ValueError(
                    f"layer {INPUTS_LAYER!r} cannot be captured: each batch stores the model's inputs "
                    f"({MASK_KEY}, {INPUT_IDS_KEY}) under that name"
                )
            if layer not in modules or layer == "":
                near = suggest_layers(layer, modules)
                hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
                raise ValueError(f"layer {layer!r} is not a module of {type(model).__name__}{hint}")
            check_name(layer, "layer")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers has duplicates: {self.layers}")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        for name, flag in (("inputs", inputs), ("stats", stats)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
        if progress is not None and not isinstance(progress, bool):
            raise ValueError(f"progress must be a bool or None, got {type(progress).__name__} {progress!r}")
        self.elements = _check_elements(element, self.layers)
        self._element_meta: Any = (
            {layer: e for layer, e in self.elements.items() if e is not None}
            if isinstance(element, Mapping)
            else element
        )
        self.dtype = dtype
        self.inputs = inputs
        self.max_pending = max_pending
        self.keep_stats = stats
        self.progress = progress
        self.extra_metadata = dict(metadata or {})
        self._modules = modules
        self._positions = _positions(model.forward, (INPUT_IDS_KEY, MASK_KEY))
        self._signatures: dict[str, inspect.Signature | None] = {}
        self._handles: list[Any] = []
        self._undo_wrap: Callable[[], None] | None = None
        self._current: dict[str, torch.Tensor] | None = None
        self._model_inputs: dict[str, torch.Tensor] = {}
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
        self._annotations: dict[int, dict[str, Any]] = {}  # batch index -> extra metadata fields (annotate)
        self._side_stream: Any = None
        self._next = self.rank
        self.completed = 0
        self.batches = 0
        self.tokens = 0
        self.bytes = 0
        self._masked = True  # every batch of this rank had a mask (so far)
        self._stats: dict[str, LayerStats] = {}
        self._skipped: dict[str, str] = {}  # layers whose statistics are not kept, and why
        self._scratch: dict[int, torch.Tensor] = {}  # float64 buffers of the statistics, by width
        self._last_batch: int | None = None  # this rank's last stored batch
        self._meta_written = 0.0
        self._publish_every = 1.0
        self._bar: Any = None

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

    @property
    def layer_stats(self) -> dict[str, LayerStats]:
        """This rank's statistics so far, ``{layer: LayerStats}`` (the layers it keeps them of)."""
        return dict(self._stats)

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
        if existing:
            self._check_same_settings(prior, capture)
        own = [index for index in existing if index % world == rank]
        self.completed = len(own)
        self.next_batch = own[-1] + world if own else rank
        mine = _writers_of(capture).get(str(rank), {})
        self.batches = _count(mine.get("batches"))
        self.tokens = _count(mine.get("tokens"))
        self._masked = mine.get("masked") is True or not self.batches
        self._stats, self._skipped = {}, {}
        if self.keep_stats:
            self._restore_stats(mine)
        last = mine.get("last_batch")
        for index in own:  # batches committed after this writer's counts were last written (a crash)
            if not isinstance(last, int) or index > last:
                meta, tensors = self.store.get_detector_metadata(self.run_id, index)
                self.batches += 1
                self.tokens += _count(meta.get("tokens"))
                self._masked = self._masked and meta.get("masked") is True
                if self.keep_stats:
                    self._add_stats(tensors, f"batch {index}")
        self._last_batch = own[-1] if own else None
        # Published before any batch: a writer killed after its first batch leaves its world size recorded.
        self._publish()
        self._error, self._error_raised = None, False
        share = f" rank {rank}" if world > 1 else ""
        self._bar = progress_bar(self.progress, desc=f"capture {self.run_id}{share}", unit=" batches")
        self._thread = threading.Thread(target=self._write_loop, name="mi-crow-store-capture", daemon=True)
        self._thread.start()
        if calls_forward_directly(self.model):  # TransformerLens: run_with_hooks calls model.forward(...)
            self._undo_wrap = wrap_forward(self.model, self._begin, lambda m, a, k, out: self._end(m, a, out))
        else:
            self._handles.append(self.model.register_forward_pre_hook(self._begin, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._end))
        for layer in self.layers:
            module = self._modules[layer]
            if self.inputs:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(layer), with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(self._output_hook(layer)))
        return self

    def _check_same_settings(self, prior: Mapping[str, Any], capture: Mapping[str, Any]) -> None:
        """Refuse to continue a run whose batches were captured with other settings: its batches
        would mix layers, dtypes, or module inputs with outputs, and its metadata would describe
        only the last capture. Checked only for what the run's metadata records."""
        if "key" not in capture:
            return  # not written by ActivationCapture: nothing recorded to compare
        mine = {
            "layers": self.layers,
            "key": self.key,
            "dtype": str(self.dtype).removeprefix("torch.") if self.dtype is not None else None,
            "inputs": self.inputs,
            "element": self._element_meta,
        }
        recorded = {"layers": prior.get("layers"), **{k: capture.get(k) for k in mine if k != "layers"}}
        for name, value in mine.items():
            if name not in (prior if name == "layers" else capture):
                continue  # not recorded by the version that captured the run
            if recorded[name] != value:
                raise ValueError(
                    f"run {self.run_id!r} was captured with {name}={recorded[name]!r} and this capture has "
                    f"{name}={value!r}: continue it with the same {name}, or capture into another run"
                )

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks, write every committed batch, and raise any writer error."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._undo_wrap is not None:
            self._undo_wrap()
            self._undo_wrap = None
        self._current = None
        self._model_inputs = {}
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
            if self._error is None:
                self._publish()
        self._scratch = {}
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not self._error_raised:
            self._raise_writer_error()

    def annotate(self, index: int, fields: Mapping[str, Any]) -> None:
        """Extra JSON fields for the metadata of batch ``index`` (this capture's next forward call is
        stored at ``next_batch``), written with the batch; ``tokens`` and ``masked`` are the
        capture's own and cannot be set. Call it before the forward call that makes the batch.

        Raises:
            ValueError: If ``fields`` is not a mapping of JSON-serializable values with string keys,
                or names ``tokens`` or ``masked``.
        """
        fields = dict(fields)
        taken = sorted({"tokens", "masked"} & set(fields))
        if taken:
            raise ValueError(f"annotate cannot set the capture's own batch metadata fields {taken}")
        try:
            json.dumps(fields, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"annotate's fields for batch {index} are not JSON: {e}") from None
        self._annotations[index] = fields

    # ------------------------------------------------------------------ running the model

    def run(self, **inputs: Any) -> Any:
        """Call the model on ``inputs`` (no gradients); store their ``attention_mask`` and
        ``input_ids`` as the batch's inputs. Returns the model's output.
        """
        self._raise_writer_error()
        self._extras = {k: inputs[k] for k in (MASK_KEY, INPUT_IDS_KEY) if isinstance(inputs.get(k), torch.Tensor)}
        try:
            with torch.no_grad():
                return self.model(**inputs)
        finally:
            self._extras = {}

    # ------------------------------------------------------------------ hooks

    def _begin(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._raise_writer_error()
        self._current = {}
        self._events = []
        found: dict[str, torch.Tensor] = {}
        for name in (INPUT_IDS_KEY, MASK_KEY):
            value = kwargs.get(name)
            position = self._positions.get(name)
            if value is None and position is not None and position < len(args):
                value = args[position]
            if isinstance(value, torch.Tensor):
                found[name] = value
        if INPUT_IDS_KEY not in found and INPUT_IDS_KEY not in self._positions and args and _is_ids(args[0]):
            found[INPUT_IDS_KEY] = args[0]  # a plain module called on token ids
        found.update(self._extras)
        mask, ids = found.get(MASK_KEY), found.get(INPUT_IDS_KEY)
        if mask is not None and (mask.dim() != 2 or (ids is not None and ids.shape != mask.shape)):
            del found[MASK_KEY]  # not a [B, T] padding mask of these tokens
        self._model_inputs = found

    def _end(self, module: nn.Module, args: Any, output: Any) -> None:
        current, self._current = self._current, None
        model_inputs, self._model_inputs = self._model_inputs, {}
        if current is None:
            return
        missing = [layer for layer in self.layers if layer not in current]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in this forward call; nothing was stored for it")
        tensors: dict[str, dict[str, torch.Tensor]] = {layer: {self.key: current[layer]} for layer in self.layers}
        if model_inputs:
            tensors[INPUTS_LAYER] = {name: self._to_host(t) for name, t in model_inputs.items()}
        index = self._next
        self._next += self.world_size
        self._queue.put((index, tensors, self._events))  # blocks when the writer is behind
        self._events = []

    def _capture(self, layer: str, tensor: torch.Tensor) -> None:
        assert self._current is not None
        if layer in self._current:
            raise RuntimeError(f"layer {layer!r} ran twice in one forward call; capture one call of it per batch")
        self._current[layer] = self._to_host(tensor)

    def _output_hook(self, layer: str) -> Any:
        element = self.elements[layer]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._current is None:
                return  # a submodule called outside a forward call of the model
            if element is not None:
                tensor = select_element(output, element, layer)
            else:
                found = extract_tensor(output)
                if found is None:
                    raise TypeError(
                        f"layer {layer!r} produced {type(output).__name__}, which holds no tensor to capture"
                    )
                tensor = found
            self._capture(layer, tensor)

        return hook

    def _input_hook(self, layer: str) -> Any:
        element = self.elements[layer]

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._current is None:
                return
            if isinstance(element, int):
                tensor = select_element(args, element, layer, "positional arguments")
            elif isinstance(element, str):
                tensor = select_element(self._arguments(layer, module, args, kwargs), element, layer, "arguments")
            else:
                found = extract_tensor(args) if args else None
                if found is None:
                    found = extract_tensor(kwargs.get("hidden_states", kwargs))
                if found is None:
                    raise TypeError(f"the input of layer {layer!r} holds no tensor to capture")
                tensor = found
            self._capture(layer, tensor)

        return hook

    def _arguments(
        self, layer: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """A module call's arguments by parameter name (positional ones too, where its forward says)."""
        if layer not in self._signatures:
            try:
                self._signatures[layer] = inspect.signature(module.forward)
            except (TypeError, ValueError):
                self._signatures[layer] = None
        signature = self._signatures[layer]
        if signature is None:
            return dict(kwargs)
        try:
            arguments = dict(signature.bind(*args, **kwargs).arguments)
        except TypeError:
            return dict(kwargs)
        for p in signature.parameters.values():
            if p.kind is p.VAR_KEYWORD and isinstance(arguments.get(p.name), dict):
                arguments.update(arguments.pop(p.name))
        return arguments

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
        unique = {id(t): t for keys in tensors.values() for t in keys.values()}
        with self._free_lock:
            for t in unique.values():
                key = (tuple(t.shape), t.dtype, t.is_pinned())
                free = self._free.setdefault(key, [])
                self._free.move_to_end(key)
                if len(free) < self._free_per_shape:
                    free.append(t)
            while len(self._free) > _FREE_SHAPES:  # shapes that vary batch to batch: keep the latest
                self._free.popitem(last=False)

    # ------------------------------------------------------------------ statistics

    def _restore_stats(self, entry: dict[str, Any]) -> None:
        """This writer's running statistics from its entry of the run's metadata."""
        if not _count(entry.get("batches")):
            return  # nothing counted yet: every layer starts afresh
        saved = entry.get(STATS_FIELD)
        saved = saved if isinstance(saved, dict) else {}
        skipped = entry.get("stats_skipped")
        skipped = skipped if isinstance(skipped, dict) else {}
        for layer in self.layers:
            if layer in skipped:
                self._skipped[layer] = str(skipped[layer])
            elif layer in saved:
                where = f"capture.writers[{str(self.rank)!r}].stats[{layer!r}] of run {self.run_id!r}"
                self._stats[layer] = LayerStats.from_json(saved[layer], where)
            else:
                self._skipped[layer] = "batches of this writer were stored without statistics of this layer"

    def _add_stats(self, tensors: Mapping[str, Mapping[str, torch.Tensor]], where: str) -> None:
        """Merge a stored batch's rows of every layer into this writer's running statistics."""
        mask = tensors.get(INPUTS_LAYER, {}).get(MASK_KEY)
        for layer in self.layers:
            if layer in self._skipped:
                continue
            keys = tensors.get(layer, {})
            t = keys.get(self.key)
            reason = None
            if t is None:
                reason = f"{where} holds no {self.key!r} of this layer"
            elif t.is_complex():
                reason = f"its activations are complex ({t.dtype})"
            if reason is None:
                assert t is not None
                part = _stats_of(_rows(t, mask if mask is not None else keys.get(MASK_KEY)), self._scratch)
                have = self._stats.get(layer)
                if have is not None and have.count and part.count and have.d != part.d:
                    reason = f"its rows changed width from {have.d} to {part.d} ({where})"
                else:
                    self._stats[layer] = part if have is None else have.merged(part)
                    continue
            self._skipped[layer] = reason
            self._stats.pop(layer, None)

    # ------------------------------------------------------------------ writer

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # keep draining so the model is never blocked; the error is raised there
            index, tensors, events = item
            try:
                for event in events:
                    event.synchronize()
                mask = tensors.get(INPUTS_LAYER, {}).get(MASK_KEY)
                first = tensors[self.layers[0]][self.key]
                rows = first.numel() // first.shape[-1] if first.dim() and first.shape[-1] else first.numel()
                tokens = int(torch.count_nonzero(mask)) if mask is not None else int(rows)
                extra = self._annotations.pop(index, {})
                self.store.put_detector_metadata(
                    self.run_id, index, {**extra, "tokens": tokens, "masked": mask is not None}, tensors
                )
                if self.keep_stats:  # before the counts: counts and statistics always cover the same batches
                    self._add_stats(tensors, f"batch {index}")
                self.batches += 1
                self.tokens += tokens
                self._masked = self._masked and mask is not None
                self.bytes += sum(t.numel() * t.element_size() for keys in tensors.values() for t in keys.values())
                self._last_batch = index if self._last_batch is None else max(self._last_batch, index)
                self._bar.update(1)
                self._bar.set_postfix(tokens=f"{self.tokens:,}", refresh=False)
                # This writer's counts are merged into the run's metadata at most once a second and
                # at close; after a crash the batches past its ``last_batch`` are counted from their
                # own metadata on resume.
                if time.monotonic() - self._meta_written >= self._publish_every:
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
        """Merge this writer's counts and statistics (and the capture's settings) into the run's metadata."""
        started = time.monotonic()
        config = getattr(self.model, "config", None)
        param = next(self.model.parameters(), None)
        now = _now()
        entry: dict[str, Any] = {
            "batches": self.batches,
            "tokens": self.tokens,
            "last_batch": self._last_batch,
            "masked": bool(self.batches) and self._masked,
            "updated": now,
        }
        if self.keep_stats:
            entry[STATS_FIELD] = {layer: self._stats[layer].to_json() for layer in self.layers if layer in self._stats}
            if self._skipped:
                entry["stats_skipped"] = dict(self._skipped)
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
            "element": self._element_meta,
            "library": f"mi-crow-store {_library_version()}",
        }
        me, world, run_id, extra, layers = (
            str(self.rank),
            self.world_size,
            self.run_id,
            self.extra_metadata,
            self.layers,
        )

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
            active = {k: w for k, w in ordered.items() if _count(w.get("batches"))}
            lasts = [w["last_batch"] for w in ordered.values() if isinstance(w.get("last_batch"), int)]
            merged = {
                **capture,
                **fields,
                "world_size": world,
                "writers": ordered,
                "batches": sum(_count(w.get("batches")) for w in ordered.values()),
                "tokens": sum(_count(w.get("tokens")) for w in ordered.values()),
                "masked": bool(active) and all(w.get("masked") is True for w in active.values()),
                "last_batch": max(lasts, default=None),
                "updated": now,
            }
            run_stats = _run_stats(active, layers)
            if run_stats:
                merged[STATS_FIELD] = run_stats
            else:
                merged.pop(STATS_FIELD, None)
            return {**meta, **extra, **settings, "capture": merged}

        self.store.update_run_metadata(self.run_id, merge)
        self._meta_written = time.monotonic()
        # Large statistics (wide layers, many writers) make a merge cost more: publish less often
        # then, so that the writer spends at most about 5% of its time on it.
        self._publish_every = max(1.0, 20 * (self._meta_written - started))


def _run_stats(active: dict[str, dict[str, Any]], order: Sequence[str]) -> dict[str, Any]:
    """``capture.stats``: the merged statistics of the layers every writer that stored batches keeps
    them of (so that they cover every batch of the run), in ``order`` first."""
    if not active:
        return {}
    kept = [set(w[STATS_FIELD]) if isinstance(w.get(STATS_FIELD), dict) else set() for w in active.values()]
    common = set.intersection(*kept)
    if not common:
        return {}
    parts = {k: {STATS_FIELD: {layer: w[STATS_FIELD][layer] for layer in common}} for k, w in active.items()}
    merged = merge_writer_stats(parts)
    names = [layer for layer in order if layer in common] + sorted(common.difference(order))
    return {layer: merged[layer].to_json() for layer in names}


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

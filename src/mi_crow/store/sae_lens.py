"""SAELens interoperability: SAELens SAEs in a store, and export to SAELens's on-disk format.

``put_sae`` stores an SAE (an inference ``SAE`` or a ``TrainingSAE``) as a store model: its
tensors are the state dict SAELens's own ``save_model`` writes, and its metadata holds the SAE's
config (``cfg.to_dict()``, as JSON) under :data:`METADATA_FIELD`, with its class and
architecture. ``get_sae`` rebuilds the same SAE; ``export_sae_lens`` (and
``mi-crow-store export-model STORE MODEL DIR --format sae-lens``) writes the folder that SAELens's
``SAE.load_from_disk`` reads: ``cfg.json`` + ``sae_weights.safetensors`` (+ ``sparsity.safetensors``).
No pickle anywhere.

SAELens (and TransformerLens, wandb, which it imports) is loaded inside the functions that need
it, so ``import mi_crow.store`` stays light. Install it with
``pip install 'mi-crow-store[interop]'`` (or ``pip install sae-lens``).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from mi_crow.store import _atomic
from mi_crow.store.store import Store

if TYPE_CHECKING:
    from sae_lens import SAE

__all__ = [
    "CFG_FILENAME",
    "METADATA_FIELD",
    "SPARSITY_FILENAME",
    "WEIGHTS_FILENAME",
    "export_sae_lens",
    "get_sae",
    "get_sae_config",
    "import_sae_lens",
    "put_sae",
]

METADATA_FIELD = "sae_lens"
"""The model metadata field ``put_sae`` writes (``{"class", "architecture", "cfg", ...}``)."""
CFG_FILENAME = "cfg.json"  # SAELens's SAE_CFG_FILENAME
WEIGHTS_FILENAME = "sae_weights.safetensors"  # SAELens's SAE_WEIGHTS_FILENAME
SPARSITY_FILENAME = "sparsity.safetensors"  # SAELens's SPARSITY_FILENAME: {"sparsity": log10 feature sparsity}
SPARSITY_TENSOR = "sparsity"  # the stored tensor holding put_sae's log_feature_sparsity
INSTALL_HINT = "pip install 'mi-crow-store[interop]' (or: pip install sae-lens)"
_FORMAT = 1
_INFERENCE, _TRAINING = "sae", "training_sae"


def import_sae_lens() -> ModuleType:
    """Import SAELens and return the ``sae_lens`` module, or raise an ``ImportError`` that says how
    to install it.

    Quiet about one warning: SAELens 6.54 imports ``transformer_lens.utils``, which
    TransformerLens 3.9 deprecates (with warnings made errors, as under pytest or
    ``python -W error``, that import would otherwise fail). Later ``import sae_lens`` statements
    find the module loaded.

    Raises:
        ImportError: If SAELens is not installed (the message names
            ``pip install 'mi-crow-store[interop]'``).

    Examples:
        >>> from mi_crow.store.sae_lens import import_sae_lens
        >>> import_sae_lens().__name__
        'sae_lens'
    """
    try:
        with warnings.catch_warnings():
            # SAELens 6.54 imports transformer_lens.utils, which TransformerLens 3.9 deprecates; the
            # warning is about SAELens's code, not the caller's (and -W error would make it fatal).
            warnings.filterwarnings("ignore", "The 'utils' module has been deprecated", DeprecationWarning)
            import sae_lens
    except ImportError as e:
        raise ImportError(f"mi_crow.store.sae_lens needs SAELens ({e}); install it with: {INSTALL_HINT}") from e
    module: ModuleType = sae_lens
    return module


def _registry_classes(kind: str, architecture: str) -> tuple[Any, Any]:
    """The (SAE class, config class) SAELens registers for ``architecture`` (training or inference)."""
    from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

    registry = SAE_TRAINING_CLASS_REGISTRY if kind == _TRAINING else SAE_CLASS_REGISTRY
    if architecture not in registry:
        what = "training SAE" if kind == _TRAINING else "SAE"
        raise ValueError(
            f"SAELens has no {what} class registered for architecture {architecture!r} "
            f"(registered: {', '.join(sorted(registry))}); register it with sae_lens."
            f"{'register_sae_training_class' if kind == _TRAINING else 'register_sae_class'} first"
        )
    classes: tuple[Any, Any] = registry[architecture]
    return classes


def _state_dict(sae: Any, *, inference: bool) -> dict[str, torch.Tensor]:
    """The tensors SAELens's ``save_model`` (``save_inference_model`` when ``inference`` and ``sae``
    is a training SAE) writes for ``sae``."""
    state: dict[str, torch.Tensor] = sae.state_dict()
    if inference and hasattr(sae, "process_state_dict_for_saving_inference"):
        sae.process_state_dict_for_saving_inference(state)
    else:
        sae.process_state_dict_for_saving(state)
    return state


def put_sae(
    store: Store,
    model_id: str,
    sae: SAE[Any],
    *,
    metadata: Mapping[str, Any] | None = None,
    log_feature_sparsity: torch.Tensor | None = None,
) -> str:
    """Store a SAELens SAE as the model ``model_id`` (replacing one of that id).

    The tensors are the state dict that SAELens's ``sae.save_model`` writes (as they are: dtypes
    and values bit for bit); the metadata holds, under :data:`METADATA_FIELD`, the SAE's config
    as ``sae.cfg.to_dict()`` serialises it to JSON (what ``cfg.json`` would hold), its
    architecture, whether it is a training SAE, and the SAELens version. A ``TrainingSAE`` is
    stored as one (``get_sae`` gives back a ``TrainingSAE`` that can go on training);
    ``export_sae_lens`` writes either as the inference SAE SAELens's loader reads.

    Args:
        store: Any :class:`~mi_crow.store.Store` that implements ``put_model``.
        model_id: The model's id (a single path component).
        sae: A ``sae_lens.SAE`` (e.g. ``StandardSAE``) or ``sae_lens.TrainingSAE``, of a class
            SAELens has registered for its architecture.
        metadata: More JSON metadata stored beside it (e.g. the run and layer it was trained
            on); it must not hold :data:`METADATA_FIELD`.
        log_feature_sparsity: The ``[d_sae]`` log10 feature sparsity (as SAELens's trainer's
            ``log_feature_sparsity``), stored as the tensor ``"sparsity"`` and exported as
            ``sparsity.safetensors``.

    Returns:
        The model's key, ``"models/{model_id}"``.

    Raises:
        ImportError: If SAELens is not installed.
        TypeError: If ``sae`` is not a SAELens SAE.
        ValueError: If its class is not the one SAELens registers for its architecture (so
            ``get_sae`` could not rebuild it), ``metadata`` holds :data:`METADATA_FIELD` or is
            not JSON, ``log_feature_sparsity`` is not ``[d_sae]``, or the store refuses the
            model (nothing is written).

    Examples:
        >>> import tempfile
        >>> from mi_crow.store import LocalStore
        >>> from mi_crow.store.sae_lens import get_sae, import_sae_lens, put_sae
        >>> sae_lens = import_sae_lens()
        >>> store = LocalStore(tempfile.mkdtemp())
        >>> sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=16, d_sae=64))
        >>> put_sae(store, "sae-l1", sae, metadata={"run": "r", "layer": "h.1"})
        'models/sae-l1'
        >>> type(get_sae(store, "sae-l1")).__name__
        'StandardSAE'
    """
    sl = import_sae_lens()
    if not isinstance(sae, sl.SAE):
        raise TypeError(f"sae must be a sae_lens.SAE, got {type(sae).__name__}")
    kind = _TRAINING if isinstance(sae, sl.TrainingSAE) else _INFERENCE
    architecture = sae.cfg.architecture()
    registered, _ = _registry_classes(kind, architecture)
    if type(sae) is not registered:
        raise ValueError(
            f"sae is a {type(sae).__name__}, but SAELens registers {registered.__name__} for architecture "
            f"{architecture!r}: get_sae could not rebuild it; register its class under an architecture of its own"
        )
    extra = dict(metadata or {})
    if METADATA_FIELD in extra:
        raise ValueError(f"metadata must not contain the field {METADATA_FIELD!r}: put_sae writes it itself")
    tensors = _state_dict(sae, inference=False)
    if log_feature_sparsity is not None:
        d_sae = sae.cfg.d_sae
        if not isinstance(log_feature_sparsity, torch.Tensor) or tuple(log_feature_sparsity.shape) != (d_sae,):
            is_tensor = isinstance(log_feature_sparsity, torch.Tensor)
            got = f"shape {list(log_feature_sparsity.shape)}" if is_tensor else type(log_feature_sparsity).__name__
            raise ValueError(f"log_feature_sparsity must be a [{d_sae}] tensor (d_sae), got {got}")
        if SPARSITY_TENSOR in tensors:
            raise ValueError(f"the SAE's state dict already holds a tensor named {SPARSITY_TENSOR!r}")
        tensors[SPARSITY_TENSOR] = log_feature_sparsity.detach()
    # What SAELens's save_model writes to cfg.json (json.dump: tuples become lists).
    cfg = json.loads(json.dumps(sae.cfg.to_dict()))
    info = {
        "format": _FORMAT,
        "class": kind,
        "architecture": architecture,
        "sae_lens_version": sl.__version__,
        "cfg": cfg,
        "sparsity": SPARSITY_TENSOR if log_feature_sparsity is not None else None,
    }
    return store.put_model(model_id, tensors, {METADATA_FIELD: info, **extra})


def _info(meta: Mapping[str, Any], model_id: str) -> dict[str, Any]:
    """The :data:`METADATA_FIELD` of a model's metadata, checked; ``ValueError`` naming what is wrong."""
    info = meta.get(METADATA_FIELD)
    if info is None:
        fields = ", ".join(sorted(meta)) or "none"
        raise ValueError(
            f"model {model_id!r} has no SAELens config (no {METADATA_FIELD!r} metadata field; its fields: {fields}): "
            "store SAELens SAEs with mi_crow.store.sae_lens.put_sae"
        )
    ok = isinstance(info, dict) and info.get("class") in (_INFERENCE, _TRAINING)
    ok = ok and isinstance(info.get("architecture"), str) and isinstance(info.get("cfg"), dict)
    if not ok:
        raise ValueError(f"model {model_id!r}: its {METADATA_FIELD!r} metadata is not one put_sae writes")
    if info.get("format") != _FORMAT:
        raise ValueError(
            f"model {model_id!r}: {METADATA_FIELD!r} metadata of format {info.get('format')!r}, not {_FORMAT}"
        )
    checked: dict[str, Any] = info
    return checked


def get_sae_config(store: Store, model_id: str) -> dict[str, Any]:
    """The SAELens config of a model stored by :func:`put_sae`, as ``sae.cfg.to_dict()`` gave it
    (JSON types: ``SAEConfig.from_dict`` takes it back). Needs no SAELens.

    Raises:
        FileNotFoundError: If there is no such model.
        ValueError: If the model was not stored by ``put_sae`` (it has no SAELens config).
    """
    _, meta = store.get_model(model_id)
    return dict(_info(meta, model_id)["cfg"])


def get_sae(store: Store, model_id: str, *, device: str = "cpu", dtype: str | None = None) -> SAE[Any]:
    """Rebuild the SAELens SAE stored by :func:`put_sae`, as SAELens's ``SAE.load_from_disk`` does.

    The SAE is of the class it was stored as (a ``TrainingSAE`` stays one), built from its stored
    config, with the stored tensors loaded as they are (``load_state_dict(assign=True)``: the
    same values and dtypes), then moved to ``device`` (and converted to ``dtype``, if given).

    Args:
        store: The store.
        model_id: The model's id.
        device: Where to put the SAE (its ``cfg.device`` becomes this, as with SAELens's loader).
        dtype: Convert it to this dtype (e.g. ``"bfloat16"``; its ``cfg.dtype`` becomes this);
            default: the stored tensors' dtypes, unchanged.

    Returns:
        The SAE.

    Raises:
        ImportError: If SAELens is not installed.
        FileNotFoundError: If there is no such model.
        ValueError: If the model was not stored by ``put_sae``, or SAELens does not know its
            architecture.
    """
    import_sae_lens()
    tensors, meta = store.get_model(model_id)
    return _rebuild(tensors, _info(meta, model_id), device, dtype)


def _rebuild(tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any], device: str, dtype: str | None) -> Any:
    """The SAE of a model's tensors and checked :data:`METADATA_FIELD` (SAELens imported)."""
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting
    from sae_lens.util import str_to_dtype

    sae_cls, cfg_cls = _registry_classes(info["class"], info["architecture"])
    cfg_dict = handle_config_defaulting({**info["cfg"], "device": device, **({"dtype": dtype} if dtype else {})})
    cfg = cfg_cls.from_dict(cfg_dict)
    # Built on the meta device, then given the stored tensors: no weights initialised for nothing.
    cfg.device = "meta"
    sae = sae_cls(cfg)
    sae.cfg.device = device
    state = {name: t for name, t in tensors.items() if name != info.get("sparsity")}
    sae.process_state_dict_for_loading(state)
    sae.load_state_dict(state, assign=True)
    if dtype is None:  # the tensors as stored (a float64 buffer, as BatchTopK's threshold, stays one)
        return sae.to(device=device)
    return sae.to(dtype=str_to_dtype(dtype), device=device)


def export_sae_lens(store: Store, model_id: str, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the SAE stored as ``model_id`` in SAELens's on-disk format, for ``SAE.load_from_disk``.

    ``directory`` gets ``cfg.json`` and ``sae_weights.safetensors`` exactly as SAELens's own save
    writes them (``json.dump`` of the config; ``safetensors.torch.save_file`` of the state dict:
    the same tensor names and dtypes), and ``sparsity.safetensors`` when the SAE was stored with
    its ``log_feature_sparsity``. A training SAE is written as SAELens's training runner writes
    its final SAE (``save_inference_model``: the inference config and state dict). The config's
    ``device`` is the one the SAE was stored from.

    The files are written into a new folder beside ``directory`` and renamed into place, so an
    export that is killed leaves no half-written ``directory`` (only a hidden
    ``.NAME.export-...`` folder beside it, which can be deleted).

    Args:
        store: The store.
        model_id: A model stored by :func:`put_sae`.
        directory: The folder to write; its parent must exist. It must not exist or be empty,
            unless ``overwrite`` (its old content is then replaced as a whole).
        overwrite: Replace a non-empty ``directory``.

    Returns:
        ``directory`` as a ``Path``.

    Raises:
        ImportError: If SAELens is not installed.
        FileNotFoundError: If there is no such model, or ``directory``'s parent is missing.
        ValueError: If the model was not stored by ``put_sae``.
        FileExistsError: If ``directory`` is a non-empty folder and not ``overwrite``, or is not
            a folder (nothing is written in either case).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from mi_crow.store import LocalStore
        >>> from mi_crow.store.sae_lens import export_sae_lens, import_sae_lens, put_sae
        >>> sae_lens = import_sae_lens()
        >>> store = LocalStore(tempfile.mkdtemp())
        >>> _ = put_sae(store, "sae-l1", sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=16, d_sae=64)))
        >>> out = export_sae_lens(store, "sae-l1", Path(tempfile.mkdtemp()) / "sae-l1")
        >>> sorted(p.name for p in out.iterdir()), sae_lens.SAE.load_from_disk(out).cfg.d_sae
        (['cfg.json', 'sae_weights.safetensors'], 64)
    """
    target = Path(directory)
    _check_target(target, overwrite)
    tensors, meta = store.get_model(model_id)
    _export(tensors, _info(meta, model_id), target, overwrite)  # checked before SAELens loads
    return target


def _export(tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any], target: Path, overwrite: bool) -> None:
    """:func:`export_sae_lens` of a model read and checked (also used by the CLI)."""
    from safetensors.torch import save_file

    import_sae_lens()
    sae = _rebuild(tensors, info, "cpu", None)
    state = _state_dict(sae, inference=True)
    # A training SAE's config as save_inference_model writes it.
    cfg: dict[str, Any] = sae.cfg.get_inference_sae_cfg_dict() if info["class"] == _TRAINING else sae.cfg.to_dict()
    cfg["device"] = info["cfg"].get("device", cfg["device"])
    sparsity = tensors.get(info["sparsity"]) if info.get("sparsity") else None

    parent = target.parent
    tmp = parent / f".{target.name}.export-{_atomic.unique_name('')}"
    tmp.mkdir()
    try:
        save_file(state, os.fspath(tmp / WEIGHTS_FILENAME))
        if sparsity is not None:
            save_file({"sparsity": sparsity}, os.fspath(tmp / SPARSITY_FILENAME))
        with open(tmp / CFG_FILENAME, "w") as f:
            json.dump(cfg, f)
        for name in os.listdir(tmp):
            fd = os.open(tmp / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _commit(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuse ``target`` before anything is written: not a folder, or a non-empty one without ``overwrite``."""
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot export to {target}: its parent folder {target.parent} does not exist")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(f"cannot export to {target}: it exists and is not a folder")
    if target.is_dir() and not overwrite and any(target.iterdir()):
        raise FileExistsError(f"cannot export to {target}: the folder is not empty (pass overwrite=True to replace it)")


def _commit(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished folder ``tmp`` to ``target`` in one rename (an empty ``target`` is replaced;
    a non-empty one only with ``overwrite``, swapped out whole and then deleted)."""
    dir_fd = os.open(tmp.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if overwrite:
            old = _atomic.replace_dir(dir_fd, tmp.name, target.name)
            _atomic.fsync_dir(dir_fd)
            if old is not None:
                shutil.rmtree(tmp.parent / old, ignore_errors=True)
            return
        try:
            os.rename(tmp.name, target.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as e:
            if not target.is_dir() or not any(target.iterdir()):
                raise
            raise FileExistsError(
                f"cannot export to {target}: the folder is not empty (pass overwrite=True to replace it)"
            ) from e
        _atomic.fsync_dir(dir_fd)
    finally:
        os.close(dir_fd)

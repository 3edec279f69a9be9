"""The models of the field's tools (nnsight, TransformerLens) as plain ``torch.nn.Module``s.

``ActivationCapture`` hooks modules: the model's own forward call marks a batch, the named
submodules' outputs are its tensors. Two libraries put something between the user and that
module:

* nnsight's ``NNsight`` / ``LanguageModel`` / ``TransformersModel`` are *envoys*, not modules:
  each wraps a ``torch.nn.Module`` (``envoy._module``) whose forward runs once per
  ``with model.trace(...)`` (all of a trace's invokes are batched into that one call). The
  capture hooks that module, and layer names are its ``named_modules()`` names (the envoy
  paths without the leading ``model.``: ``transformer.h.0``).
* TransformerLens's ``HookedTransformer`` is a module, and its hook points are modules
  (``blocks.0.hook_resid_post``), so it needs no unwrapping; but its ``run_with_hooks`` calls
  ``model.forward(...)`` directly, which runs no hooks registered on the model itself.
  :func:`calls_forward_directly` says so for such a model and :func:`wrap_forward` lets a
  capture see those calls too.

Nothing here imports nnsight or TransformerLens: a model is recognised by the classes of the
modules it was made with, so this package works (and imports fast) without them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn


def _class_in(model: Any, module: str, name: str) -> bool:
    """Whether ``model`` is an instance of ``module.name``, where that module is imported (if
    it is not, nothing made from it can exist)."""
    found = sys.modules.get(module)
    cls = vars(found).get(name) if found is not None else None  # not getattr: no deprecation shims
    return isinstance(cls, type) and isinstance(model, cls)


def unwrap_model(model: Any) -> nn.Module:
    """The ``torch.nn.Module`` whose forward calls a capture of ``model`` hooks.

    Args:
        model: A ``torch.nn.Module`` (returned as it is: a Hugging Face model, a TransformerLens
            ``HookedTransformer`` or ``TransformerBridge``, anything else), or an nnsight envoy
            (``NNsight(module)``, ``LanguageModel``, ``TransformersModel``): the module it
            wraps, whose forward runs once per ``with model.trace(...)``. An nnsight model built
            without its weights (``dispatch=False``, the default when loading by repo id) is
            dispatched first, as its first trace would do: the capture must hook the module
            that will run, not the meta-device placeholder that the dispatch replaces.

    Returns:
        The module to hook.

    Raises:
        TypeError: If ``model`` is neither (the message names its type).

    Examples:
        >>> import torch
        >>> from mi_crow.store._interop import unwrap_model
        >>> net = torch.nn.Linear(2, 3)
        >>> unwrap_model(net) is net
        True
    """
    if isinstance(model, nn.Module):
        return model
    if _class_in(model, "nnsight.intervention.envoy", "Envoy"):
        if getattr(model, "dispatched", True) is False:
            model.dispatch()
        module = model._module
        if isinstance(module, nn.Module):
            return module
    raise TypeError(
        f"cannot capture from a {type(model).__module__}.{type(model).__qualname__}: expected a torch.nn.Module "
        "(a Hugging Face or TransformerLens model) or an nnsight model (NNsight, LanguageModel, TransformersModel)"
    )


def calls_forward_directly(module: nn.Module) -> bool:
    """Whether ``module``'s library runs it as ``module.forward(...)`` rather than
    ``module(...)``, so hooks registered on ``module`` itself miss those calls.

    True for TransformerLens's models: a ``HookedRootModule`` (``HookedTransformer`` and the
    others), whose ``run_with_hooks(...)`` calls ``hooked_model.forward(...)``, and a
    ``TransformerBridge``, whose ``run_with_cache`` and ``run_with_hooks`` call
    ``self.forward(...)``. Hooks on their hook points still run; a capture sees those calls as
    batches only through :func:`wrap_forward`.
    """
    # TransformerLens 3 defines HookedRootModule in transformer_lens.HookedRootModule, 2 in hook_points.
    return (
        _class_in(module, "transformer_lens.HookedRootModule", "HookedRootModule")
        or _class_in(module, "transformer_lens.hook_points", "HookedRootModule")
        or _class_in(module, "transformer_lens.model_bridge.bridge", "TransformerBridge")
    )


def hook_aliases(module: nn.Module) -> dict[str, nn.Module]:
    """The hook names ``module`` answers to that are not its ``named_modules()`` names, with
    the module each one stands for.

    A TransformerLens ``TransformerBridge`` wraps a Hugging Face model and names its hook points
    after it (``blocks.1.hook_out``), with the names of ``HookedTransformer`` as aliases
    (``blocks.1.hook_resid_post``) in its ``hook_dict``; a capture that accepts these finds
    the module here. Empty for any other model (a ``HookedTransformer``'s hook names are its
    module names).
    """
    if not calls_forward_directly(module):
        return {}
    hooks = getattr(module, "hook_dict", None)
    if not isinstance(hooks, Mapping):
        return {}
    names = {id(m): n for n, m in module.named_modules()}
    return {
        str(name): hook
        for name, hook in hooks.items()
        if isinstance(hook, nn.Module) and id(hook) in names and names[id(hook)] != name
    }


def wrap_forward(
    module: nn.Module,
    before: Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None],
    after: Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None],
) -> Callable[[], None]:
    """Make every run of ``module.forward`` call ``before`` and ``after`` around it, whether
    it was called as ``module(...)`` or as ``module.forward(...)``.

    ``before(module, args, kwargs)`` and ``after(module, args, kwargs, output)`` take what
    ``register_forward_pre_hook(..., with_kwargs=True)`` and
    ``register_forward_hook(..., with_kwargs=True)`` hooks take (their return values are
    ignored); ``after`` is not called when forward raises. Use it *instead of* those two hooks
    on ``module``, not with them, or a ``module(...)`` call runs both.

    Args:
        module: The model whose calls mark batches.
        before: Called with the call's arguments before forward runs.
        after: Called with the arguments and the output after forward returned.

    Returns:
        A function that undoes the wrapping (call it once, when the capture closes).

    Raises:
        RuntimeError: If ``module.forward`` was already wrapped by this function and not undone.
    """
    if getattr(module.__dict__.get("forward"), "_mi_crow_wrapped", False):
        raise RuntimeError(
            f"the forward of this {type(module).__name__} is already wrapped by a capture: close that capture first"
        )
    had_own = "forward" in module.__dict__
    own = module.__dict__.get("forward")
    inner = module.forward  # bound to this module (or the instance's own forward)

    def forward(*args: Any, **kwargs: Any) -> Any:
        before(module, args, kwargs)
        output = inner(*args, **kwargs)
        after(module, args, kwargs, output)
        return output

    forward._mi_crow_wrapped = True  # type: ignore[attr-defined]
    forward.__wrapped__ = inner  # type: ignore[attr-defined]
    forward.__doc__ = getattr(inner, "__doc__", None)
    module.__dict__["forward"] = forward

    def undo() -> None:
        if module.__dict__.get("forward") is not forward:
            return  # already undone, or replaced since by someone else: leave theirs in place
        if had_own:
            module.__dict__["forward"] = own
        else:
            del module.__dict__["forward"]

    return undo

"""The models of the field's tools (nnsight, TransformerLens) as plain ``torch.nn.Module``s."""

from __future__ import annotations

from typing import Any

from torch import nn


def unwrap_model(model: Any) -> nn.Module:
    """The ``torch.nn.Module`` whose forward calls a capture hooks: ``model`` itself (filled in for
    nnsight's ``LanguageModel`` by the interop work)."""
    if isinstance(model, nn.Module):
        return model
    raise TypeError(f"cannot capture from a {type(model).__name__}: expected a torch.nn.Module")

"""What the mi_crow 1.0 fixture store holds: shared by the script that wrote it and the tests.

``scripts/make_mi_crow_fixture.py`` writes these with the real mi_crow 1.0 ``LocalStore``;
``tests/test_mi_crow_compat.py`` checks that this package reads back exactly these values.
"""

from __future__ import annotations

from typing import Any

import torch

RUN = "legacy-run"
SINGLE_LAYER_RUN = "single-layer"
LAYERS = ["model.layers.0", "model.layers.1"]
RUN_META: dict[str, Any] = {"model": "tiny-gpt", "layers": LAYERS, "note": "zażółć ✓", "n": 3}


def detector_batch(i: int) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    acts = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) + 100 * i
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.int64)
    tensors = {
        LAYERS[0]: {"activations": acts, "attention_mask": mask},
        LAYERS[1]: {"activations": (acts * 0.5).to(torch.bfloat16)},
    }
    if i == 2:
        del tensors[LAYERS[1]]
    return {"batch": i, "tokens": 5, "detectors": ["acts"]}, tensors


DETECTOR_BATCHES = [0, 1, 2]


def run_batches() -> dict[int, Any]:
    return {
        10: {"x": torch.arange(6, dtype=torch.int32).reshape(2, 3), "y": torch.tensor([True, False])},
        11: [torch.ones(2), torch.full((3,), 7, dtype=torch.int8)],
        12: [],
    }


def run_detector_entries() -> list[tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]]:
    return [
        (
            {"step": i, "loss": 1.0 / (i + 1)},
            {"sae": {"top_idx": torch.arange(i + 1), "top_val": torch.ones(i + 1) * i}},
        )
        for i in range(3)
    ]


def single_layer_batch() -> dict[str, dict[str, torch.Tensor]]:
    return {"only.layer": {"activations": torch.linspace(0, 1, 8).reshape(2, 4)}}

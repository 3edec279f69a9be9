"""mi_crow 1.0's own library, run with this package in place of its store: SAE training end to end.

A subprocess runs mi_crow 1.0's real code (installed by ``./dev test`` at ``.venv/mi-crow-ref``) with
``mi_crow.store`` being *this* package: mi_crow's ``LayerActivationDetector`` hooks a tiny GPT-2 built
from a config (no download) and its batches are written the way ``LanguageModel.save_detector_metadata``
writes them; then mi_crow's ``TopKSae.train`` (its ``SaeTrainer``, ``overcomplete``'s ``train_sae``,
reading through ``mi_crow.store.store_dataloader.StoreDataloader``) trains on them three times: by layer
name (with snapshots), by layer index (an ``int`` signature) and on activations holding a NaN (a NaN
loss). ``SaeTrainer`` saves each training run through ``store._run_key(run_id)`` (``model.pt``,
``history.json``, ``snapshots/``) and ``store.put_run_metadata`` and swallows any error in doing so, so
the tests here look at what is really on disk and in the store.

How the subprocess sees both: ``mi_crow`` is a namespace package. This package provides only
``mi_crow/store`` (no ``mi_crow/__init__.py``); the reference's tree is copied to a temporary folder
without its ``store/`` and without its ``mi_crow/__init__.py`` (a regular package would hide every
other portion; it holds only ``__version__``/``ping``, which the library never imports), and that
folder goes on ``PYTHONPATH`` beside the folder this package was imported from here. So
``mi_crow.store`` (and every ``mi_crow.store.*``) can only be this package, and ``mi_crow.mechanistic``,
``mi_crow.hooks``, ``mi_crow.utils`` ... can only be mi_crow 1.0's; the subprocess checks both.

``overcomplete`` (and what it imports at import time: scikit-learn, scipy, matplotlib, scikit-image,
OpenCV, ...) is installed by ``./dev test`` into ``.venv/mi-crow-lib-deps``, apart from the venv.
``overcomplete`` also imports ``torchvision`` at import time, for its vision backbones only; PyPI has
only CUDA builds of torchvision, which cannot load with the CPU torch this project pins, so where no
working torchvision is importable the subprocess stands in an empty module for it (training never
touches it).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import mi_crow.store
from mi_crow.store import LocalStore

REPO = Path(__file__).resolve().parent.parent
MI_CROW_REF = Path(os.environ.get("MI_CROW_REF_PATH", REPO / ".venv" / "mi-crow-ref"))
LIB_DEPS = Path(os.environ.get("MI_CROW_LIB_DEPS_PATH", REPO / ".venv" / "mi-crow-lib-deps"))
# The folder holding the mi_crow/store this test process imported: the subprocess uses the same one.
OUR_ROOT = Path(mi_crow.store.__file__).resolve().parent.parent.parent

N_EMBD, N_LATENTS, TOP_K, EPOCHS = 16, 32, 4, 2
# mi_crow's flattened name of transformer.h[1].mlp (LanguageModelLayers: class name, "_"-joined).
LAYER_NAME = "gpt2lmheadmodel_transformer_h_1_mlp"
# The activation runs mi_crow captures, and the training run trained on each.
ACTS = {"by-name": "acts-by-name", "by-index": "acts-by-index", "nan": "acts-nan"}
TRAININGS = {case: f"sae-{case}" for case in ACTS}

pytestmark = [
    pytest.mark.skipif(
        not (MI_CROW_REF / "mi_crow" / "mechanistic").is_dir(),
        reason=f"mi_crow 1.0 not installed at {MI_CROW_REF} (MI_CROW_REF_PATH); ./dev test installs it",
    ),
    pytest.mark.skipif(
        not (LIB_DEPS / "overcomplete").is_dir() and importlib.util.find_spec("overcomplete") is None,
        reason=f"overcomplete (mi_crow 1.0's SAE training dependency) not installed at {LIB_DEPS} "
        "(MI_CROW_LIB_DEPS_PATH) nor importable; ./dev test installs it",
    ),
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed"),
]


# ---------------------------------------------------------------------------------------------------
# The subprocess: mi_crow 1.0's library with this package as its store (python this_file.py ...).


def _import_overcomplete() -> bool:
    """Import overcomplete; return whether torchvision had to be stood in for while doing so.

    overcomplete imports ``torchvision.transforms`` at import time for its vision backbones only.
    Where torchvision is absent or cannot load (a CUDA build with the CPU torch), an empty module
    stands in for it during that import and is removed afterwards, so nothing else (transformers
    checks ``find_spec("torchvision")``) ever sees it.
    """
    try:
        import torchvision  # noqa: F401

        stand_in = False
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        package, transforms = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
        package.__path__ = []
        package.transforms = transforms  # type: ignore[attr-defined]
        sys.modules.update({"torchvision": package, "torchvision.transforms": transforms})
        stand_in = True
    try:
        import overcomplete  # noqa: F401
    finally:
        if stand_in:
            del sys.modules["torchvision"], sys.modules["torchvision.transforms"]
    return stand_in


class _Collect(logging.Handler):
    """mi_crow's warnings (its trainer logs, rather than raises, a failed save)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


def _worker(store_dir: str, report_path: str) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    report: dict[str, Any] = {"torchvision_stand_in": _import_overcomplete(), "trainings": {}}
    collect = _Collect()
    logging.getLogger("mi_crow").addHandler(collect)

    import mi_crow.mechanistic.sae.sae_trainer as sae_trainer
    import mi_crow.utils
    from mi_crow.hooks.implementations.layer_activation_detector import LayerActivationDetector
    from mi_crow.language_model.context import LanguageModelContext
    from mi_crow.language_model.layers import LanguageModelLayers
    from mi_crow.mechanistic.sae.modules.topk_sae import TopKSae, TopKSaeTrainingConfig

    report["modules"] = {
        "mi_crow.store": mi_crow.store.__file__,
        "mi_crow.utils": mi_crow.utils.__file__,
        "sae_trainer": sae_trainer.__file__,
        "trainer_dataloader": sys.modules[sae_trainer.StoreDataloader.__module__].__file__,
    }

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64, n_positions=16, n_embd=N_EMBD, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config).eval()
    store = LocalStore(store_dir)
    context = LanguageModelContext(language_model=None, model=model, store=store)  # type: ignore[arg-type]
    layers = LanguageModelLayers(context)
    assert layers.name_to_layer[LAYER_NAME] is model.transformer.h[1].mlp
    index = next(i for i, m in layers.idx_to_layer.items() if m is model.transformer.h[0].mlp)
    report["index"] = index
    inputs = [torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def capture(run_id: str, signature: str | int) -> None:
        """What LanguageModel.activations.save_activations does, minus tokenizing."""
        store.put_run_metadata(run_id, {"run_name": run_id, "layer_signatures": [str(signature)]})
        detector = LayerActivationDetector(layer_signature=signature, hook_id=f"detector_save_{run_id}")
        layers.register_hook(signature, detector)
        try:
            with torch.inference_mode():
                for batch_index, input_ids in enumerate(inputs):
                    model(input_ids=input_ids)
                    # LanguageModel.save_detector_metadata: keys are each detector's layer_signature.
                    detectors = layers.get_detectors()
                    store.put_detector_metadata(
                        run_id,
                        batch_index,
                        {d.layer_signature: dict(d.metadata) for d in detectors},
                        {d.layer_signature: dict(d.tensor_metadata) for d in detectors},
                    )
                    detector.clear_captured()
        finally:
            layers.unregister_hook(detector.id)

    def train(case: str, signature: str | int, snapshots: bool) -> None:
        out: dict[str, Any] = {"error": None}
        report["trainings"][case] = out
        seen = len(collect.records)
        try:
            sae = TopKSae(n_latents=N_LATENTS, n_inputs=N_EMBD, device="cpu")
            cfg = TopKSaeTrainingConfig(
                k=TOP_K,
                epochs=EPOCHS,
                batch_size=16,
                lr=1e-3,
                use_amp=False,
                snapshot_every_n_epochs=1 if snapshots else None,
            )
            result = sae.train(store, ACTS[case], signature, cfg, training_run_id=TRAININGS[case])
            out["history"] = result["history"]
            out["training_run_id"] = result["training_run_id"]
            # The trained weights, kept outside the store, to compare with what mi_crow saved.
            torch.save(sae.sae_engine.state_dict(), Path(report_path).parent / f"trained-{case}.pt")
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}"
        out["warnings"] = collect.records[seen:]

    for case, signature in (("by-name", LAYER_NAME), ("by-index", index)):
        try:
            capture(ACTS[case], signature)
        except Exception as e:
            report[f"capture_error_{case}"] = f"{type(e).__name__}: {e}"
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.bias[0] = float("nan")  # a diverged model
    try:
        capture(ACTS["nan"], LAYER_NAME)
    except Exception as e:
        report["capture_error_nan"] = f"{type(e).__name__}: {e}"

    train("by-name", LAYER_NAME, snapshots=True)
    train("by-index", index, snapshots=False)
    train("nan", LAYER_NAME, snapshots=False)
    Path(report_path).write_text(json.dumps(report))


# ---------------------------------------------------------------------------------------------------
# The tests.


def _lib_tree(dest: Path) -> Path:
    """mi_crow 1.0's tree without its store/ and its mi_crow/__init__.py (see the module docstring)."""
    src = MI_CROW_REF / "mi_crow"
    shutil.copytree(
        src,
        dest / "mi_crow",
        ignore=lambda d, names: [
            n for n in names if n == "__pycache__" or (Path(d) == src and n in ("store", "__init__.py"))
        ],
    )
    return dest


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Run the subprocess once; yield its report plus ``base`` (the store's folder) and its output."""
    tmp = tmp_path_factory.mktemp("mi-crow-library")
    lib = _lib_tree(tmp / "lib")
    store_dir, report_path = tmp / "store", tmp / "report.json"
    path = [str(lib), str(OUR_ROOT)] + ([str(LIB_DEPS)] if LIB_DEPS.is_dir() else [])
    env = {
        **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        "PYTHONPATH": os.pathsep.join(path),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": str(tmp / "mpl"),
    }
    proc = subprocess.run(
        [sys.executable, __file__, str(store_dir), str(report_path)],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"
    assert proc.returncode == 0 and report_path.is_file(), output
    report: dict[str, Any] = json.loads(report_path.read_text())
    report["base"], report["output"] = store_dir, output
    yield report


def _run_dir(trained: dict[str, Any], case: str) -> Path:
    run_dir: Path = trained["base"] / "runs" / TRAININGS[case]
    return run_dir


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON (so NaN equals NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_the_subprocess_runs_mi_crow_library_with_our_store(trained: dict[str, Any]) -> None:
    modules = trained["modules"]
    ours = OUR_ROOT / "mi_crow" / "store"
    assert Path(modules["mi_crow.store"]).resolve().parent == ours
    assert Path(modules["trainer_dataloader"]).resolve().parent == ours  # what SaeTrainer iterates
    for name in ("mi_crow.utils", "sae_trainer"):
        assert not Path(modules[name]).resolve().is_relative_to(OUR_ROOT), modules[name]
        assert (MI_CROW_REF / Path(modules[name]).relative_to(trained["base"].parent / "lib")).is_file()


def test_mi_crow_captures_by_name_and_by_index(trained: dict[str, Any]) -> None:
    errors = {k: v for k, v in trained.items() if k.startswith("capture_error")}
    assert not errors, errors
    store = LocalStore(trained["base"])
    index = trained["index"]
    assert isinstance(index, int)
    for case, layer in (("by-name", LAYER_NAME), ("by-index", str(index)), ("nan", LAYER_NAME)):
        assert store.list_run_batches(ACTS[case]) == [0, 1, 2]
        meta, tensors = store.get_detector_metadata(ACTS[case], 1)
        assert list(tensors) == [layer] and list(meta) == [layer]  # an int signature reads back as str
        assert tensors[layer]["activations"].shape == (4, 8, N_EMBD)
    by_int = store.get_detector_metadata_by_layer_by_key(ACTS["by-index"], 2, index, "activations")
    assert by_int.shape == (4, 8, N_EMBD) and bool(torch.isfinite(by_int).all())
    assert bool(
        torch.isnan(store.get_detector_metadata_by_layer_by_key(ACTS["nan"], 0, LAYER_NAME, "activations")).any()
    )


@pytest.mark.parametrize("case", list(TRAININGS))
def test_sae_trainer_saves_the_whole_training_run(trained: dict[str, Any], case: str) -> None:
    out = trained["trainings"][case]
    assert out["error"] is None, f"{out['error']}\n{trained['output']}"
    assert out["training_run_id"] == TRAININGS[case]
    # SaeTrainer logs, rather than raises, a failure to save (a snapshot, model.pt, the metadata).
    assert not out["warnings"], "mi_crow logged warnings while training:\n" + "\n".join(out["warnings"])
    history = out["history"]
    # Every epoch read the stored activations (an epoch with no batch logs no loss at all).
    assert len(history["loss"]) == EPOCHS
    losses_nan = [math.isnan(x) for x in history["loss"]]
    assert losses_nan == [case == "nan"] * EPOCHS, history["loss"]

    run_dir = _run_dir(trained, case)
    payload = torch.load(run_dir / "model.pt", weights_only=True)
    assert sorted(payload) == ["mi_crow_metadata", "sae_state_dict"]
    assert payload["mi_crow_metadata"]["n_latents"] == N_LATENTS
    assert payload["mi_crow_metadata"]["n_inputs"] == N_EMBD
    trained_weights = torch.load(trained["base"].parent / f"trained-{case}.pt", weights_only=True)
    assert sorted(payload["sae_state_dict"]) == sorted(trained_weights)
    for name, tensor in trained_weights.items():  # the weights as trained (NaN ones too)
        torch.testing.assert_close(payload["sae_state_dict"][name], tensor, rtol=0, atol=0, equal_nan=True)
    assert _same(json.loads((run_dir / "history.json").read_text()), history)

    store = LocalStore(trained["base"])
    assert TRAININGS[case] in store.list_runs()
    meta = store.get_run_metadata(TRAININGS[case])
    signature = LAYER_NAME if case != "by-index" else str(trained["index"])
    assert meta["training_run_id"] == TRAININGS[case] and meta["activation_run_id"] == ACTS[case]
    assert meta["layer_signature"] == signature and meta["sae_type"] == "TopKSae"
    assert meta["n_epochs"] == EPOCHS and meta["training_config"]["epochs"] == EPOCHS
    assert _same(meta["final_metrics"]["loss"], history["loss"][-1])
    if case == "nan":
        assert math.isnan(meta["final_metrics"]["loss"]) and math.isnan(meta["final_metrics"]["r2"])


def test_sae_trainer_snapshots_every_epoch(trained: dict[str, Any]) -> None:
    snapshots = _run_dir(trained, "by-name") / "snapshots"
    assert sorted(p.name for p in snapshots.iterdir()) == [f"model_epoch_{e}.pt" for e in range(1, EPOCHS + 1)]
    for epoch in range(1, EPOCHS + 1):
        payload = torch.load(snapshots / f"model_epoch_{epoch}.pt", weights_only=True)
        assert payload["epoch"] == epoch and payload["training_run_id"] == TRAININGS["by-name"]
        assert payload["activation_run_id"] == ACTS["by-name"] and payload["layer_signature"] == LAYER_NAME


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _saved(trained: dict[str, Any], case: str) -> Path:
    """The training run's folder; fails (rather than passes vacuously) if mi_crow saved nothing there."""
    run_dir = _run_dir(trained, case)
    assert (run_dir / "model.pt").is_file() and (run_dir / "meta.json").is_file(), (
        f"mi_crow saved no complete run {TRAININGS[case]!r}: {trained['trainings'][case]}"
    )
    return run_dir


@pytest.mark.parametrize("case", list(TRAININGS))
def test_the_store_is_not_confused_by_mi_crow_files(trained: dict[str, Any], case: str) -> None:
    _saved(trained, case)
    store = LocalStore(trained["base"])
    training = TRAININGS[case]
    assert store._run_key(training) == trained["base"] / "runs" / training
    assert training in store.list_runs()
    assert store.list_run_batches(training) == []  # model.pt, history.json, snapshots/ are no batches
    assert list(store.iter_run_batches(training)) == []
    assert store.check([training]) == []
    assert store.list_run_batches(ACTS[case]) == [0, 1, 2]


def test_check_and_gc_leave_mi_crow_files_alone(trained: dict[str, Any]) -> None:
    _saved(trained, "by-name")
    base = trained["base"]
    store = LocalStore(base)
    assert store.check() == []
    before = _files(base / "runs")
    report = store.gc()
    assert report.removed == [] and report.bytes_freed == 0
    assert _files(base / "runs") == before
    assert store.check() == []


@pytest.mark.parametrize("case", list(TRAININGS))
def test_delete_run_removes_mi_crow_files(trained: dict[str, Any], case: str, tmp_path: Path) -> None:
    _saved(trained, case)
    shutil.copytree(trained["base"], tmp_path / "store", symlinks=True)
    runs = tmp_path / "store" / "runs"
    others = {p.name: _files(p) for p in runs.iterdir() if p.name != TRAININGS[case]}
    store = LocalStore(tmp_path / "store")
    store.delete_run(TRAININGS[case])
    assert not (runs / TRAININGS[case]).exists()
    assert TRAININGS[case] not in store.list_runs()
    assert {p.name: _files(p) for p in runs.iterdir()} == others  # the other runs untouched
    assert store.check() == []


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])

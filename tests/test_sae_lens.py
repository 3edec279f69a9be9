"""SAELens interop: SAELens's SAETrainer fed from a store's run, SAELens SAEs through put_model /
get_model (mi_crow.store.sae_lens), and `mi-crow-store export-model --format sae-lens` writing the
folder SAELens's own loader reads. Tiny sizes (d_in 16, d_sae 64, a few hundred rows); SAELens is
the interop extra (skipped without it)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from mi_crow.store import ActivationCapture, ActivationDataset, LocalStore, MemoryStore
from mi_crow.store.cli import main
from mi_crow.store.sae_lens import (
    INSTALL_HINT,
    METADATA_FIELD,
    export_sae_lens,
    get_sae,
    get_sae_config,
    import_sae_lens,
    put_sae,
)

try:
    sl = import_sae_lens()  # quiet about TransformerLens's deprecation of the module SAELens imports
except ImportError:  # pragma: no cover - the interop extra is not installed
    pytest.skip("SAELens is not installed (the interop extra)", allow_module_level=True)

from sae_lens.config import SAETrainerConfig

D_IN, D_SAE = 16, 64
RUN, LAYER = "r", "h.1"
BATCHES, SEQS, TOKENS = 12, 4, 8  # 12 stored batches of [4, 8, 16]: 384 rows
ROWS = BATCHES * SEQS * TOKENS


def put_run(store: Any, seed: int = 0) -> torch.Tensor:
    """A run of activations that a sparse code explains (each row a few of 32 directions), stored as
    ``[4, 8, 16]`` per batch; returns every row, ``[384, 16]``, in stored order."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(32, D_IN, generator=g)
    code = torch.rand(ROWS, 32, generator=g) * (torch.rand(ROWS, 32, generator=g) < 0.1)
    rows = code @ dirs + 0.01 * torch.randn(ROWS, D_IN, generator=g)
    for i, chunk in enumerate(rows.view(BATCHES, SEQS, TOKENS, D_IN)):
        store.put_detector_metadata(RUN, i, {"tokens": SEQS * TOKENS}, {LAYER: {"activations": chunk.clone()}})
    return rows


def counted(ds: ActivationDataset, seen: dict[int, int]) -> Iterator[torch.Tensor]:
    """``iter(ds)`` (``repeat=True``: never ending), counting the rows of each epoch in ``seen``."""
    for batch in ds:
        seen[ds.epoch] = seen.get(ds.epoch, 0) + batch.shape[0]
        yield batch


def capture_run(store: Any) -> torch.Tensor:
    """A run captured with ActivationCapture (so with per-layer statistics) from a tiny torch model:
    12 batches of [4, 8] token ids, layer "1" ([4, 8, 16]); returns its 384 rows."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, D_IN), torch.nn.Linear(D_IN, D_IN), torch.nn.GELU()).eval()
    with torch.no_grad(), ActivationCapture(model, store, RUN, "1", progress=False):
        for _ in range(BATCHES):
            model(torch.randint(0, 50, (SEQS, TOKENS)))
    return torch.cat([store.get_detector_metadata_by_layer_by_key(RUN, i, "1", "activations") for i in range(BATCHES)])


def mse(sae: Any, rows: torch.Tensor) -> float:
    with torch.no_grad():
        return float((sae.decode(sae.encode(rows)) - rows).pow(2).sum(-1).mean())


def tiny_sae(kind: str = "StandardTrainingSAE", seed: int = 0, **cfg: Any) -> Any:
    torch.manual_seed(seed)
    cfg_class = getattr(sl, kind.removesuffix("SAE") + "SAEConfig")
    sae = getattr(sl, kind)(cfg_class(d_in=D_IN, d_sae=D_SAE, **cfg))
    with torch.no_grad():  # weights off their initial values (b_enc and b_dec start at 0)
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return sae


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- training from the store


def test_sae_trainer_trains_from_a_repeating_activation_dataset() -> None:
    """SAELens's SAETrainer (wandb off, nothing saved) takes ``iter(ActivationDataset(repeat=True))``
    as its data provider for five epochs' worth of samples: each epoch yields all 384 rows, the SAE
    is sized by ``ds.d_in``, the trainer gets the samples it asked for, every parameter moves and the
    reconstruction error falls."""
    store = MemoryStore()
    rows = put_run(store)
    ds = ActivationDataset(store, RUN, LAYER, batch_size=32, shuffle=True, seed=0, repeat=True)
    assert (len(ds), ds.d_in) == (BATCHES, D_IN)
    sae = sl.StandardTrainingSAE(sl.StandardTrainingSAEConfig(d_in=ds.d_in, d_sae=D_SAE, l1_coefficient=0.1))
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    error_before = mse(sae, rows)
    cfg = SAETrainerConfig(total_training_samples=32 * 60, train_batch_size_samples=32, lr=3e-3, lr_end=3e-4)
    assert cfg.logger.log_to_wandb is False and cfg.checkpoint_path is None and not cfg.save_final_checkpoint
    seen: dict[int, int] = {}
    trainer = sl.SAETrainer(cfg=cfg, sae=sae, data_provider=counted(ds, seen))
    trained = trainer.fit()
    assert trained is sae and trainer.n_training_steps == 60 and trainer.n_training_samples == 32 * 60
    assert seen == {epoch: ROWS for epoch in range(5)} and ds.epoch == 4  # 60 batches, 12 an epoch
    assert all(not torch.equal(before[k], v) for k, v in sae.state_dict().items())
    assert mse(sae, rows) < 0.5 * error_before


def test_normalize_norm_is_sae_lens_scaling_and_folds_into_the_trained_sae() -> None:
    """``normalize="norm"``'s ``scaling_factor`` is the factor SAELens's ActivationScaler estimates
    over one epoch of the raw rows (sqrt(d_in) / mean row norm); an SAE trained on the scaled rows,
    with the factor folded in (as SAELens's trainer folds its own), reconstructs raw rows as the
    unfolded one reconstructs scaled rows."""
    store = MemoryStore()
    rows = capture_run(store)
    raw = ActivationDataset(store, RUN, "1", batch_size=32)
    scaler = sl.training.activation_scaler.ActivationScaler()
    scaler.estimate_scaling_factor(D_IN, iter(raw), n_batches_for_norm_estimate=len(raw))
    ds = ActivationDataset(store, RUN, "1", batch_size=32, shuffle=True, repeat=True, normalize="norm")
    assert ds.scaling_factor == pytest.approx(scaler.scaling_factor, rel=1e-6)
    assert ds.scaling_factor == pytest.approx(D_IN**0.5 / float(rows.double().norm(dim=-1).mean()), rel=1e-6)
    epoch = torch.cat([next(iter(ActivationDataset(store, RUN, "1", batch_size=ROWS, normalize="norm")))])
    assert float(epoch.double().norm(dim=-1).mean()) == pytest.approx(D_IN**0.5, rel=1e-5)

    sae = sl.StandardTrainingSAE(sl.StandardTrainingSAEConfig(d_in=ds.d_in, d_sae=D_SAE))
    cfg = SAETrainerConfig(total_training_samples=32 * 30, train_batch_size_samples=32, lr=3e-3, lr_end=3e-4)
    sl.SAETrainer(cfg=cfg, sae=sae, data_provider=iter(ds)).fit()
    x = rows[:50]
    with torch.no_grad():
        on_scaled = sae.decode(sae.encode(x * ds.scaling_factor)) / ds.scaling_factor
        sae.fold_activation_norm_scaling_factor(ds.scaling_factor)
        assert torch.allclose(sae.decode(sae.encode(x)), on_scaled, atol=1e-5)


def test_sae_lens_own_norm_estimate_reads_a_repeating_dataset_past_one_epoch() -> None:
    """With ``normalize_activations="expected_average_only_in"`` the trainer estimates the factor
    from the provider first (here 26 batches: more than two epochs) and folds it at the end."""
    store = MemoryStore()
    put_run(store)
    ds = ActivationDataset(store, RUN, LAYER, batch_size=32, shuffle=True, repeat=True)
    cfg = sl.StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, normalize_activations="expected_average_only_in")
    sae = sl.StandardTrainingSAE(cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=32 * 4, train_batch_size_samples=32, lr_end=3e-5, n_batches_for_norm_estimate=26
    )
    seen: dict[int, int] = {}
    sl.SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=counted(ds, seen)).fit()
    assert sae.cfg.normalize_activations == "none"
    assert seen == {0: ROWS, 1: ROWS, 2: 6 * 32}  # 26 batches for the estimate and 4 to train: 12 + 12 + 6


# ---------------------------------------------------------------------------- put_sae / get_sae

ARCHITECTURES = [
    ("StandardSAE", {}),
    ("TopKSAE", {"k": 4}),
    ("JumpReLUSAE", {}),
    ("GatedSAE", {}),
    ("StandardTrainingSAE", {"l1_coefficient": 2.0}),
    ("TopKTrainingSAE", {"k": 4}),
    ("JumpReLUTrainingSAE", {}),
    ("BatchTopKTrainingSAE", {"k": 4}),  # a float64 buffer (topk_threshold) beside float32 weights
]


@pytest.mark.parametrize(("kind", "cfg"), ARCHITECTURES, ids=[k for k, _ in ARCHITECTURES])
def test_an_sae_round_trips_through_the_store(tmp_path: Path, kind: str, cfg: dict[str, Any]) -> None:
    """Weights bit-equal with their dtypes, the config as cfg.to_dict() wrote it, the same class
    (a training SAE stays one), the same encode and decode; the model's files are JSON and
    safetensors only."""
    store = LocalStore(tmp_path)
    sae = tiny_sae(kind, **cfg)
    assert put_sae(store, "sae", sae, metadata={"run": RUN, "layer": LAYER}) == "models/sae"
    back = get_sae(store, "sae")
    assert type(back) is type(sae)
    assert same_state(sae.state_dict(), back.state_dict())
    assert get_sae_config(store, "sae") == json.loads(json.dumps(sae.cfg.to_dict()))
    assert back.cfg.to_dict() == sae.cfg.to_dict()
    x = torch.randn(10, D_IN, generator=torch.Generator().manual_seed(3))
    sae.eval()
    back.eval()
    with torch.no_grad():
        acts = sae.encode(x)
        assert torch.equal(back.encode(x), acts) and torch.equal(back.decode(acts), sae.decode(acts))
    _, meta = store.get_model("sae")
    assert meta["run"] == RUN and meta["layer"] == LAYER
    info = meta[METADATA_FIELD]
    assert info["class"] == ("training_sae" if "Training" in kind else "sae")
    assert info["architecture"] == sae.cfg.architecture() and info["sae_lens_version"] == sl.__version__
    files = sorted(p.name for p in (tmp_path / "models" / "sae").rglob("*") if p.is_file())
    assert files == ["metadata.json", "model.safetensors"]


def test_a_bfloat16_sae_keeps_its_dtype_and_get_sae_converts_on_request() -> None:
    store = MemoryStore()
    sae = tiny_sae("StandardSAE").to(torch.bfloat16)
    put_sae(store, "sae", sae)
    back = get_sae(store, "sae")
    assert back.cfg.dtype == "bfloat16" and same_state(sae.state_dict(), back.state_dict())
    half = get_sae(store, "sae", dtype="float32")
    assert half.cfg.dtype == "float32" and half.W_enc.dtype == torch.float32
    assert torch.equal(half.W_enc, sae.W_enc.float())


def test_a_trained_sae_goes_on_training_after_get_sae() -> None:
    """The training SAE rebuilt from the store is one SAETrainer takes (its tensors are its own,
    writable: training changes them, the stored model stays as it was)."""
    store = MemoryStore()
    put_run(store)
    put_sae(store, "sae", tiny_sae("StandardTrainingSAE"))
    sae = get_sae(store, "sae")
    stored = {k: v.clone() for k, v in sae.state_dict().items()}
    ds = ActivationDataset(store, RUN, LAYER, batch_size=32, shuffle=True, repeat=True)
    cfg = SAETrainerConfig(total_training_samples=32 * 3, train_batch_size_samples=32, lr_end=3e-5)
    sl.SAETrainer(cfg=cfg, sae=sae, data_provider=iter(ds)).fit()
    assert not torch.equal(sae.W_enc, stored["W_enc"])
    assert same_state(get_sae(store, "sae").state_dict(), stored)


def test_put_sae_stores_the_feature_sparsity_and_refuses_a_wrong_shape() -> None:
    store = MemoryStore()
    sparsity = torch.linspace(-5, 0, D_SAE)
    put_sae(store, "sae", tiny_sae("StandardSAE"), log_feature_sparsity=sparsity)
    tensors, meta = store.get_model("sae")
    assert torch.equal(tensors["sparsity"], sparsity) and meta[METADATA_FIELD]["sparsity"] == "sparsity"
    assert "sparsity" not in get_sae(store, "sae").state_dict()
    with pytest.raises(ValueError, match=r"log_feature_sparsity must be a \[64\] tensor \(d_sae\), got shape \[63\]"):
        put_sae(store, "other", tiny_sae("StandardSAE"), log_feature_sparsity=torch.zeros(63))
    assert store.list_models() == ["sae"]


def test_put_sae_refuses_what_get_sae_could_not_rebuild_before_writing() -> None:
    store = MemoryStore()

    class MySAE(sl.StandardSAE):  # type: ignore[misc]
        pass

    with pytest.raises(TypeError, match=r"sae must be a sae_lens\.SAE, got Linear"):
        put_sae(store, "x", torch.nn.Linear(2, 2))
    with pytest.raises(
        ValueError, match=r"sae is a MySAE, but SAELens registers StandardSAE for architecture 'standard'"
    ):
        put_sae(store, "x", MySAE(sl.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)))
    with pytest.raises(ValueError, match=r"metadata must not contain the field 'sae_lens': put_sae writes it itself"):
        put_sae(store, "x", tiny_sae("StandardSAE"), metadata={"sae_lens": 1})
    assert store.list_models() == []


def test_get_sae_of_a_model_stored_otherwise_says_what_it_is() -> None:
    store = MemoryStore()
    store.put_model("plain", {"W_enc": torch.zeros(D_IN, D_SAE)}, {"d_sae": D_SAE})
    message = r"model 'plain' has no SAELens config \(no 'sae_lens' metadata field; its fields: d_sae\).*put_sae"
    with pytest.raises(ValueError, match=message):
        get_sae(store, "plain")
    with pytest.raises(ValueError, match=message):
        get_sae_config(store, "plain")
    with pytest.raises(FileNotFoundError, match="no model 'missing'"):
        get_sae(store, "missing")


def test_a_missing_sae_lens_is_an_import_error_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryStore()
    put_sae(store, "sae", tiny_sae("StandardSAE"))
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # as if not installed
    for call in (lambda: get_sae(store, "sae"), lambda: put_sae(store, "x", object())):  # type: ignore[arg-type]
        with pytest.raises(ImportError, match=r"needs SAELens .*pip install 'mi-crow-store\[interop\]'"):
            call()
    assert get_sae_config(store, "sae")["d_sae"] == D_SAE  # the config needs no SAELens


def test_importing_the_package_and_its_cli_loads_no_sae_lens() -> None:
    """SAELens (and TransformerLens, wandb) load only when an SAE is stored, read or exported; the
    command line has export-model without them."""
    code = (
        "import sys, mi_crow.store, mi_crow.store.sae_lens\n"
        "from click.testing import CliRunner\n"
        "from mi_crow.store.cli import main\n"
        "help = CliRunner().invoke(main, ['export-model', '--help']).output\n"
        "heavy = [m for m in ('sae_lens', 'transformer_lens', 'wandb') if m in sys.modules]\n"
        "print('--format [sae-lens]' in help, heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True []"


# ---------------------------------------------------------------------------- export to SAELens's format


@pytest.mark.parametrize("kind", ["StandardSAE", "JumpReLUSAE", "TopKTrainingSAE", "BatchTopKTrainingSAE"])
def test_export_writes_what_sae_lens_own_save_writes(tmp_path: Path, kind: str) -> None:
    """cfg.json and sae_weights.safetensors as SAELens writes them (save_model; for a training SAE
    save_inference_model, as its training runner does), byte for byte and as JSON, which
    SAE.load_from_disk reads back to the same weights."""
    store = LocalStore(tmp_path / "store")
    sae = tiny_sae(kind, **({"k": 4} if "TopK" in kind else {}))
    put_sae(store, "sae", sae)
    out = export_sae_lens(store, "sae", tmp_path / "out")
    assert out == tmp_path / "out" and sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    ref = tmp_path / "ref"
    (sae.save_inference_model if "Training" in kind else sae.save_model)(ref)
    assert (out / "sae_weights.safetensors").read_bytes() == (ref / "sae_weights.safetensors").read_bytes()
    assert json.loads((out / "cfg.json").read_text()) == json.loads((ref / "cfg.json").read_text())
    loaded = sl.SAE.load_from_disk(out)
    assert same_state(loaded.state_dict(), sl.SAE.load_from_disk(ref).state_dict())
    assert not isinstance(loaded, sl.TrainingSAE)
    if "Training" not in kind:
        assert type(loaded) is type(sae) and same_state(loaded.state_dict(), sae.state_dict())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_export_writes_the_sparsity_file_sae_lens_reads(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    store = MemoryStore()
    sparsity = torch.linspace(-4, 0, D_SAE)
    put_sae(store, "sae", tiny_sae("StandardSAE"), log_feature_sparsity=sparsity)
    out = export_sae_lens(store, "sae", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    assert torch.equal(load_file(out / "sparsity.safetensors")["sparsity"], sparsity)


def test_export_refuses_a_non_empty_folder_unless_overwrite(tmp_path: Path) -> None:
    store = MemoryStore()
    put_sae(store, "sae", tiny_sae("StandardSAE"))
    (tmp_path / "empty").mkdir()
    export_sae_lens(store, "sae", tmp_path / "empty")  # an empty folder is taken
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.txt").write_text("keep")
    with pytest.raises(
        FileExistsError, match=r"cannot export to .*full: the folder is not empty \(pass overwrite=True"
    ):
        export_sae_lens(store, "sae", full)
    assert [p.name for p in full.iterdir()] == ["old.txt"]
    export_sae_lens(store, "sae", full, overwrite=True)  # replaced as a whole
    assert sorted(p.name for p in full.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="it exists and is not a folder"):
        export_sae_lens(store, "sae", tmp_path / "file")
    with pytest.raises(FileNotFoundError, match=r"its parent folder .* does not exist"):
        export_sae_lens(store, "sae", tmp_path / "no" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "full"]


def test_a_killed_export_leaves_no_half_written_folder(tmp_path: Path) -> None:
    """The process is killed (SIGKILL) after the weights are written, as it writes the config: the
    target folder does not exist, only the hidden folder the export was writing in."""
    store = LocalStore(tmp_path / "store")
    put_sae(store, "sae", tiny_sae("StandardSAE"))
    code = f"""
import json, os, signal
from mi_crow.store import LocalStore
from mi_crow.store.sae_lens import export_sae_lens
json.dump = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # dies writing cfg.json
export_sae_lens(LocalStore({str(tmp_path / "store")!r}), "sae", {str(tmp_path / "out")!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (tmp_path / "out").exists()
    (temp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.export-")]
    assert sorted(p.name for p in temp.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert (temp / "cfg.json").stat().st_size == 0  # killed while writing it


# ---------------------------------------------------------------------------- mi-crow-store export-model


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    store = LocalStore(tmp_path / "store")
    put_sae(store, "sae-h1", tiny_sae("StandardTrainingSAE"))
    store.put_model("plain", {"w": torch.zeros(2)}, {"note": "not an SAE"})
    return tmp_path / "store"


def export(*args: str) -> Any:
    return CliRunner().invoke(main, ["export-model", *args])


def test_cli_export_model_writes_sae_lens_format(store_dir: Path, tmp_path: Path) -> None:
    result = export(str(store_dir), "sae-h1", str(tmp_path / "out"), "--format", "sae-lens")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(
        f"exported model 'sae-h1' (standard SAE, d_in 16, d_sae 64) to {tmp_path / 'out'}: "
        "cfg.json, sae_weights.safetensors ("
    )
    sae = get_sae(LocalStore(store_dir), "sae-h1")
    loaded = sl.SAE.load_from_disk(tmp_path / "out")
    assert type(loaded) is sl.StandardSAE and same_state(loaded.state_dict(), sae.state_dict())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plain", "OUT"], "model 'plain' has no SAELens config (no 'sae_lens' metadata field; its fields: note)"),
        (["nope", "OUT"], "no model 'nope' in STORE; its models are: plain, sae-h1"),
        (["sae-h1", "FULL"], "cannot export to FULL: the folder is not empty (pass --overwrite to replace it)"),
        (["../x", "OUT"], "MODEL"),
    ],
)
def test_cli_export_model_errors_are_one_line_exit_2(
    store_dir: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    paths = {"OUT": str(tmp_path / "out"), "FULL": str(tmp_path / "full"), "STORE": str(store_dir)}
    argv = [str(store_dir), *(paths.get(a, a) for a in args), "--format", "sae-lens"]
    result = export(*argv)
    assert result.exit_code == 2, result.output
    for name, path in paths.items():
        message = message.replace(name, path)
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists() and [p.name for p in (tmp_path / "full").iterdir()] == ["x"]


def test_cli_export_model_overwrite_and_format_choice(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("x")
    assert export(str(store_dir), "sae-h1", str(out), "--format", "sae-lens", "--overwrite").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    result = export(str(store_dir), "sae-h1", str(tmp_path / "o2"), "--format", "onnx")
    assert result.exit_code == 2 and "'onnx' is not 'sae-lens'" in result.output
    result = export(str(store_dir), "sae-h1", str(tmp_path / "o2"))
    assert result.exit_code == 2 and "Missing option '--format'" in result.output


def test_cli_export_model_without_sae_lens_names_the_extra(
    store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "sae_lens", None)
    result = export(str(store_dir), "sae-h1", str(tmp_path / "out"), "--format", "sae-lens")
    assert result.exit_code == 2 and INSTALL_HINT in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()

"""Capture from the field's tools, against each library's own way of reading activations:
TransformerLens's ``run_with_cache`` and nnsight's ``.output.save()``; tuple outputs of
Hugging Face modules. Models are built from configs with random weights (no downloads)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from hf_models import gpt2_tokenizer, save_tiny_gpt2, tiny_gpt2
from mi_crow.store import ActivationCapture, MemoryStore
from mi_crow.store._interop import calls_forward_directly, hook_aliases, unwrap_model, wrap_forward

TL_NAMES = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"]
TEXTS = ["the cat sat", "a dog sat on the mat", "text number 7"]


def stored(store: MemoryStore, run: str, batch: int, layer: str) -> torch.Tensor:
    return store.get_detector_metadata_by_layer_by_key(run, batch, layer, "activations")


# ---------------------------------------------------------------------------- unwrap_model


def test_unwrap_model_returns_a_module_itself() -> None:
    net = nn.Sequential(nn.Linear(2, 3))
    assert unwrap_model(net) is net


def test_unwrap_model_refuses_what_is_not_a_model() -> None:
    with pytest.raises(TypeError, match=r"cannot capture from a builtins\.dict: expected a torch\.nn\.Module"):
        unwrap_model({"weights": 1})


# ---------------------------------------------------------------------------- TransformerLens


@pytest.fixture(scope="module")
def hooked() -> Any:
    tl = pytest.importorskip("transformer_lens", reason="TransformerLens is not installed (the interop extra)")
    import warnings

    cfg = tl.HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=32, d_vocab=30, act_fn="gelu", seed=0
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        return tl.HookedTransformer(cfg).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 30, (3, 7), generator=torch.Generator().manual_seed(1))


def test_transformer_lens_capture_is_run_with_cache(hooked: Any, tokens: torch.Tensor) -> None:
    """Hook points are modules: a capture around ``model(tokens)`` stores exactly what
    ``run_with_cache`` caches under those names, and leaves the model's output unchanged."""
    assert unwrap_model(hooked) is hooked
    logits, cache = hooked.run_with_cache(tokens, names_filter=TL_NAMES)
    store = MemoryStore()
    with ActivationCapture(hooked, store, "tl", TL_NAMES):
        out = hooked(tokens)
        cap_logits, cap_cache = hooked.run_with_cache(tokens, names_filter=TL_NAMES)  # also a forward call
    assert torch.equal(out, logits) and torch.equal(cap_logits, logits)
    assert store.list_run_batches("tl") == [0, 1]
    for batch in (0, 1):
        for name in TL_NAMES:
            got = stored(store, "tl", batch, name)
            assert got.dtype == torch.float32
            assert torch.equal(got, cache[name]), (batch, name)
            assert torch.equal(cap_cache[name], cache[name])
    assert stored(store, "tl", 0, "blocks.1.hook_resid_post").shape == (3, 7, 32)
    assert stored(store, "tl", 0, "blocks.0.attn.hook_z").shape == (3, 7, 4, 8)  # [batch, pos, head, d_head]
    meta = store.get_run_metadata("tl")
    assert meta["layers"] == TL_NAMES
    assert meta["model"]["class"] == "transformer_lens.HookedTransformer.HookedTransformer"


def test_transformer_lens_capture_converts_the_dtype(hooked: Any, tokens: torch.Tensor) -> None:
    _, cache = hooked.run_with_cache(tokens, names_filter=TL_NAMES)
    store = MemoryStore()
    with ActivationCapture(hooked, store, "tl16", TL_NAMES, dtype=torch.bfloat16) as cap:
        cap.run(input=tokens)  # HookedTransformer.forward(input, ...)
    for name in TL_NAMES:
        got = stored(store, "tl16", 0, name)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, cache[name].to(torch.bfloat16))


def test_transformer_lens_hooks_still_run_under_a_capture(hooked: Any, tokens: torch.Tensor) -> None:
    """``run_with_hooks`` and ``with model.hooks(...)`` interventions work as without a capture,
    and the capture stores the activations as the intervention left them."""

    def ablate(value: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.zeros_like(value)

    hooks = [("blocks.0.hook_mlp_out", ablate)]
    expected = hooked.run_with_hooks(tokens, fwd_hooks=hooks)
    _, clean = hooked.run_with_cache(tokens, names_filter=TL_NAMES)
    store = MemoryStore()
    with ActivationCapture(hooked, store, "tlh", TL_NAMES), hooked.hooks(fwd_hooks=hooks):
        out = hooked(tokens)
    assert torch.equal(out, expected)
    assert not torch.equal(out, hooked(tokens))  # the hook changed something
    assert store.list_run_batches("tlh") == [0]
    resid = stored(store, "tlh", 0, "blocks.1.hook_resid_post")
    assert not torch.equal(resid, clean["blocks.1.hook_resid_post"])
    with hooked.hooks(fwd_hooks=hooks):
        _, ablated = hooked.run_with_cache(tokens, names_filter=TL_NAMES)
    assert torch.equal(resid, ablated["blocks.1.hook_resid_post"])
    assert len(hooked.blocks[0].hook_mlp_out.fwd_hooks) == 0  # TransformerLens removed its hook


def test_transformer_lens_run_with_hooks_is_a_batch(hooked: Any, tokens: torch.Tensor) -> None:
    """``run_with_hooks`` calls ``model.forward(...)`` directly; the capture still stores it as
    one batch, with the intervention's effect, and ``model(...)`` still counts once."""

    def ablate(value: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.zeros_like(value)

    hooks = [("blocks.0.hook_mlp_out", ablate)]
    with hooked.hooks(fwd_hooks=hooks):
        _, ablated = hooked.run_with_cache(tokens, names_filter=TL_NAMES)
    _, clean = hooked.run_with_cache(tokens, names_filter=TL_NAMES)
    store = MemoryStore()
    with ActivationCapture(hooked, store, "tlw", TL_NAMES):
        hooked.run_with_hooks(tokens, fwd_hooks=hooks)
        hooked(tokens)
    assert "forward" not in hooked.__dict__  # the capture's wrapper is gone
    assert store.list_run_batches("tlw") == [0, 1]
    for name in TL_NAMES:
        assert torch.equal(stored(store, "tlw", 0, name), ablated[name])
        assert torch.equal(stored(store, "tlw", 1, name), clean[name])


def test_transformer_lens_runs_forward_directly(hooked: Any, tokens: torch.Tensor) -> None:
    """``run_with_hooks`` calls ``model.forward(...)``: hooks on the model itself miss it, which is
    what ``calls_forward_directly`` reports and ``wrap_forward`` catches (once per call either way)."""
    assert calls_forward_directly(hooked)
    assert not calls_forward_directly(nn.Linear(2, 2))
    assert not calls_forward_directly(hooked.blocks[0])  # a block is called the ordinary way
    calls: list[str] = []
    handle = hooked.register_forward_hook(lambda *a: calls.append("hook"))
    try:
        hooked.run_with_hooks(tokens, fwd_hooks=[])
        assert calls == []  # the model's own hooks do not see run_with_hooks
    finally:
        handle.remove()
    shapes: list[tuple[int, ...]] = []
    undo = wrap_forward(
        hooked,
        lambda module, args, kwargs: calls.append("before"),
        lambda module, args, kwargs, output: shapes.append(tuple(output.shape)),
    )
    try:
        with pytest.raises(RuntimeError, match="already wrapped by a capture"):
            wrap_forward(hooked, print, print)
        hooked.run_with_hooks(tokens, fwd_hooks=[])
        hooked(tokens)
        hooked.forward(tokens)
    finally:
        undo()
    assert calls == ["before"] * 3 and shapes == [(3, 7, 30)] * 3
    assert "forward" not in hooked.__dict__  # undone: the class's forward again
    hooked(tokens)
    assert len(calls) == 3
    undo()  # a second undo changes nothing


def test_wrap_forward_passes_the_call_and_restores_an_instance_forward() -> None:
    net = nn.Linear(2, 2)
    own = net.forward
    net.forward = own  # an instance attribute of its own (as a library's patch would be)
    seen: list[Any] = []
    undo = wrap_forward(net, lambda m, a, k: seen.append((a[0].shape, k)), lambda m, a, k, o: seen.append(o.shape))
    net(torch.ones(4, 2))
    undo()
    assert seen == [(torch.Size([4, 2]), {}), torch.Size([4, 2])]
    assert net.__dict__["forward"] is own


# ---------------------------------------------------------------------------- nnsight


@pytest.fixture(scope="module")
def nnsight() -> Any:
    return pytest.importorskip("nnsight", reason="nnsight is not installed (the interop extra)")


def language_models(nnsight: Any) -> list[Any]:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "LanguageModel is deprecated", FutureWarning)
        legacy = nnsight.LanguageModel(tiny_gpt2(), tokenizer=gpt2_tokenizer())
    return [nnsight.TransformersModel(tiny_gpt2(), tokenizer=gpt2_tokenizer()), legacy]


def test_unwrap_model_of_nnsight_envoys(nnsight: Any) -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert unwrap_model(nnsight.NNsight(net)) is net
    for lm in language_models(nnsight):
        module = unwrap_model(lm)
        assert type(module).__name__ == "GPT2LMHeadModel"
        assert "transformer.h.1" in dict(module.named_modules())


@pytest.mark.parametrize("kind", ["TransformersModel", "LanguageModel"])
def test_nnsight_trace_capture_is_output_save(nnsight: Any, kind: str) -> None:
    """Around ``with lm.trace(...)`` a capture stores, for each module, what nnsight's own
    ``.output.save()`` gives: one batch per trace, its invokes batched into one forward."""
    lm = language_models(nnsight)[["TransformersModel", "LanguageModel"].index(kind)]
    layers = ["transformer.h.0", "transformer.h.1"]
    store = MemoryStore()
    with ActivationCapture(unwrap_model(lm), store, "nn", layers):
        with lm.trace(TEXTS):  # nnsight hands back the names saved in the block
            h0 = lm.transformer.h[0].output.save()
            h1 = lm.transformer.h[1].output.save()
        with lm.trace() as tracer:
            with tracer.invoke(TEXTS[0]):
                first = lm.transformer.h[1].output.save()
            with tracer.invoke(TEXTS[1]):
                second = lm.transformer.h[1].output.save()
    assert store.list_run_batches("nn") == [0, 1]
    for layer, value in zip(layers, [h0, h1], strict=True):
        assert isinstance(value, torch.Tensor)
        assert value.shape == (3, 6, 32)  # left-padded to the longest text (6 words)
        assert torch.equal(stored(store, "nn", 0, layer), value)
    assert first.shape == second.shape == (1, 6, 32)
    assert torch.equal(stored(store, "nn", 1, "transformer.h.1"), torch.cat([first, second]))


@pytest.mark.parametrize("kind", ["TransformersModel", "LanguageModel"])
def test_nnsight_model_itself_is_captured_with_its_mask(nnsight: Any, kind: str) -> None:
    """``ActivationCapture(lm, ...)`` takes the nnsight model as it is; the left-padded batch's
    attention mask and ids, passed by nnsight as forward keywords, are stored once per batch and
    only real tokens are counted."""
    lm = language_models(nnsight)[["TransformersModel", "LanguageModel"].index(kind)]
    store = MemoryStore()
    with ActivationCapture(lm, store, "nnm", ["transformer.h.0", "transformer.h.1"]), lm.trace(TEXTS[:2]):
        h1 = lm.transformer.h[1].output.save()
    assert torch.equal(stored(store, "nnm", 0, "transformer.h.1"), h1)
    meta, tensors = store.get_detector_metadata("nnm", 0)
    assert meta["tokens"] == 3 + 6
    enc = gpt2_tokenizer()
    enc.pad_token, enc.padding_side = enc.eos_token, "left"  # what nnsight sets up
    expected = enc(TEXTS[:2], padding=True, return_tensors="pt")
    inputs = tensors["attention_masks"]
    assert torch.equal(inputs["attention_mask"], expected["attention_mask"])
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    assert inputs["attention_mask"][0].tolist() == [0, 0, 0, 1, 1, 1]
    assert store.get_run_metadata("nnm")["model"]["class"] == "transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel"


def test_nnsight_capture_sees_interventions(nnsight: Any) -> None:
    """The capture stores what the module returned after an edit made inside the trace."""
    lm = language_models(nnsight)[0]
    store = MemoryStore()
    with ActivationCapture(unwrap_model(lm), store, "edit", ["transformer.h.0"]), lm.trace(TEXTS[:2]):
        lm.transformer.h[0].output[:] = 0
        edited = lm.transformer.h[0].output.save()
    got = stored(store, "edit", 0, "transformer.h.0")
    assert torch.equal(got, edited) and torch.count_nonzero(got) == 0


# ---------------------------------------------------------------------------- tuple outputs


def eager_gpt2() -> Any:
    model = tiny_gpt2(head=False)
    model.set_attn_implementation("eager")  # attention weights are computed, not None
    return model


def test_a_tuple_output_gives_its_first_element_by_default() -> None:
    """GPT-2's attention returns ``(attn_output, attn_weights)``; the capture stores the first."""
    model = eager_gpt2()
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    seen: list[Any] = []
    handle = model.h[0].attn.register_forward_hook(lambda m, a, out: seen.append(out))
    store = MemoryStore()
    try:
        with ActivationCapture(model, store, "t", ["h.0.attn", "h.0"]) as cap:
            cap.run(input_ids=ids)
    finally:
        handle.remove()
    [(attn_output, attn_weights)] = seen
    assert attn_weights.shape == (2, 2, 5, 5)
    assert torch.equal(stored(store, "t", 0, "h.0.attn"), attn_output)
    assert stored(store, "t", 0, "h.0").shape == (2, 5, 32)  # a block returns the hidden states itself


# ---------------------------------------------------------------------------- TransformerBridge


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """TransformerLens 3's ``TransformerBridge`` over a tiny GPT-2 saved to a folder (its boot
    reads the config and tokenizer from there; nothing is downloaded)."""
    pytest.importorskip("transformer_lens", reason="TransformerLens is not installed (the interop extra)")
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    where = tmp_path_factory.mktemp("gpt2")
    save_tiny_gpt2(where)
    return TransformerBridge.boot_transformers(
        str(where),
        hf_model=transformers.AutoModelForCausalLM.from_pretrained(where),
        tokenizer=transformers.AutoTokenizer.from_pretrained(where),
    )


def test_transformer_bridge_capture_is_run_with_cache(bridge: Any) -> None:
    """A bridge's hook points are modules under its own names (``blocks.1.hook_out``); the
    HookedTransformer names (``blocks.1.hook_resid_post``) are aliases in its ``hook_dict``,
    which ``hook_aliases`` maps to those modules."""
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(2))
    aliases = hook_aliases(bridge)
    modules = dict(bridge.named_modules())
    assert aliases["blocks.1.hook_resid_post"] is modules["blocks.1.hook_out"]
    assert "blocks.1.hook_resid_post" not in modules
    assert calls_forward_directly(bridge)
    assert hook_aliases(tiny_gpt2()) == {}
    _, cache = bridge.run_with_cache(ids, names_filter=["blocks.1.hook_resid_post", "blocks.0.hook_out"])
    store = MemoryStore()
    with ActivationCapture(bridge, store, "br", ["blocks.1.hook_out", "blocks.0.hook_out"]):
        bridge(ids)
    assert store.list_run_batches("br") == [0]
    assert torch.equal(stored(store, "br", 0, "blocks.1.hook_out"), cache["blocks.1.hook_resid_post"])
    assert torch.equal(stored(store, "br", 0, "blocks.0.hook_out"), cache["blocks.0.hook_out"])
    assert stored(store, "br", 0, "blocks.1.hook_out").shape == (2, 5, 32)


def test_transformer_bridge_capture_takes_hooked_transformer_names(bridge: Any) -> None:
    """Under its HookedTransformer alias a bridge hook point is captured (and stored under the
    name given); ``run_with_cache``, which calls the bridge's forward directly, is a batch too."""
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(3))
    names = ["blocks.1.hook_resid_post", "blocks.0.hook_out"]
    _, cache = bridge.run_with_cache(ids, names_filter=names)
    store = MemoryStore()
    with ActivationCapture(bridge, store, "bra", names):
        bridge(ids)
        bridge.run_with_cache(ids, names_filter=names)
    assert store.list_run_batches("bra") == [0, 1]
    for batch in (0, 1):
        for name in names:
            assert torch.equal(stored(store, "bra", batch, name), cache[name]), (batch, name)


def test_element_picks_another_tuple_element() -> None:
    """``element=1`` on GPT-2's attention stores its attention weights; ``element={layer: ...}``
    chooses per layer."""
    model = eager_gpt2()
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    seen: list[Any] = []
    handle = model.h[0].attn.register_forward_hook(lambda m, a, out: seen.append(out))
    store = MemoryStore()
    try:
        with ActivationCapture(model, store, "w", ["h.0.attn"], element=1) as cap:
            cap.run(input_ids=ids)
        with ActivationCapture(model, store, "w2", ["h.0.attn", "h.0"], element={"h.0.attn": -1}) as cap:
            cap.run(input_ids=ids)
    finally:
        handle.remove()
    weights = seen[0][1]
    assert weights.shape == (2, 2, 5, 5)
    assert torch.equal(stored(store, "w", 0, "h.0.attn"), weights)
    assert torch.equal(stored(store, "w2", 0, "h.0.attn"), seen[1][1])
    assert stored(store, "w2", 0, "h.0").shape == (2, 5, 32)


def test_element_that_is_not_there_is_a_clear_error() -> None:
    """An element past the tuple's end, or one that is not a tensor (sdpa attention's weights are
    None), is refused with what the output holds, and nothing is stored for the batch."""
    model = tiny_gpt2(head=False)  # sdpa: the attention returns (attn_output, None)
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    for element, message in [
        (2, r"element 2 of the output of layer 'h.0.attn' is out of range: the output is a tuple of length 2"),
        (1, r"element 1 of the output of layer 'h.0.attn' is a NoneType, not a tensor"),
    ]:
        store = MemoryStore()
        with (
            pytest.raises(ValueError, match=message),
            ActivationCapture(model, store, "bad", ["h.0.attn"], element=element) as cap,
        ):
            cap.run(input_ids=ids)
        assert store.list_run_batches("bad") == []
    with pytest.raises(ValueError, match=r"element must be an int .* got float 1\.5"):
        ActivationCapture(model, MemoryStore(), "bad", ["h.0.attn"], element=1.5)  # type: ignore[arg-type]

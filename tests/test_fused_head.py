"""``fuse_lm_head=True``: causal LMs of transformers compute their training loss from the hidden states and the
lm_head's weight (``causal_lm_linear_loss``), never holding the logits, with no per-model code, and exactly the stock
loss and gradients. Tiny random fp32 models on the CPU."""
from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastce.linear_loss  # noqa: E402
from fastce.integrations.lm_head import LazyLogits  # noqa: E402
from fastce.integrations.transformers import (  # noqa: E402
    patch_model,
    patch_transformers,
    trainer_loss,
    unpatch_model,
    unpatch_transformers,
)

VOCAB = 101
PAD = 0


def _config(cls, **extra):
    return cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, pad_token_id=PAD, **extra)


MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(_config(transformers.LlamaConfig)),
    "qwen2-tied": lambda: transformers.Qwen2ForCausalLM(_config(transformers.Qwen2Config, tie_word_embeddings=True)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=1)),
    "gemma2-softcap": lambda: transformers.Gemma2ForCausalLM(_config(
        transformers.Gemma2Config, head_dim=16, final_logit_softcapping=2.0, attn_logit_softcapping=None,
        query_pre_attn_scalar=16, sliding_window=8)),
}


def _model(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name]().float().train()


def _batch(seed=1, lengths=(17, 9, 4, 1)):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    input_ids = input_ids.masked_fill(mask == 0, PAD)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}


@pytest.fixture
def linear_options(monkeypatch):
    """The keyword options of each call of ``causal_lm_linear_loss`` (the fused path)."""
    real = fastce.linear_loss.causal_lm_linear_loss
    calls = []

    @functools.wraps(real)
    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastce.linear_loss, "causal_lm_linear_loss", spy)
    return calls


@pytest.fixture(autouse=True)
def _unpatch():
    yield
    unpatch_transformers()


def _step(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_equal(grads, stock):
    assert grads.keys() == stock.keys()
    for name, grad in grads.items():
        scale = stock[name].abs().max().item()
        torch.testing.assert_close(grad, stock[name], rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("how", ["patch_model", "patch_transformers"])
@pytest.mark.parametrize("family", list(MODELS))
def test_fused_head_matches_stock_and_never_makes_logits(family, how, linear_options):
    model = _model(family)
    batch = _batch()
    num_items = torch.tensor(float((batch["labels"][:, 1:] != -100).sum() + 5))
    stock_out, stock_grads = _step(model, batch, num_items_in_batch=num_items)
    if how == "patch_model":
        patch_model(model, fuse_lm_head=True)
    else:
        patch_transformers(fuse_lm_head=True)
    out, grads = _step(model, batch, num_items_in_batch=num_items)
    assert len(linear_options) == 1, "the loss was not computed from the hidden states"
    cap = model.config.get_text_config().__dict__.get("final_logit_softcapping")
    assert linear_options[0].get("softcap") == cap  # Gemma 2's cap is applied by fastce; the others have none
    assert isinstance(out.logits, LazyLogits) and out.logits._value is None, "the logits were computed"
    assert abs(out.loss.item() - stock_out.loss.item()) <= 1e-6 * stock_out.loss.item()
    _assert_grads_equal(grads, stock_grads)
    # Reading outputs.logits gives the real logits (e.g. for compute_metrics).
    torch.testing.assert_close(out.logits.detach(), stock_out.logits.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.logits.argmax(-1), stock_out.logits.argmax(-1))


def test_post_processed_logits_are_computed_unfused_and_stay_correct(linear_options):
    """A model that transforms its logits in ways fastce does not record (here: scaled) gets real logits: exact, with
    a warning, never a silent wrong loss."""
    model = _model("llama")
    batch = _batch()
    stock_out, stock_grads = _step(model, batch)
    patch_model(model, fuse_lm_head=True)
    original = type(model).forward

    def scaled_forward(self, *args, **kwargs):  # stands in for a model family that scales its logits
        head = self.lm_head
        calls = []
        handle = head.register_forward_hook(lambda m, a, out: calls.append(1) or out * 1.5)
        try:
            return original(self, *args, **kwargs)
        finally:
            handle.remove()

    stock_scaled = copy.deepcopy(model)
    unpatch_model(stock_scaled)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(model), "forward", scaled_forward)
        expected, expected_grads = _step(stock_scaled, batch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, grads = _step(model, batch)
    assert linear_options == []
    assert any("not fused" in str(w.message) for w in caught)
    assert abs(out.loss.item() - expected.loss.item()) <= 1e-6 * expected.loss.item()
    _assert_grads_equal(grads, expected_grads)
    assert abs(expected.loss.item() - stock_out.loss.item()) > 1e-3  # the scaling did change the loss


def test_inference_and_generation_are_untouched():
    model = _model("llama").eval()
    prompt = _batch()["input_ids"][:1, :6]
    expected = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=PAD)
    patch_model(model, fuse_lm_head=True)
    with torch.no_grad():
        assert not isinstance(model(prompt).logits, LazyLogits)
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=PAD), expected)


def test_undo_restores_everything():
    model = _model("llama")
    head = model.lm_head
    hooks_before = (dict(head._forward_pre_hooks), dict(head._forward_hooks))
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    patch_model(model, fuse_lm_head=True)
    assert model.state_dict().keys() == state_before.keys()  # checkpoints keep their keys
    unpatch_model(model)
    assert (dict(head._forward_pre_hooks), dict(head._forward_hooks)) == hooks_before
    assert model.lm_head is head and not isinstance(model(**_batch()).logits, LazyLogits)
    patch_transformers(fuse_lm_head=True)
    model(**_batch()).loss.backward()  # the global hook fuses the head at the model's first forward
    assert head._forward_pre_hooks
    unpatch_transformers()
    assert not head._forward_pre_hooks and not head._forward_hooks
    assert not isinstance(model(**_batch()).logits, LazyLogits)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_before[key]), key


def test_heads_that_are_not_plain_linear_are_refused():
    model = _model("llama")

    class Adapted(torch.nn.Linear):  # stands in for a LoRA-adapted or quantized head
        def forward(self, x):
            return super().forward(x) * 2

    adapted = Adapted(64, VOCAB, bias=False)
    model.set_output_embeddings(adapted)
    with pytest.raises(ValueError, match="plain nn.Linear"):
        patch_model(model, fuse_lm_head=True)
    assert "_fastce_previous_loss_function" not in vars(model)  # nothing changed


def test_compiled_model_keeps_working():
    """Under torch.compile the head is not fused (documented): the loss is fastce's logits path, the same loss."""
    model = _model("llama")
    batch = _batch()
    expected = model(**batch).loss
    patch_model(model, fuse_lm_head=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(**batch).loss
    loss.backward()
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()


def test_trainer_loss_fused_and_unfused_equal_stock():
    model = _model("llama")
    batch = _batch()
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    num_items = (labels[:, 1:] != -100).sum()
    stock_out, stock_grads = _step(model, batch, num_items_in_batch=num_items)
    for fuse in (False, True):
        patch_model(model, fuse_lm_head=fuse)
        model.zero_grad(set_to_none=True)
        outputs = model(**inputs)  # as Trainer calls it with compute_loss_func: labels popped
        assert isinstance(outputs.logits, LazyLogits) == fuse
        loss = trainer_loss()(outputs, labels, num_items_in_batch=num_items)
        loss.backward()
        assert abs(loss.item() - stock_out.loss.item()) <= 1e-6 * stock_out.loss.item()
        _assert_grads_equal({n: p.grad for n, p in model.named_parameters()}, stock_grads)
        unpatch_model(model)


@pytest.mark.parametrize("fuse", [False, True], ids=["logits", "fused-head"])
def test_options_through_the_patch_match_float64(fuse):
    """Loss options given to the patch: the loss and gradients of a model equal the float64 loss of its logits."""
    from fastce.reference import causal_lm_loss_reference

    options = {"softcap": 5.0, "label_smoothing": 0.1, "z_loss": 1e-3}
    model = _model("llama")
    batch = _batch()
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = causal_lm_loss_reference(logits, batch["labels"], **options)  # float64 from the fp32 logits
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    patch_model(model, fuse_lm_head=fuse, **options)
    out, grads = _step(model, batch)
    assert isinstance(out.logits, LazyLogits) == fuse
    assert abs(out.loss.item() - reference.item()) <= 1e-6 * reference.item()
    _assert_grads_equal(grads, expected)


def test_peft_lora_model_is_fused_and_a_lora_head_is_refused(linear_options):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    batch = _batch()
    stock = peft.get_peft_model(_model("llama"), config)
    expected, expected_grads = _step(stock, batch)
    model = peft.get_peft_model(_model("llama"), config)
    patch_model(model, fuse_lm_head=True)
    out, grads = _step(model, batch)
    assert len(linear_options) == 1 and isinstance(out.logits, LazyLogits)
    assert abs(out.loss.item() - expected.loss.item()) <= 1e-6 * expected.loss.item()
    _assert_grads_equal(grads, expected_grads)  # the LoRA weights' gradients (the base model is frozen)
    unpatch_model(model)
    assert not isinstance(model(**batch).logits, LazyLogits)
    on_head = peft.get_peft_model(_model("llama"), peft.LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ValueError, match="plain nn.Linear"):
        patch_model(on_head, fuse_lm_head=True)

"""fastce inside transformers: ``patch_transformers`` and ``patch_model`` give the stock loss and gradients, and undo
cleanly.

Tiny random fp32 models on the CPU. Three families, because they reach the loss differently:
Llama and Qwen2 have ``loss_type == "ForCausalLM"``; GPT-2 (``GPT2LMHeadModel``) has no loss type and falls back to
``LOSS_MAPPING["ForCausalLM"]``. Vocabulary 101: odd, not a multiple of any block size.
"""
from __future__ import annotations

import copy
import functools
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.loss import loss_utils  # noqa: E402

from fastce.integrations.transformers import (  # noqa: E402
    FASTCE_LOSS_TYPE,
    FastCELoss,
    is_transformers_patched,
    patch_model,
    patch_transformers,
    patched_transformers,
    unpatch_model,
    unpatch_transformers,
)

VOCAB = 101
SEQ_LEN = 19
PAD_ID = 0
# Uneven rows; the last has one token, hence no target at all once shifted.
LENGTHS = (19, 12, 5, 1)


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, initializer_range=0.1, pad_token_id=PAD_ID,
    )
    return transformers.LlamaForCausalLM(config)


def _qwen2():
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, pad_token_id=PAD_ID,
    )
    return transformers.Qwen2ForCausalLM(config)


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=1,
    )
    return transformers.GPT2LMHeadModel(config)


MODELS = {"llama": _llama, "qwen2": _qwen2, "gpt2": _gpt2}


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return MODELS[name]().float().train()


def _batch(padding_side: str, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (len(LENGTHS), SEQ_LEN), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(LENGTHS):
        if padding_side == "right":
            attention_mask[row, :length] = 1
        else:
            attention_mask[row, SEQ_LEN - length:] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD_ID)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _num_targets(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def _forward_backward(model, batch, **kwargs):
    """Loss, logits after forward, logits after backward, and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    outputs = model(**batch, **kwargs)
    logits_after_forward = outputs.logits.detach().clone()
    outputs.loss.backward()
    grads = {name: param.grad.detach().clone() for name, param in model.named_parameters()}
    return outputs.loss.detach(), logits_after_forward, outputs.logits.detach(), grads


@pytest.fixture(autouse=True)
def _restore_transformers():
    """A failing test must not leave LOSS_MAPPING patched for the next one."""
    before = dict(loss_utils.LOSS_MAPPING)
    yield
    unpatch_transformers()
    loss_utils.LOSS_MAPPING.clear()
    loss_utils.LOSS_MAPPING.update(before)


def _mapping_snapshot():
    return dict(loss_utils.LOSS_MAPPING)


def _assert_mapping_is(snapshot):
    mapping = loss_utils.LOSS_MAPPING
    assert mapping.keys() == snapshot.keys()
    assert all(mapping[key] is snapshot[key] for key in snapshot)


# num_items_in_batch as models receive it: absent, from a custom loop (int), from Trainer 5.17 (int64 tensor) and
# 5.23 (float32 tensor). Not the batch's own count: a gradient-accumulation step counts the other micro-batches too.
NUM_ITEMS = {
    "none": lambda count: None,
    "int": lambda count: count + 23,
    "int64_tensor": lambda count: torch.tensor(count + 23),
    "float32_tensor": lambda count: torch.tensor(float(count + 23)),
}


@pytest.mark.parametrize("num_items", list(NUM_ITEMS))
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("how", ["patch_transformers", "patch_model"])
def test_patched_loss_and_gradients_match_stock(how, family, padding_side, num_items, spy):
    model = _model(family)
    batch = _batch(padding_side)
    kwargs = {}
    num_items_in_batch = NUM_ITEMS[num_items](_num_targets(batch))
    if num_items_in_batch is not None:
        kwargs["num_items_in_batch"] = num_items_in_batch

    assert model.loss_function is loss_utils.ForCausalLMLoss
    stock_loss, stock_logits, _, stock_grads = _forward_backward(model, batch, **kwargs)
    assert spy == []

    installed = patch_transformers() if how == "patch_transformers" else patch_model(model)
    assert model.loss_function is installed
    loss, logits_after_forward, logits_after_backward, grads = _forward_backward(model, batch, **kwargs)

    assert len(spy) == 1, "the loss was not computed by fastce"
    if num_items_in_batch is not None:
        assert spy[0] is num_items_in_batch
    assert loss.dtype == torch.float32
    assert torch.isfinite(stock_loss) and stock_loss > 0
    assert abs(loss.item() - stock_loss.item()) <= 1e-6 * abs(stock_loss.item())
    # Nothing is written into the model's logits, neither by the forward nor by the backward pass.
    assert torch.equal(logits_after_forward, stock_logits)
    assert torch.equal(logits_after_backward, stock_logits)
    assert grads.keys() == stock_grads.keys()
    for name, grad in grads.items():
        scale = stock_grads[name].abs().max().item()
        assert scale > 0, name
        # Elementwise rtol 1e-5, with an atol at the tensor's own scale: an embedding row's gradient is a sum over the
        # row's occurrences, and fp32 summation order alone moves its near-cancelling elements by ~1e-7 absolute.
        torch.testing.assert_close(grad, stock_grads[name], rtol=1e-5, atol=1e-5 * scale)


def test_inplace_backward_option_reaches_the_loss():
    """The options are really passed on, and the logits check above can fail: in place, the logits are overwritten."""
    model = _model("llama")
    batch = _batch("right")
    stock_loss, stock_logits, _, _ = _forward_backward(model, batch)
    patch_model(model, inplace_backward=True)
    loss, logits_after_forward, logits_after_backward, _ = _forward_backward(model, batch)
    assert abs(loss.item() - stock_loss.item()) <= 1e-6 * abs(stock_loss.item())
    assert not torch.equal(logits_after_backward, stock_logits)


@pytest.mark.parametrize("how", ["patch_transformers", "patch_model"])
def test_backend_option_reaches_the_loss(how):
    model = _model("qwen2")
    if how == "patch_transformers":
        patch_transformers(backend="no-such-backend")
    else:
        patch_model(model, backend="no-such-backend")
    with pytest.raises(ValueError, match="no-such-backend"):
        model(**_batch("right"))


def test_unknown_option_is_refused_and_changes_nothing():
    model = _model("llama")
    before = _mapping_snapshot()
    with pytest.raises(TypeError, match="bakend"):
        patch_transformers(bakend="torch")
    _assert_mapping_is(before)
    assert not is_transformers_patched()
    with pytest.raises(TypeError, match="bakend"):
        patch_model(model, bakend="torch")
    assert model.loss_function is loss_utils.ForCausalLMLoss


def test_patch_transformers_replaces_every_causal_lm_entry_and_unpatch_restores_them():
    before = _mapping_snapshot()
    causal_keys = {key for key, value in before.items() if value is loss_utils.ForCausalLMLoss}
    assert {"ForCausalLM", "ForConditionalGeneration"} <= causal_keys
    assert FASTCE_LOSS_TYPE not in before
    model = _model("gpt2")  # created before the patch, and has no loss type of its own
    assert model.loss_type is None

    assert not is_transformers_patched()
    installed = patch_transformers(backend="torch")
    mapping = loss_utils.LOSS_MAPPING
    assert isinstance(installed, FastCELoss) and installed.options == {"backend": "torch"}
    assert is_transformers_patched()
    assert {key for key, value in mapping.items() if value is installed} == causal_keys | {FASTCE_LOSS_TYPE}
    assert all(mapping[key] is before[key] for key in before if key not in causal_keys)
    assert loss_utils.ForCausalLMLoss not in mapping.values()
    assert model.loss_function is installed

    unpatch_transformers()
    assert not is_transformers_patched()
    _assert_mapping_is(before)
    assert model.loss_function is loss_utils.ForCausalLMLoss


def test_patch_twice_does_not_wrap_twice_and_latest_options_win():
    before = _mapping_snapshot()
    first = patch_transformers(backend="torch")
    second = patch_transformers(validate=False)
    mapping = loss_utils.LOSS_MAPPING
    assert second is not first and second.options == {"validate": False}
    assert first not in mapping.values()
    assert mapping["ForCausalLM"] is second and mapping[FASTCE_LOSS_TYPE] is second
    unpatch_transformers()  # one unpatch undoes both
    _assert_mapping_is(before)


def test_unpatch_when_not_patched_is_harmless():
    before = _mapping_snapshot()
    unpatch_transformers()
    patch_transformers()
    unpatch_transformers()
    unpatch_transformers()
    _assert_mapping_is(before)


def test_unpatch_restores_an_existing_fastce_entry_and_takes_late_causal_entries():
    mapping = loss_utils.LOSS_MAPPING
    someone_elses = object()
    mapping[FASTCE_LOSS_TYPE] = someone_elses
    before = _mapping_snapshot()
    installed = patch_transformers()
    assert mapping[FASTCE_LOSS_TYPE] is installed
    # A model family registered after the patch, with the stock causal LM loss: the next patch call takes it too.
    mapping["NewFamilyForCausalLM"] = loss_utils.ForCausalLMLoss
    before["NewFamilyForCausalLM"] = loss_utils.ForCausalLMLoss
    installed = patch_transformers()
    assert mapping["NewFamilyForCausalLM"] is installed
    unpatch_transformers()
    _assert_mapping_is(before)
    assert mapping[FASTCE_LOSS_TYPE] is someone_elses


def test_unpatch_leaves_entries_changed_by_someone_else():
    patch_transformers()
    theirs = lambda *args, **kwargs: None  # noqa: E731
    loss_utils.LOSS_MAPPING["ForCausalLM"] = theirs
    unpatch_transformers()
    assert loss_utils.LOSS_MAPPING["ForCausalLM"] is theirs
    assert loss_utils.LOSS_MAPPING["ForConditionalGeneration"] is loss_utils.ForCausalLMLoss


def test_context_manager_nests_and_restores_on_error():
    before = _mapping_snapshot()
    with patched_transformers(backend="torch") as outer:
        assert is_transformers_patched() and loss_utils.LOSS_MAPPING["ForCausalLM"] is outer
        with patched_transformers(validate=False) as inner:
            assert loss_utils.LOSS_MAPPING["ForCausalLM"] is inner
        assert is_transformers_patched()
        assert loss_utils.LOSS_MAPPING["ForCausalLM"].options == {"backend": "torch"}
    assert not is_transformers_patched()
    _assert_mapping_is(before)

    with pytest.raises(RuntimeError, match="boom"):
        with patched_transformers():
            raise RuntimeError("boom")
    _assert_mapping_is(before)


def test_model_loss_type_fastce_selects_the_registered_loss(spy):
    model = _model("llama")
    installed = patch_transformers()
    model.loss_type = FASTCE_LOSS_TYPE
    assert model.loss_function is installed
    model(**_batch("left")).loss.backward()
    assert len(spy) == 1


def test_patch_model_touches_one_model_only_and_unpatch_restores_mapping_lookup(spy):
    before = _mapping_snapshot()
    model, other = _model("llama"), _model("llama")
    installed = patch_model(model, backend="torch")
    _assert_mapping_is(before)
    assert model.loss_function is installed
    assert other.loss_function is loss_utils.ForCausalLMLoss
    other(**_batch("right"))
    assert spy == []

    again = patch_model(model, validate=False)  # options update, the state from before the first call is kept
    assert model.loss_function is again and again.options == {"validate": False}
    unpatch_model(model)
    assert model.loss_function is loss_utils.ForCausalLMLoss
    unpatch_model(model)  # not patched: harmless
    unpatch_model(other)
    assert model.loss_function is loss_utils.ForCausalLMLoss

    # After unpatch_model the model reads LOSS_MAPPING again, so it follows a later global patch.
    installed = patch_transformers()
    assert model.loss_function is installed


def test_unpatch_model_restores_the_models_own_loss():
    model = _model("llama")
    own = FastCELoss(backend="torch")
    model.loss_function = own  # the model's own loss, set through the public setter
    patch_model(model, validate=False)
    assert model.loss_function is not own
    unpatch_model(model)
    assert model.loss_function is own
    patch_transformers()
    assert model.loss_function is own  # still its own: it does not follow LOSS_MAPPING

    model.loss_function = functools.partial(loss_utils.ForCausalLMLoss)
    with pytest.raises(ValueError, match="ForCausalLMLoss only"):
        patch_model(model)


def test_unpatch_model_works_on_a_copy():
    model = _model("llama")
    patch_model(model)
    twin = copy.deepcopy(model)
    unpatch_model(twin)
    assert twin.loss_function is loss_utils.ForCausalLMLoss
    installed = patch_transformers()
    assert twin.loss_function is installed  # reads LOSS_MAPPING again
    assert model.loss_function is not installed and isinstance(model.loss_function, FastCELoss)


def test_patch_model_under_patched_transformers():
    model = _model("llama")
    patch_transformers()
    own = patch_model(model, backend="torch")
    unpatch_transformers()
    assert model.loss_function is own  # its own loss, independent of LOSS_MAPPING
    unpatch_model(model)
    assert model.loss_function is loss_utils.ForCausalLMLoss


def test_patch_model_refuses_other_losses():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_labels=3, pad_token_id=PAD_ID,
    )
    classifier = transformers.LlamaForSequenceClassification(config)
    with pytest.raises(ValueError, match="ForCausalLMLoss only"):
        patch_model(classifier)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        patch_model(torch.nn.Linear(2, 2))


def test_import_fastce_does_not_import_transformers():
    code = (
        "import sys, fastce\n"
        "assert 'transformers' not in sys.modules, 'import fastce imported transformers'\n"
        "from fastce.integrations import transformers as integration\n"
        "assert 'transformers' not in sys.modules, 'importing the integration imported transformers'\n"
        "for name in ('patch_transformers', 'unpatch_transformers', 'patched_transformers',\n"
        "             'is_transformers_patched', 'patch_model', 'unpatch_model'):\n"
        "    assert getattr(fastce, name) is getattr(integration, name), name\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

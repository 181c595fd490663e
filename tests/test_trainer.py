"""``Trainer`` end to end with fastce: gradient accumulation gives the loss and the weights of one big batch.

32 sequences of random length (5..40 tokens), right-padded per batch, labels -100 on padding. Every run sees the
same 32 sequences in the same order (sequential sampler, one epoch of 4 optimizer steps), so
batch 8 x accumulation 1, 4 x 2 and 2 x 4 must log the same per-step loss and reach the same weights: that holds
only if the loss of each micro-batch is divided by the target count of the whole accumulation step
(``num_items_in_batch``), which Trainer counts and passes to the model. SGD with a constant learning rate and no
clipping, so the weights move by exactly lr x gradient (Adam's first step would hide the gradient's scale).
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastce.integrations.transformers import (  # noqa: E402
    patch_model,
    patch_transformers,
    patched_transformers,
    trainer_loss,
    unpatch_transformers,
)

VOCAB = 101
PAD_ID = 0
NUM_SEQUENCES = 32
STEPS = 4  # 4 steps x 8 sequences: the whole dataset, once
SPLITS = [(8, 1), (4, 2), (2, 4)]  # (per-device batch size, gradient accumulation steps): 8 sequences per step
# Measured on this setup: the per-step losses of any two runs differ by <= 2e-7 relative, the final weights by
# <= 1.1e-7 beyond rtol 1e-5 (stock transformers' own GA-vs-one-batch spread is the same size).
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-6


def _dataset() -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(1234)
    lengths = torch.randint(5, 41, (NUM_SEQUENCES,), generator=generator)
    return [
        {"input_ids": torch.randint(1, VOCAB, (int(length),), generator=generator).tolist()}
        for length in lengths
    ]


def _step_counts(dataset, grad_accum: int) -> list[float]:
    """The ``num_items_in_batch`` each micro-batch call should receive: the targets of its whole optimizer step."""
    per_step = len(dataset) // STEPS
    counts = []
    for step in range(STEPS):
        lengths = [len(example["input_ids"]) for example in dataset[step * per_step : (step + 1) * per_step]]
        count = sum(length - 1 for length in lengths)
        counts += [float(count)] * grad_accum
    return counts


def _collate(examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-pads to the longest sequence of the micro-batch; labels are the inputs, -100 on padding."""
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), PAD_ID)
    attention_mask = torch.zeros_like(input_ids)
    for row, example in enumerate(examples):
        input_ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
        attention_mask[row, : len(example["input_ids"])] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture(scope="module")
def initial_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=PAD_ID,
        # Wider than the default 0.02: token losses spread apart from the start, so that weighting micro-batches
        # wrongly (the failure the second test shows) moves the loss ~1e3 x beyond the tolerance.
        initializer_range=0.2,
    )
    return transformers.LlamaForCausalLM(config).float()


@pytest.fixture(scope="module")
def dataset():
    return _dataset()


@pytest.fixture(autouse=True)
def _unpatch():
    yield
    unpatch_transformers()


def _trainer(model, dataset, output_dir, batch_size: int, grad_accum: int, **trainer_kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        max_steps=STEPS,
        optim="sgd",
        learning_rate=0.2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=_collate, **trainer_kwargs)


def _train(trainer) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Per-step logged losses, and the final weights."""
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS
    weights = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    for name, weight in weights.items():
        # Every parameter moves far more than the weight tolerance, or comparing weights would prove nothing.
        assert (weight - before[name]).abs().max() > 1000 * WEIGHT_ATOL, name
    return losses, weights


def _run(initial_model, dataset, tmp_path, batch_size, grad_accum, patch=None, trainer_kwargs=None, **model_attrs):
    model = copy.deepcopy(initial_model)
    for name, value in model_attrs.items():
        setattr(model, name, value)
    if patch == "model":
        patch_model(model)
    elif patch == "fused":
        patch_model(model, fuse_lm_head=True)
    trainer = _trainer(model, dataset, tmp_path / f"bs{batch_size}_ga{grad_accum}", batch_size, grad_accum,
                       **(trainer_kwargs or {}))
    return _train(trainer)


def _assert_same_training(run, reference, what: str):
    losses, weights = run
    reference_losses, reference_weights = reference
    for step, (loss, expected) in enumerate(zip(losses, reference_losses)):
        assert abs(loss - expected) <= LOSS_RTOL * abs(expected), f"{what}: step {step}: {loss} vs {expected}"
    for name, weight in weights.items():
        torch.testing.assert_close(
            weight, reference_weights[name], rtol=1e-5, atol=WEIGHT_ATOL, msg=lambda m: f"{what}: {name}: {m}"
        )


def test_gradient_accumulation_matches_one_batch_and_stock(initial_model, dataset, tmp_path, spy):
    stock = _run(initial_model, dataset, tmp_path / "stock", 8, 1)
    assert spy == []
    # The model learns: otherwise equal losses would prove little.
    assert stock[0][-1] < stock[0][0] - 0.1

    for batch_size, grad_accum in SPLITS:
        calls_before = len(spy)
        run = _run(initial_model, dataset, tmp_path / "fastce", batch_size, grad_accum, patch="model")
        assert len(spy) - calls_before == STEPS * grad_accum, "Trainer did not call fastce for every micro-batch"
        # Each micro-batch got the shifted-target count of its whole step, not its own.
        assert [float(n) for n in spy[calls_before:]] == _step_counts(dataset, grad_accum)
        _assert_same_training(run, stock, f"fastce bs={batch_size} ga={grad_accum}")


def test_withholding_num_items_in_batch_breaks_gradient_accumulation(initial_model, dataset, tmp_path, spy):
    """The check above can fail: without ``num_items_in_batch`` each micro-batch is a mean of its own, and Trainer
    averages those means over the accumulation steps, which weights short and long micro-batches alike."""
    one_batch = _run(initial_model, dataset, tmp_path / "one", 8, 1, patch="model", accepts_loss_kwargs=False)
    accumulated = _run(initial_model, dataset, tmp_path / "ga", 2, 4, patch="model", accepts_loss_kwargs=False)
    assert spy and all(num_items is None for num_items in spy)
    worst = max(abs(a - b) / abs(b) for a, b in zip(accumulated[0], one_batch[0]))
    assert worst > 100 * LOSS_RTOL, worst
    with pytest.raises(AssertionError):
        _assert_same_training(accumulated, one_batch, "mean of micro-batch means")


def test_patch_transformers_after_trainer_construction_matches_stock(initial_model, dataset, tmp_path, spy):
    """Trainer decides at construction how to count ``num_items_in_batch`` (see the integration's docstring):
    patched around ``train()`` it counts the shifted targets, as for the stock loss."""
    stock = _run(initial_model, dataset, tmp_path / "stock", 2, 4)
    model = copy.deepcopy(initial_model)
    trainer = _trainer(model, dataset, tmp_path / "patched", 2, 4)
    with patched_transformers():
        run = _train(trainer)
    assert [float(n) for n in spy] == _step_counts(dataset, 4)
    _assert_same_training(run, stock, "patched_transformers around train()")


def test_patch_transformers_before_trainer_construction_matches_stock(initial_model, dataset, tmp_path, spy):
    """The usual order (patch first, then build the Trainer): Trainer must still count the shifted targets."""
    stock = _run(initial_model, dataset, tmp_path / "stock", 2, 4)
    patch_transformers()
    run = _run(initial_model, dataset, tmp_path / "patched", 2, 4)
    assert [float(n) for n in spy] == _step_counts(dataset, 4)
    _assert_same_training(run, stock, "patch_transformers before Trainer")


def test_trainer_built_while_patched_counts_shifted_targets_after_unpatch(initial_model, dataset, tmp_path, spy):
    """A Trainer built while patched and trained after unpatching still counts as stock transformers does."""
    stock = _run(initial_model, dataset, tmp_path / "stock", 8, 1)
    spy.clear()
    with patched_transformers():
        trainer = _trainer(copy.deepcopy(initial_model), dataset, tmp_path / "patched", 8, 1)
    import transformers.trainer
    from transformers.loss.loss_utils import ForCausalLMLoss

    assert transformers.trainer.ForCausalLMLoss is ForCausalLMLoss  # unpatch put the name back
    run = _train(trainer)
    assert spy == []  # stock loss again
    _assert_same_training(run, stock, "Trainer built while patched, trained after unpatch")


def test_fused_lm_head_trains_as_stock(initial_model, dataset, tmp_path, linear_spy):
    """fuse_lm_head=True: the same losses and weights as the stock model, batch 8 x 1 and 2 x 4, and the logits are
    never made (every micro-batch's loss came from the hidden states)."""
    stock = _run(initial_model, dataset, tmp_path / "stock", 8, 1)
    for batch_size, grad_accum in ((8, 1), (2, 4)):
        calls_before = len(linear_spy)
        run = _run(initial_model, dataset, tmp_path / "fused", batch_size, grad_accum, patch="fused")
        assert len(linear_spy) - calls_before == STEPS * grad_accum
        _assert_same_training(run, stock, f"fused lm_head bs={batch_size} ga={grad_accum}")


@pytest.mark.parametrize("fuse", [False, True], ids=["logits", "fused-head"])
def test_compute_loss_func_door(initial_model, dataset, tmp_path, spy, linear_spy, fuse):
    """Trainer(compute_loss_func=fastce.trainer_loss()): batch 8 x 1 and 2 x 4 give the stock losses and weights.
    Trainer pops the labels and counts the shifted targets of the step (the model's loss type is ForCausalLM), which
    is exactly what the loss sums: its first step's logged loss is the float64 mean over the shifted targets."""
    stock = _run(initial_model, dataset, tmp_path / "stock", 8, 1)
    for batch_size, grad_accum in ((8, 1), (2, 4)):
        spy.clear()
        linear_spy.clear()
        run = _run(initial_model, dataset, tmp_path / "door", batch_size, grad_accum, patch="fused" if fuse else None,
                   trainer_kwargs={"compute_loss_func": trainer_loss()})
        assert len(linear_spy if fuse else spy) == STEPS * grad_accum
        counts = [float(n) for n in (linear_spy if fuse else spy)]
        assert counts == _step_counts(dataset, grad_accum)
        _assert_same_training(run, stock, f"compute_loss_func bs={batch_size} ga={grad_accum}")

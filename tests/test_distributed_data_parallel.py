"""Data parallelism on CPU processes with gloo, against the float64 loss and gradients of one batch holding every
rank's micro-batches: DDP with gradient accumulation and ``fastce.distributed.global_num_items``, and FSDP2
(``fully_shard``) around a tiny Llama whose lm_head is fused with the loss. Plus the single-process behaviour of
the helpers. Launched as in ``test_distributed.py`` (one launch per world size, many checks each)."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import fastce
import fastce.distributed
from distributed_helpers import scenario, scenario_group, scenario_tests
from fastce.reference import causal_lm_loss_reference

from distributed_checks import Checks, _assert, _assert_rel

WORLDS = (2, 3)

pytest_generate_tests, test_scenario = scenario_tests(__name__, WORLDS, "dp-world")


# --- single process ---------------------------------------------------------------------------------------------

def test_global_num_items_without_a_process_group_is_the_local_count():
    labels = torch.tensor([[5, 6, -100, 7], [-100, 1, 2, -100]])
    assert int(fastce.distributed.global_num_items(labels)) == 4  # labels[..., 1:]
    assert int(fastce.distributed.global_num_items(labels, shifted=False)) == 5
    assert int(fastce.distributed.global_num_items([labels, labels[:1]])) == 6
    with pytest.raises(TypeError, match="integer"):
        fastce.distributed.global_num_items(labels.float())
    with pytest.raises(TypeError, match="tensor"):
        fastce.distributed.global_num_items([])


def test_unpack_dtensor_leaves_plain_tensors_alone():
    logits = torch.randn(2, 3)
    assert fastce.distributed.unpack_dtensor(logits) == (logits, None)


# --- DDP ----------------------------------------------------------------------------------------------------------

class _TinyLM(torch.nn.Module):
    def __init__(self, vocab, hidden):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.mix = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, input_ids):
        return self.head(torch.tanh(self.mix(self.embed(input_ids))))


def _micro_batches(world, k, vocab, batch, seq_len, seed=1):
    """``[rank][micro-batch] -> (input_ids, labels)`` of the whole global batch (the same on every rank), padded
    to different lengths; the last rank's first micro-batch has no target at all."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for rank in range(world):
        mine = []
        for step in range(k):
            ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
            labels = ids.clone()
            for row in range(batch):
                keep = int(torch.randint(1, seq_len + 1, (), generator=generator))
                labels[row, keep:] = -100
            if rank == world - 1 and step == 0:
                labels[:] = -100
            mine.append((ids, labels))
        out.append(mine)
    return out


@scenario(worlds=WORLDS)
def ddp_micro_batches_equal_one_batch(rank, world):
    """k micro-batches on each of R ranks under DDP, each loss divided by ``global_num_items`` of the step and scaled
    by R before backward (DDP averages): the gradients equal those of the one batch of all R*k micro-batches, and the
    losses summed over micro-batches and ranks equal its loss."""
    from torch.nn.parallel import DistributedDataParallel

    group = scenario_group()
    checks = Checks()
    vocab, k = 53, 2
    torch.manual_seed(0)
    model = _TinyLM(vocab, 16)
    reference = copy.deepcopy(model).double()
    ddp = DistributedDataParallel(model, process_group=group)
    batches = _micro_batches(world, k, vocab, batch=2, seq_len=7)
    count = fastce.distributed.global_num_items([labels for _, labels in batches[rank]], group)
    total = torch.zeros(())
    for step, (ids, labels) in enumerate(batches[rank]):
        with ddp.no_sync() if step < k - 1 else contextlib.nullcontext():
            loss = fastce.causal_lm_loss(ddp(ids), labels, num_items_in_batch=count, backend="torch")
            (loss * world).backward()
        total += loss.detach()
    torch.distributed.all_reduce(total, group=group)
    n = sum(int((labels[..., 1:] != -100).sum()) for mine in batches for _, labels in mine)
    ref = sum(causal_lm_loss_reference(reference(ids), labels, n) for mine in batches for ids, labels in mine)
    ref.backward()
    checks.run("count", _assert, int(count) == n and count.dtype == torch.int64, f"{count} vs {n}")
    checks.run("loss", torch.testing.assert_close, total.double(), ref.detach(), rtol=1e-6, atol=1e-7)
    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
        checks.run(f"grad {name}", _assert_rel, param.grad, ref_param.grad, 1e-5)
    checks.done()


# --- FSDP2 --------------------------------------------------------------------------------------------------------

def _llama_config():
    import transformers

    return transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    initializer_range=0.2, pad_token_id=0)


def _llama_batches(world, seed=2):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for rank in range(world):
        ids = torch.randint(1, 101, (2, 9), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, 6 - rank:] = 0  # right padding, different per rank
        out.append((ids.masked_fill(mask == 0, 0), mask, ids.masked_fill(mask == 0, -100)))
    return out


@scenario(worlds=(2,))
def fsdp2_llama_with_fused_lm_head(rank, world):
    """``fully_shard`` on each decoder layer and the root of a tiny Llama patched with ``fuse_lm_head=True``: the
    loss and the (resharded, averaged) gradients equal the float64 ones of the unwrapped model on every rank's
    batch. The fused path is the one taken (``causal_lm_linear_loss`` is called, never the logits' loss)."""
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import fastce.linear_loss

    checks = Checks()
    group = scenario_group()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config()).float().train()
    reference = copy.deepcopy(model).double()
    fastce.patch_model(model, fuse_lm_head=True, backend="torch")
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    batches = _llama_batches(world)
    ids, mask, labels = batches[rank]
    count = fastce.distributed.global_num_items(labels, group)
    fused_calls = []
    real = fastce.linear_loss.causal_lm_linear_loss
    fastce.linear_loss.causal_lm_linear_loss = lambda *a, **kw: fused_calls.append(1) or real(*a, **kw)
    try:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=count).loss
        (loss * world).backward()  # FSDP averages the gradients over the ranks
    finally:
        fastce.linear_loss.causal_lm_linear_loss = real
    total = loss.detach().clone()
    torch.distributed.all_reduce(total, group=group)
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}  # collectives: every rank
    n = sum(int((lab[..., 1:] != -100).sum()) for _, _, lab in batches)
    ref = sum(causal_lm_loss_reference(reference(input_ids=i, attention_mask=m).logits, lab, n)
              for i, m, lab in batches)
    ref.backward()
    checks.run("fused lm_head used", _assert, fused_calls == [1], f"causal_lm_linear_loss calls: {fused_calls}")
    checks.run("loss", torch.testing.assert_close, total.double(), ref.detach(), rtol=2e-6, atol=1e-7)
    for name, ref_param in reference.named_parameters():
        checks.run(f"grad {name}", _assert_rel, grads[name], ref_param.grad, 2e-5)
    # An lm_head sharded on its own is refused (its weight is resharded before the loss would read it).
    alone = transformers.LlamaForCausalLM(_llama_config())
    fully_shard(alone.lm_head, mesh=mesh)
    try:
        fastce.patch_model(alone, fuse_lm_head=True)
        outcome = "patched"
    except ValueError as exc:
        outcome = str(exc)
    checks.run("lm_head sharded alone refused", _assert, "fully_shard on its own" in outcome, outcome)
    checks.done()

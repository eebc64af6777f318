"""Data-parallel training on 2 CPU ranks (gloo): DDP and FSDP, LoRA and full fine-tuning, each give one
process's loss curve on the doubled batch (20 AdamW steps, clipping on, ranks holding different numbers of
trained tokens) and its weights; FSDP keeps about half the parameters and optimizer state on each rank."""

from __future__ import annotations

import pytest
import torch

from loom.finetune import LoraConfig, TrainConfig, attach_lora, train
from loom.finetune.parallel import (TokenLossSum, World, data_parallel_loss, full_trainable_state, rank_memory, shard,
                                    spawn, wrap)
from loom.finetune.train import IGNORE, lm_loss, predicted_tokens
from loom.weights.loader import load_model
from tests.helpers import save_tiny_hf

STEPS, PER_RANK = 20, 2
CASES = [("ddp", "lora"), ("fsdp", "lora"), ("ddp", "full"), ("fsdp", "full")]


def global_batches(n: int = STEPS, size: int = 2 * PER_RANK) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Sequences of different lengths from 4 fixed texts, each with a masked prefix of its own length, so
    the two halves of a batch hold different numbers of trained tokens."""
    gen = torch.Generator().manual_seed(0)
    texts = torch.randint(0, 256, (4, 16), generator=gen)
    out = []
    for _ in range(n):
        ids, labels = [], []
        for _ in range(size):
            seq = texts[int(torch.randint(0, 4, (1,), generator=gen))][:int(torch.randint(6, 17, (1,), generator=gen))]
            lab = seq.clone()
            lab[:int(torch.randint(0, 5, (1,), generator=gen))] = IGNORE
            ids.append(seq)
            labels.append(lab)
        out.append((ids, labels))
    return out


CONFIG = TrainConfig(lr=3e-3, weight_decay=0.01, warmup_steps=2, max_steps=STEPS, max_grad_norm=0.5)


def setup(base: str, method: str):
    model = load_model(base, weights="fp32").model
    if method == "lora":
        lora = attach_lora(model, LoraConfig(r=4, lora_alpha=8, seed=1))
        with torch.no_grad():  # B away from zero: every gradient path from the first step
            for p in lora.parameters():
                p.add_(0.02)
        return model, lora.parameters
    model.requires_grad_(True)
    return model, lambda: [p for p in model.parameters() if p.requires_grad]


def run_world(world: World, base: str, out: str) -> None:
    """Every case on this world's ranks; rank 0 saves the losses, final weights and each rank's memory."""
    results = {}
    for strategy, method in CASES:
        model, parameters = setup(base, method)
        wrapped = wrap(model, strategy, world)
        memory = []
        data = ((shard(ids, world), shard(labels, world)) for ids, labels in global_batches())
        logs = train(model, parameters(), data, CONFIG, loss_fn=data_parallel_loss(wrapped, world), world=world,
                     on_finish=lambda opt: memory.append(rank_memory(wrapped, opt, world.rank)))
        state = full_trainable_state(wrapped.module if strategy == "ddp" else wrapped)
        results[strategy, method] = ([log.loss for log in logs], [log.tokens for log in logs], state,
                                     [m.to_dict() for m in world.gather(memory[0])])
    if world.is_main:
        torch.save(results, out)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("parallel") / "base"
    save_tiny_hf(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def two_ranks(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel") / "results.pt"
    spawn(run_world, 2, base, str(out), threads=1)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("strategy,method", CASES)
def test_two_ranks_equal_one_process_on_the_doubled_batch(base, two_ranks, strategy, method):
    model, parameters = setup(base, method)
    logs = train(model, parameters(), iter(global_batches()), CONFIG)
    one = [log.loss for log in logs]
    losses, tokens, state, _ = two_ranks[strategy, method]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one), rtol=1e-4, atol=0)
    assert one[-1] < one[0] - 0.05  # it learns
    assert tokens == [log.tokens for log in logs]  # the ranks' tokens add up to the whole batch's
    expected = {f"model.{name}": p.detach() for name, p in TokenLossSum(model).model.named_parameters()
                if p.requires_grad}
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=2e-5, msg=name)


def test_the_ranks_hold_different_token_counts(base):
    """The case the loss normalization exists for: a global batch whose halves differ in trained tokens."""
    ids, labels = global_batches()[0]
    halves = [predicted_tokens(shard(ids, World(r, 2)), shard(labels, World(r, 2))) for r in (0, 1)]
    assert halves[0] != halves[1]
    assert sum(halves) == predicted_tokens(ids, labels)
    model = load_model(base, weights="fp32").model
    whole = lm_loss(model, ids, labels)
    parts = sum(lm_loss(model, shard(ids, World(r, 2)), shard(labels, World(r, 2)), reduction="sum") for r in (0, 1))
    torch.testing.assert_close(parts / sum(halves), whole)
    mean_of_means = sum(lm_loss(model, shard(ids, World(r, 2)), shard(labels, World(r, 2))) for r in (0, 1)) / 2
    assert abs(float(mean_of_means - whole)) > 1e-4  # averaging the ranks' own means would be wrong


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_halves_the_parameters_and_optimizer_state_per_rank(two_ranks, method):
    ranks = two_ranks["fsdp", method][3]
    ddp = two_ranks["ddp", method][3]
    for m in ddp:  # DDP: each rank a whole copy
        assert m["parameter_bytes"] == m["full_parameter_bytes"]
        assert m["optimizer_state_bytes"] == m["full_optimizer_state_bytes"] == 2 * m["trainable_bytes"]
    full = ddp[0]
    for m in ranks:
        assert m["full_parameter_bytes"] == full["parameter_bytes"]
        assert m["full_optimizer_state_bytes"] == full["optimizer_state_bytes"]
        assert m["optimizer_state_bytes"] == 2 * m["trainable_bytes"]  # AdamW's two moments of its shards
        assert 0.4 < m["fraction_of_one_rank"] < 0.6
    # the shards partition the model: together exactly one copy, nothing held twice
    assert sum(m["parameter_bytes"] for m in ranks) == full["parameter_bytes"]
    assert sum(m["optimizer_state_bytes"] for m in ranks) == full["optimizer_state_bytes"]

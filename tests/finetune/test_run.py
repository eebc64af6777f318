"""``finetune`` end to end with ``nproc=2``: the spawned ranks (FSDP, full fine-tuning) train the curve one
process trains on the doubled batch, rank 0 gathers the shards and writes a model that loads with the same
weights, and each rank's share of parameters + optimizer state is reported; what a data-parallel run does
not do is refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from loom.finetune.parallel import World
from loom.finetune.run import FinetuneConfig, finetune
from loom.finetune.train import TrainConfig
from loom.weights.loader import load_model
from tests.helpers import tiny_llama_gguf


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    text = root / "train.txt"
    text.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20)
    return tiny_llama_gguf(root), str(text), root


def config(setup, out: str, **kw) -> FinetuneConfig:
    model, data, root = setup
    return FinetuneConfig(model=model, data=data, out=str(root / out), seq_len=24, eval_fraction=0.2,
                          train=TrainConfig(lr=1e-3, max_steps=6, warmup_steps=1), **kw)


def test_fsdp_full_finetuning_over_two_processes(setup):
    one = finetune(config(setup, "one", method="full", batch_size=4), progress=False)
    two = finetune(config(setup, "two", method="full", batch_size=2, nproc=2, parallel="fsdp"), progress=False)
    assert json.loads((setup[2] / "two" / "finetune.json").read_text())["losses"] == two["losses"]
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-4, atol=0)
    assert two["losses"][-1] < two["losses"][0]
    assert two["eval_loss_after"] == pytest.approx(one["eval_loss_after"], rel=1e-4)
    assert two["train_tokens"] == one["train_tokens"] and two["trainable_parameters"] == one["trainable_parameters"]
    par = two["parallel"]
    assert par["strategy"] == "fsdp" and par["world_size"] == 2 and par["global_batch_size"] == 4
    assert [m["rank"] for m in par["ranks"]] == [0, 1]
    assert all(0.4 < m["fraction_of_one_rank"] < 0.6 for m in par["ranks"])
    assert one["parallel"]["ranks"][0]["fraction_of_one_rank"] == 1.0
    # the written model: rank 0's gathered shards, equal to the single process's weights
    a = load_model(str(setup[2] / "one"), weights="fp32").model.state_dict()
    b = load_model(str(setup[2] / "two"), weights="fp32").model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5, msg=k)
    base = load_model(setup[0], weights="fp32").model.state_dict()
    assert any(not torch.equal(base[k], b[k]) for k in base)  # it did train


def test_what_a_data_parallel_run_refuses(setup):
    with pytest.raises(ValueError, match="not a soft prompt"):
        finetune(config(setup, "x", method="prompt-tuning", nproc=2))
    with pytest.raises(ValueError, match="--parallel ddp"):
        finetune(config(setup, "x", qlora=True, nproc=2, parallel="fsdp"))
    with pytest.raises(ValueError, match="--save-every"):
        c = config(setup, "x", nproc=2, parallel="fsdp")
        c.train.save_every = 2
        finetune(c)
    with pytest.raises(ValueError, match="parallel must be one of ddp, fsdp"):
        config(setup, "x", parallel="zero")
    with pytest.raises(ValueError, match="full fine-tuning trains dense weights"):
        config(setup, "x", method="full", qlora=True)
    with pytest.raises(ValueError, match="under a world of 4"):
        config(setup, "x", nproc=2).check_world(World(1, 4))

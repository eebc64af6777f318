"""Cutting a decoder into tensor-parallel shards (Megatron-LM, Shoeybi et al. 1909.08053): rank r of N keeps

    attention   query heads [r Hq/N, (r+1) Hq/N) of q|k|v (column-parallel) with their key/value heads: KV heads
                [r Hkv/N, (r+1) Hkv/N) when Hkv >= N, else the one KV head its query heads read (replicated on
                N / Hkv ranks); o (row-parallel: an all-reduce)
    MLP         gate|up rows [r I/N, (r+1) I/N) of each half (column-parallel); down (row-parallel: an all-reduce)
    vocabulary  embedding rows and output-layer rows [r V/N, (r+1) V/N) (an all-reduce, an all-gather of logits)

and replicates the rest (norms, RoPE tables, position tables). Every rank's KV cache holds its KV heads only
(``shard_config``). ``shard_problem`` says, before anything is cut, why a model cannot be."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from loom.config import ModelConfig
from loom.layers.attention import Attention
from loom.layers.mlp import MLP, GatedMLP
from loom.layers.parallel import (QuantizedVocabEmbedding, RowParallelLinear, ShardingError, TPGroup,
                                  VocabParallelEmbedding, VocabParallelHead, take_rows, vocab_range)
from loom.layers.quantized import QuantizedEmbedding
from loom.models.transformer import Transformer

# parameter-name parts of the cut modules: what ``rank_memory`` counts as sharded
SHARDED_PARTS = ("qkv_proj", "o_proj", "gate_up_proj", "up_proj", "down_proj", "embed_tokens", "lm_head")


def shard_problem(config: ModelConfig, size: int) -> str | None:
    """Why ``config``'s model cannot be cut in ``size`` tensor-parallel shards (None: it can)."""
    if size == 1:
        return None
    if config.is_mla:
        return "latent attention (DeepSeek MLA) is not supported under tensor parallelism"
    if config.num_experts:
        return "mixture-of-experts models are not supported under tensor parallelism (expert parallelism is not built)"
    if config.qk_norm_full:
        return "QK-norm over whole projections (OLMoE-style) normalizes across heads and cannot be cut by heads"
    if config.num_heads % size:
        return f"the {config.num_heads} attention heads are not divisible by the tensor-parallel size {size}"
    hkv = config.num_kv_heads
    if hkv >= size and hkv % size:
        return f"the {hkv} key/value heads are not divisible by the tensor-parallel size {size}"
    if hkv < size and size % hkv:
        return (f"the tensor-parallel size {size} is not a multiple of the {hkv} key/value heads (with fewer KV heads "
                "than ranks each KV head is replicated on size / kv_heads ranks)")
    if config.intermediate_size % size:
        return f"the MLP's {config.intermediate_size} hidden units are not divisible by the tensor-parallel size {size}"
    return None


def kv_heads_of_rank(config: ModelConfig, rank: int, size: int) -> list[int]:
    """The KV heads rank ``rank`` holds: its own slice, or the one its query heads share."""
    hkv = config.num_kv_heads
    if hkv >= size:
        per = hkv // size
        return list(range(rank * per, (rank + 1) * per))
    return [rank // (size // hkv)]


def shard_config(config: ModelConfig, size: int) -> ModelConfig:
    """The architecture one rank computes: its heads, KV heads and MLP units (what sizes its KV cache)."""
    if size == 1:
        return config
    return replace(config, num_heads=config.num_heads // size, num_kv_heads=max(1, config.num_kv_heads // size),
                   intermediate_size=config.intermediate_size // size)


def _qkv_rows(config: ModelConfig, rank: int, size: int) -> torch.Tensor:
    d, hq = config.head_dim, config.num_heads // size
    q = torch.arange(rank * hq * d, (rank + 1) * hq * d)
    kv = torch.cat([torch.arange(h * d, (h + 1) * d) for h in kv_heads_of_rank(config, rank, size)])
    return torch.cat([q, config.q_size + kv, config.q_size + config.kv_size + kv])


def _shard_attention(attn: Attention, config: ModelConfig, tp: TPGroup) -> None:
    hq = config.num_heads // tp.size
    kv = kv_heads_of_rank(config, tp.rank, tp.size)
    attn.qkv_proj = take_rows(attn.qkv_proj, _qkv_rows(config, tp.rank, tp.size))
    attn.o_proj = RowParallelLinear(attn.o_proj, tp)
    attn.num_heads, attn.num_kv_heads = hq, len(kv)
    attn.q_size, attn.kv_size = hq * config.head_dim, len(kv) * config.head_dim
    if attn.alibi is not None:  # each head keeps its own slope
        attn.alibi = attn.alibi[tp.rank * hq:(tp.rank + 1) * hq].clone()


def _shard_mlp(mlp: nn.Module, tp: TPGroup) -> None:
    if isinstance(mlp, GatedMLP):
        i = mlp.intermediate // tp.size
        mine = torch.arange(tp.rank * i, (tp.rank + 1) * i)
        mlp.gate_up_proj = take_rows(mlp.gate_up_proj, torch.cat([mine, mlp.intermediate + mine]))
        mlp.intermediate = i
    elif isinstance(mlp, MLP):
        i = mlp.up_proj.out_features // tp.size
        mlp.up_proj = take_rows(mlp.up_proj, torch.arange(tp.rank * i, (tp.rank + 1) * i))
    else:
        raise ShardingError(f"cannot cut a {type(mlp).__name__} MLP")
    mlp.down_proj = RowParallelLinear(mlp.down_proj, tp)


@torch.no_grad()
def shard_transformer(model: Transformer, tp: TPGroup) -> Transformer:
    """Cut ``model`` in place to rank ``tp.rank``'s shard (module doc); the parts of other ranks are freed.
    ``model.config`` stays the whole model's architecture."""
    config = model.config
    problem = shard_problem(config, tp.size)
    if problem is not None:
        raise ShardingError(problem)
    if tp.size == 1:
        return model
    for layer in model.layers:
        if not isinstance(layer.attn, Attention):
            raise ShardingError(f"cannot cut {type(layer.attn).__name__} attention")
        _shard_attention(layer.attn, config, tp)
        _shard_mlp(layer.mlp, tp)
    vocab = config.vocab_size
    if isinstance(model.embed_tokens, QuantizedEmbedding):  # a GGUF table kept quantized (weights/loader.py)
        table = model.embed_tokens
        head = VocabParallelHead.cut(model.lm_head, vocab, tp)
        start, end = vocab_range(vocab, tp.rank, tp.size)
        lookup = QuantizedEmbedding(head.inner, table.dtype, tied=True) if table.tied else \
            QuantizedEmbedding(take_rows(table.source, torch.arange(start, end)), table.dtype)  # type: ignore[arg-type]
        model.embed_tokens = QuantizedVocabEmbedding(lookup, vocab, tp)
        model.lm_head = head
        return model
    full_embedding = model.embed_tokens.weight
    embedding = VocabParallelEmbedding(full_embedding, vocab, tp)
    if model.lm_head is None:  # tied: the output layer reads the embedding's own shard (one tensor)
        head: nn.Module = VocabParallelHead(embedding.weight, vocab, tp)
    else:
        head = VocabParallelHead.cut(model.lm_head, vocab, tp)
    model.embed_tokens = embedding
    model.lm_head = head
    del full_embedding
    return model


def rank_memory(model: nn.Module) -> dict[str, object]:
    """Bytes of the tensors this rank's model holds, each storage counted once: ``sharded`` (the cut linears,
    embedding and output layer), ``replicated`` (everything else, also held by every other rank) and
    ``replicated_parts`` (those bytes by parameter kind, e.g. ``attn_norm.weight``)."""
    seen: set[int] = set()
    sharded = replicated = 0
    parts: dict[str, int] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    named += [(f"{name}.{attr}", t) for name, m in model.named_modules()
              for attr, t in vars(m).items() if isinstance(t, torch.Tensor)]  # kernel tensors, rotary tables
    for name, t in named:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        n = storage.nbytes()
        if any(p in name.split(".") for p in SHARDED_PARTS):
            sharded += n
        else:
            replicated += n
            kind = ".".join(x for x in name.split(".") if not x.isdigit() and x != "layers")
            parts[kind] = parts.get(kind, 0) + n
    return {"sharded": sharded, "replicated": replicated, "replicated_parts": parts}

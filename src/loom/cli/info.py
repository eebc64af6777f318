"""`loom info`: a model's architecture, parameter count, weight bytes per dtype and KV cache bytes per
token, read from its file or folder without loading the weights (the config is still checked against the
tensors' shapes, as loading would)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    i = subparsers.add_parser("info", help="architecture, parameters, bytes per dtype, KV bytes per token")
    i.add_argument("model_path", nargs="?", default=None)
    i.add_argument("--model", default=None)
    i.add_argument("--json", action="store_true")


def model_info(path: str | None) -> dict[str, Any]:
    """What `loom info` reports of a model file or folder (default: the default model), as a dict."""
    import os
    from collections import Counter

    from loom.default_model import default_model_path
    from loom.weights.errors import WeightsError
    from loom.weights.gguf import GGUFFile, config_from_gguf
    from loom.weights.loader import open_hf_checkpoint

    path = path or default_model_path()
    info: dict[str, Any] = {"path": path}
    if os.path.isdir(path):
        config, _ = open_hf_checkpoint(path)
        info["format"] = "hf"
    elif os.path.isfile(path):
        g = GGUFFile(path)
        try:
            config = config_from_gguf(g)
        finally:
            g.close()
        info["format"] = f"gguf v{g.version}"
        info["file_bytes"] = os.path.getsize(path)
        info["tensor_types"] = dict(Counter(t.qtype.name for t in g.tensors.values()))
    else:
        raise WeightsError(path, "no such file or folder")
    params = config.num_parameters()
    info["architecture"] = config.architecture
    info["name"] = config.name
    info["config"] = config.to_dict()
    info["parameters"] = params
    info["parameters_without_embeddings"] = config.num_parameters(include_embeddings=False)
    if config.num_experts:  # a token runs through its k experts, not all of them
        info["active_parameters"] = config.num_parameters(active=True)
    info["bytes_by_dtype"] = {k: int(params * b) for k, b in
                              (("fp32", 4), ("bf16", 2), ("fp16", 2), ("int8", 1), ("int4", 0.5))}
    info["kv_bytes_per_token"] = {"fp32": config.kv_bytes_per_token(4), "bf16": config.kv_bytes_per_token(2),
                                  "int8": config.kv_bytes_per_token(1)}
    if config.is_mla:  # the latent cache, next to the keys and values multi-head attention would cache
        info["mha_kv_bytes_per_token"] = {k: config.mha_kv_bytes_per_token(b) for k, b in
                                          (("fp32", 4), ("bf16", 2), ("int8", 1))}
    return info


def run(args: argparse.Namespace) -> int:
    info = model_info(args.model_path or args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = info["config"]
    gib = 1 << 30
    print(f"{info['path']}")
    print(f"  format        {info['format']}" + (f", {info['file_bytes'] / 1e6:.1f} MB" if "file_bytes" in info else ""))
    if "tensor_types" in info:
        print("  tensor types  " + ", ".join(f"{k} x{v}" for k, v in sorted(info["tensor_types"].items())))
    print(f"  architecture  {info['architecture']} ({info['name']})")
    heads = f"kv {c['num_kv_heads']}, head_dim {c['head_dim']}"
    if c.get("kv_lora_rank"):
        heads = (f"latent attention: kv_lora_rank {c['kv_lora_rank']}, q_lora_rank {c['q_lora_rank'] or 'none'}, "
                 f"qk {c['qk_nope_head_dim']} + rope {c['qk_rope_head_dim']}, v {c['v_head_dim']}")
    print(f"  layers {c['num_layers']}, hidden {c['hidden_size']}, FFN {c['intermediate_size']} "
          f"({'gated ' if c['gated_mlp'] else ''}{c['activation']}), heads {c['num_heads']} "
          f"({heads}), vocab {c['vocab_size']}")
    offset = c.get("position_offset", 0)
    print(f"  positions     {c['position']}" + (f" theta {c['rope_theta']:g}" if c["position"] == "rope" else "")
          + (f" (table rows p + {offset})" if offset else "")
          + f", context {c['max_position_embeddings']}, norm {c['norm']} eps {c['norm_eps']:g} "
          f"({c['norm_placement']}-norm{'' if c['final_norm'] else ', no final norm'}), "
          f"tied embeddings {c['tie_word_embeddings']}")
    biases = [name for name, on in (("q|k|v", c["qkv_bias"]), ("o", c["attn_out_bias"]), ("mlp", c["mlp_bias"]),
                                    ("norms", c["norm_bias"])) if on]
    embedding = c.get("embedding_size") or c["hidden_size"]
    extras = [f"biases {', '.join(biases) if biases else 'none'}"]
    if embedding != c["hidden_size"]:
        extras.append(f"embedding width {embedding} (projected in and out of the residual stream)")
    if c.get("embedding_norm"):
        extras.append("embedding normed")
    if c.get("embedding_scale"):
        extras.append(f"embedding x {c['embedding_scale']:.4g}")
    if c.get("qk_norm"):
        extras.append("QK-norm per head")
    if c.get("attn_scale"):
        extras.append(f"softmax scale {c['attn_scale']:.4g}")
    if c.get("sliding_window"):
        layers = c.get("sliding_window_layers")
        sliding = sum(layers) if layers else c["num_layers"]
        local = f", RoPE theta {c['rope_local_theta']:g}" if c.get("rope_local_theta") else ""
        extras.append(f"sliding window {c['sliding_window']} on {sliding} of {c['num_layers']} layers{local}")
    print("  details       " + "; ".join(extras))
    if c.get("rope_scaling"):
        r = c["rope_scaling"]
        print(f"  rope scaling  {r['kind']} x{r['factor']:g} (trained context {r['original_max_position']})")
    print(f"  parameters    {info['parameters']:,} ({info['parameters_without_embeddings']:,} without embeddings)")
    if "active_parameters" in info:
        print(f"  experts       {c['num_experts']} per MoE layer, {c['num_experts_per_tok']} per token: "
              f"{info['active_parameters']:,} parameters active per token")
    print("  weight bytes  " + ", ".join(f"{k} {v / gib:.3f} GiB" for k, v in info["bytes_by_dtype"].items()))
    print("  KV per token  " + ", ".join(f"{k} {v:,.0f} B" for k, v in info["kv_bytes_per_token"].items()))
    if "mha_kv_bytes_per_token" in info:
        mha = info["mha_kv_bytes_per_token"]
        print(f"                latent attention caches c_kv ({c['kv_lora_rank']}) + k_rope ({c['qk_rope_head_dim']}) "
              f"per layer; as MHA ({c['num_heads']} heads x (keys {c['head_dim']} + values {c['v_head_dim']})): "
              + ", ".join(f"{k} {v:,.0f} B" for k, v in mha.items())
              + f" ({mha['fp32'] / info['kv_bytes_per_token']['fp32']:.1f}x)")
    return 0

"""`loom embed`: sentence embeddings of texts (arguments, a file of one text per line, or both) with an
embedding model (default all-MiniLM-L6-v2) or any decoder (pooled final hidden states). Prints each
vector's head and, for a few texts, their cosine similarities; --json prints everything."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from loom.layers.pooling import POOLING_MODES

MAX_TABLE = 12  # texts beyond which the similarity matrix is not printed


def register(subparsers: argparse._SubParsersAction) -> None:
    e = subparsers.add_parser("embed", help="sentence embeddings of texts (all-MiniLM-L6-v2 by default)")
    e.add_argument("texts", nargs="*", metavar="TEXT")
    e.add_argument("--model", default=None,
                   help="an embedding model folder (BERT-style, sentence-transformers) or a decoder's .gguf / HF "
                        "folder (default: all-MiniLM-L6-v2)")
    e.add_argument("--file", default=None, help="embed each non-empty line of this file too ('-': stdin)")
    e.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    e.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    e.add_argument("--pooling", default=None, choices=POOLING_MODES, help="instead of the model's pooling")
    e.add_argument("--normalize", default=None, action=argparse.BooleanOptionalAction,
                   help="L2-normalize the vectors (default: as the model does)")
    e.add_argument("--dimensions", type=int, default=None,
                   help="Matryoshka truncation (only for models trained for it)")
    e.add_argument("--truncate", type=int, default=None,
                   help="cut longer texts to this many tokens (-1: the model's maximum) instead of failing")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--json", action="store_true", help="print one JSON object with every vector")


def read_texts(args: argparse.Namespace) -> list[str]:
    """The texts to embed: the arguments, then the file's non-empty lines."""
    texts = list(args.texts)
    if args.file is not None:
        if args.file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(args.file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        texts += [line for line in lines if line.strip()]
    if not texts:
        raise ValueError("nothing to embed: give TEXT arguments or --file")
    return texts


def similarity_table(texts: list[str], vectors: Any) -> list[str]:
    """Lines of the cosine similarity matrix of ``vectors`` (rows and columns numbered as the texts)."""
    import torch.nn.functional as F

    unit = F.normalize(vectors, dim=-1)
    sims = unit @ unit.T
    lines = ["cosine similarity:", "      " + "".join(f"{j:>7}" for j in range(len(texts)))]
    lines += [f"{i:>6}" + "".join(f"{float(sims[i, j]):7.3f}" for j in range(len(texts))) for i in range(len(texts))]
    return lines


def run(args: argparse.Namespace) -> int:
    from loom.default_model import default_embedding_model_path
    from loom.llm import LLM

    texts = read_texts(args)
    llm = LLM(args.model or default_embedding_model_path(), num_threads=args.threads, device=args.device)
    t0 = time.perf_counter()
    ids = llm.embedder.tokenize(texts, args.truncate)
    vectors = llm.embedder.embed_ids(ids, pooling=args.pooling, normalize=args.normalize,
                                     dimensions=args.dimensions, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    tokens = sum(len(x) for x in ids)
    if args.json:
        print(json.dumps({"model": llm.model_path, "dimensions": vectors.shape[1],
                          "data": [{"index": i, "text": t, "tokens": len(x), "embedding": v}
                                   for i, (t, x, v) in enumerate(zip(texts, ids, vectors.tolist()))],
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                          "timings": {"load_s": llm.load_seconds, "embed_s": seconds}}, ensure_ascii=False))
        return 0
    for i, (text, v) in enumerate(zip(texts, vectors.tolist())):
        head = ", ".join(f"{x:+.4f}" for x in v[:4])
        short = text if len(text) <= 48 else text[:45] + "..."
        print(f"{i:>4}  [{head}, ...] ({len(v)} dims)  {short}")
    if 1 < len(texts) <= MAX_TABLE:
        print("\n".join(similarity_table(texts, vectors)))
    print(f"[{len(texts)} texts, {tokens} tokens in {seconds:.3f} s ({len(texts) / max(seconds, 1e-9):.1f} texts/s) | "
          f"load {llm.load_seconds:.2f} s]", file=sys.stderr)
    return 0

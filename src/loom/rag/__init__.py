"""Retrieval-augmented generation over a folder of text files: chunk, embed, search, rerank, answer with
citations, and measure retrieval (recall@k, MRR).

>>> from loom.rag import RagIndex, answer
>>> index = RagIndex.build("notes/", "notes.index")     # all-MiniLM-L6-v2, 200-token chunks, 40 overlap
>>> result = answer("What did we decide?", index, k=5)  # SmolLM2-135M-Instruct answers, citing [n]
>>> [c.hit.chunk.location for c in result.citations]

Modules: chunking (token windows with spans and lines), embedder (the Embedder seam; LoomEmbedder runs
``LLM.embed``), search (exact inner product), index (RagIndex on disk, incremental), rerank (UPR), answering
(prompt, streaming, citations), evaluate (question sets, recall@k, MRR). The package uses loom's core
(loom.llm, loom.tokenizer, loom.sampling_params); nothing in the core imports it.
"""

from loom.rag.answering import Answer, AnswerConfig, Citation, answer, parse_citations, retrieve
from loom.rag.chunking import Chunk, ChunkingConfig, chunk_text
from loom.rag.embedder import Embedder, EmbedderInfo, LoomEmbedder
from loom.rag.evaluate import EvalReport, Question, evaluate, load_questions, shakespeare_corpus
from loom.rag.index import (BuildStats, CorruptIndexError, EmbedderMismatchError, Hit, IndexNotFoundError, RagIndex,
                            SourceCorpus)
from loom.rag.rerank import UPRConfig, upr_rerank, upr_scores

__all__ = ["Answer", "AnswerConfig", "BuildStats", "Chunk", "ChunkingConfig", "Citation", "CorruptIndexError",
           "Embedder", "EmbedderInfo", "EmbedderMismatchError", "EvalReport", "Hit", "IndexNotFoundError",
           "LoomEmbedder", "Question", "RagIndex", "SourceCorpus", "UPRConfig", "answer", "chunk_text", "evaluate",
           "load_questions", "parse_citations", "retrieve", "shakespeare_corpus", "upr_rerank", "upr_scores"]

"""Model quality: perplexity (GPTQ protocol) and the texts it is measured on."""

from loom.eval.corpora import (CALIBRATION_CORPUS, CORPORA, EVAL_CORPUS, CorpusNotFoundError, calibration_text,
                               corpus_path, eval_text, read_corpus)
from loom.eval.perplexity import PROTOCOLS, PerplexityResult, load_for_eval, perplexity, run_perplexity

__all__ = ["CALIBRATION_CORPUS", "CORPORA", "EVAL_CORPUS", "PROTOCOLS", "CorpusNotFoundError", "PerplexityResult",
           "calibration_text", "corpus_path", "eval_text", "load_for_eval", "perplexity", "read_corpus",
           "run_perplexity"]

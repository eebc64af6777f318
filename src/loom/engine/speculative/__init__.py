"""Speculative decoding: proposers draft tokens, the target verifies them in one forward, and the
rejection sampler keeps the output distribution the target's (see speculator.py)."""

from loom.engine.speculative.rejection import Draft, accept_greedy, rejection_sample
from loom.engine.speculative.speculator import SpeculativeStats, Speculator, expected_tokens_per_pass

__all__ = ["Draft", "SpeculativeStats", "Speculator", "accept_greedy", "expected_tokens_per_pass",
           "rejection_sample"]

"""Decode tokens/s with and without a JSON-schema constraint, batch 1 and 16, alternating runs, and the
time the grammar mask takes per token and row (engine/structured.py). A stopgap until `loom bench latency
--structured` exists.

    python scripts/structured_overhead.py
"""

from __future__ import annotations

import statistics
import time

from loom import LLM, SamplingParams
from loom.engine import structured
from loom.sampling_params import StructuredOutput

SCHEMA = {"type": "array", "minItems": 12, "maxItems": 12, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age"],
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 99}}}}


def main() -> None:
    llm = LLM()
    spent = {"s": 0.0, "rows": 0}
    plain_mask = structured.GrammarBackend.mask

    def timed_mask(self, logits, rows):
        start = time.perf_counter()
        plain_mask(self, logits, rows)
        spent["s"] += time.perf_counter() - start
        spent["rows"] += len(rows)

    structured.GrammarBackend.mask = timed_mask

    def tokens_per_s(batch: int, constrained: bool) -> float:
        spec = StructuredOutput(json=SCHEMA) if constrained else None
        params = [SamplingParams(temperature=0, max_tokens=200, ignore_eos=not constrained, structured_output=spec)
                  for _ in range(batch)]
        prompts = [f"List twelve people ({i}) as JSON:" for i in range(batch)]
        llm.generate(prompts, [SamplingParams(max_tokens=2)] * batch)  # warm the prompts' path
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)

    for batch in (1, 16):
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(3):
            for constrained in (False, True):
                runs[constrained].append(tokens_per_s(batch, constrained))
        spent.update(s=0.0, rows=0)
        tokens_per_s(batch, True)
        free, json_ = statistics.median(runs[False]), statistics.median(runs[True])
        print(f"batch {batch}: free {free:.1f} tok/s {[round(x) for x in runs[False]]}, JSON schema {json_:.1f} "
              f"{[round(x) for x in runs[True]]}, ratio {json_ / free:.3f}, "
              f"mask {1e6 * spent['s'] / spent['rows']:.0f} us per token and row")


if __name__ == "__main__":
    main()

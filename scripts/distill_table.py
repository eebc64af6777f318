"""The table and plot of `loom distill` runs: each student's perplexity before and after, the teacher's, and
the fraction of the gap closed, from the runs' distill.json files.

    python scripts/distill_table.py "Wanda 2:4=w24-distilled/distill.json" "ASVD 75%=..." --plot docs/distill.png
"""

from __future__ import annotations

import argparse
import json
import math

from loom.finetune.distill_run import plot_recovery


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="LABEL=PATH/distill.json")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    runs = []
    for item in args.runs:
        label, path = item.split("=", 1)
        with open(path) as f:
            runs.append((label, json.load(f)))
    key = "corpus_perplexity" if runs[0][1].get("eval_corpus") else "eval_perplexity"
    print("| student | training (parameters) | steps | tokens/s | perplexity before | after | teacher | gap closed "
          "(perplexity) | gap closed (loss, nats) | held-out windows before -> after (teacher) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, s in runs:
        before, after, teacher = s["before"][key], s["after"][key], s["teacher_scores"][key]
        nats = (math.log(before) - math.log(after)) / (math.log(before) - math.log(teacher))
        held = (f"{s['before']['eval_perplexity']:.2f} -> {s['after']['eval_perplexity']:.2f} "
                f"({s['teacher_scores']['eval_perplexity']:.2f})") if key == "corpus_perplexity" else ""
        print(f"| {label} | {s['training']} ({s['trainable_parameters']:,}) | {len(s['losses'])} | "
              f"{s['train_tokens_per_s']:.0f} | {before:,.2f} | **{after:,.2f}** | {teacher:.2f} | "
              f"{100 * s['gap_recovered']:.0f}% | {100 * nats:.0f}% | {held} |")
    if args.plot:
        plot_recovery(runs, args.plot)


if __name__ == "__main__":
    main()

"""The table and plot of `loom distill` runs: each student's perplexity before and after, the teacher's, and
the fraction of the gap closed, from the runs' distill.json files.

    python scripts/distill_table.py "Wanda 2:4=w24-distilled/distill.json" "ASVD 75%=..." --plot docs/distill.png
"""

from __future__ import annotations

import argparse
import json

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
    print("| student | training | steps | tokens/s | perplexity before | after | teacher | gap closed | "
          "held-out (other text) before -> after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, s in runs:
        other = (f"{s['before']['eval_perplexity']:.2f} -> {s['after']['eval_perplexity']:.2f} "
                 f"(teacher {s['teacher_scores']['eval_perplexity']:.2f})") if key == "corpus_perplexity" else ""
        print(f"| {label} | {s['training']} ({s['trainable_parameters']:,}) | {len(s['losses'])} | "
              f"{s['train_tokens_per_s']:.0f} | {s['before'][key]:.2f} | **{s['after'][key]:.2f}** | "
              f"{s['teacher_scores'][key]:.2f} | {100 * s['gap_recovered']:.0f}% | {other} |")
    if args.plot:
        plot_recovery(runs, args.plot)


if __name__ == "__main__":
    main()

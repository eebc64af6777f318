#!/usr/bin/env bash
# Third-party clients against a running `loom serve`, unchanged:
#   lm-evaluation-harness `local-completions` with tokenizer_backend=remote (the server's /tokenizer_info,
#   /tokenize, /detokenize): two loglikelihood tasks over tiny local sets (scripts/clients/*.jsonl);
#   guidellm: streamed /v1/completions (synchronous) and /v1/chat/completions (2 concurrent streams), which
#   sends stream_options.continuous_usage_stats, over synthetic prompts tokenized with the server's own
#   tokenizer files (/tokenizer/tokenizer.json).
# usage: scripts/client_compat.sh [BASE_URL]   (default http://127.0.0.1:8000; start `loom serve` first)
# The clients live in their own venv ($CLIENTS_VENV, default .clients-venv; several GB: guidellm pulls a
# CUDA torch), made on first use. Nothing is fetched from the Hugging Face hub.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE="${1:-http://127.0.0.1:8000}"; BASE="${BASE%/}"
VENV="${CLIENTS_VENV:-$ROOT/.clients-venv}"
OUT="${OUT:-$(mktemp -d /tmp/loom-clients.XXXX)}"
LIMIT="${LIMIT:-20}" NREQ="${NREQ:-10}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME="$OUT/hf" TOKENIZERS_PARALLELISM=false
AUTH=(); [ -n "${LOOM_API_KEY:-}" ] && AUTH=(-H "Authorization: Bearer $LOOM_API_KEY")

if [ ! -x "$VENV/bin/guidellm" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "lm-eval[api]==0.4.13" "guidellm==0.8.1"
fi
curl -sf "${AUTH[@]}" "$BASE/health" >/dev/null || { echo "no server at $BASE" >&2; exit 2; }
MODEL=$(curl -sf "${AUTH[@]}" "$BASE/v1/models" | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
mkdir -p "$OUT/tokenizer" "$OUT/tasks"
for f in tokenizer.json tokenizer_config.json; do curl -sf "${AUTH[@]}" "$BASE/tokenizer/$f" -o "$OUT/tokenizer/$f"; done
cat > "$OUT/tasks/loom_tiny_lambada.yaml" <<YAML
task: loom_tiny_lambada
dataset_path: json
dataset_kwargs: {data_files: {test: $ROOT/scripts/clients/tiny_lambada.jsonl}}
test_split: test
output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
metric_list: [{metric: perplexity, aggregation: perplexity, higher_is_better: false},
              {metric: acc, aggregation: mean, higher_is_better: true}]
YAML
cat > "$OUT/tasks/loom_tiny_mc.yaml" <<YAML
task: loom_tiny_mc
dataset_path: json
dataset_kwargs: {data_files: {test: $ROOT/scripts/clients/tiny_mc.jsonl}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: answer
target_delimiter: " "
metric_list: [{metric: acc, aggregation: mean, higher_is_better: true},
              {metric: acc_norm, aggregation: mean, higher_is_better: true}]
YAML

echo "== lm-eval local-completions, tokenizer_backend=remote ($MODEL at $BASE; logs in $OUT)"
OPENAI_API_KEY="${LOOM_API_KEY:-none}" "$VENV/bin/lm-eval" run --model local-completions \
  --model_args "base_url=$BASE/v1/completions,model=$MODEL,tokenizer_backend=remote,num_concurrent=1,max_length=2048${LOOM_API_KEY:+,auth_token=$LOOM_API_KEY}" \
  --tasks loom_tiny_lambada,loom_tiny_mc --include_path "$OUT/tasks" --limit "$LIMIT" \
  --output_path "$OUT/lm_eval" > "$OUT/lm_eval.log" 2>&1
grep '^|' "$OUT/lm_eval.log"

for run in "completions /v1/completions kind=synchronous" "chat /v1/chat/completions kind=concurrent,streams=2"; do
  set -- $run
  echo "== guidellm $2 ($3, $NREQ requests, 64 prompt / 32 output tokens)"
  "$VENV/bin/guidellm" run --backend "kind=openai_http,target=$BASE,model=$MODEL,request_format=$2" \
    --profile "$3" --constraint "kind=max_requests,count=$NREQ" \
    --tokenizer "kind=hf_auto,model=$OUT/tokenizer" \
    --data "kind=synthetic_text,prompt_tokens=64,output_tokens=32" \
    --output "kind=json,path=$OUT/guidellm_$1.json" --disable-progress > "$OUT/guidellm_$1.log" 2>&1
  "$VENV/bin/python" - "$OUT/guidellm_$1.json" <<'PY'
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    r, m = b["requests"], b["metrics"]
    ok, err = len(r.get("successful") or []), len(r.get("errored") or [])
    tps = (m.get("output_tokens_per_second", {}).get("successful") or {}).get("median")
    print(f"  successful {ok}, errored {err}, output tokens/s (median) {tps}")
    sys.exit(1 if err or not ok else 0)
PY
done

#!/usr/bin/env bash
# The prepared GPU check (issue "Scale"): random-weight Llama-2-7B- and Llama-3-8B-shaped models in bf16, built on
# the GPU machine itself, each pruned (Wanda 50%, SparseGPT 2:4) and restored with RestoreLCC at the service default
# with small sample counts; seconds, tokens/s and peak memory per stage beside the memory plan's predictions. The
# default objective (mixed: dense targets captured while loading, a vocabulary-wide log-softmax in training) comes
# first; then the sft runs the plan was first built on.
#
#   bash scripts/gpu_check.sh prepare    # here, with network: .gpu/ = tokenizer, a slice of the data, wheels
#   bash scripts/gpu_check.sh            # there (device run, carry .gpu): results under $OUT (or bench/results/gpu)
#
# The GPU machine reaches nothing: everything it needs travels in .gpu/ (a few MiB; ignored by git, never
# committed). Results are written one job at a time, so a run stopped at its time limit still returns what it did.
# Copy the JSON files it returns into bench/results/ and run `python -m bench scaling --render-only`.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=.gpu
PY=${PYTHON:-python3}

if [ "${1:-}" = "prepare" ]; then
    PY=${PYTHON:-.venv/bin/python}
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/tokenizer" "$BUNDLE/data/alpaca" "$BUNDLE/data/eval" "$BUNDLE/wheels"
    TOK=$("$PY" -c 'from worker.assets.models import model_dir; print(model_dir("smollm2-135m-instruct"))')
    for f in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja generation_config.json; do
        [ -f "$TOK/$f" ] && cp "$TOK/$f" "$BUNDLE/tokenizer/"
    done
    DATA=${RESTORELCC_SHARED_DATA:-../shared/data}
    head -n 400 "$DATA/alpaca/train.jsonl" > "$BUNDLE/data/alpaca/train.jsonl"
    head -n 200 "$DATA/eval/wikitext_sentences.jsonl" > "$BUNDLE/data/eval/wikitext_sentences.jsonl"
    # What the GPU image lacks (it has torch, transformers, peft, safetensors, scikit-learn): pydantic and friends.
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$BUNDLE/wheels" pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0 \
        typing-inspection==0.4.5 python-dotenv==1.2.4
    grep -qx "/$BUNDLE/" .git/info/exclude 2>/dev/null || echo "/$BUNDLE/" >> .git/info/exclude
    du -sh "$BUNDLE"
    exit 0
fi

[ -d "$BUNDLE/tokenizer" ] || { echo "run 'bash scripts/gpu_check.sh prepare' first (and carry $BUNDLE)" >&2; exit 2; }
if ls "$BUNDLE"/wheels/*.whl >/dev/null 2>&1 && ! "$PY" -c 'import pydantic_settings' 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$BUNDLE"/wheels/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RESTORELCC_SHARED_DATA=$BUNDLE/data
DEVICE=${GPU_CHECK_DEVICE:-cuda}
STORE=${OUT:-bench/results/gpu}
WORK=${GPU_CHECK_WORK:-/tmp/restorelcc-gpu-check}
mkdir -p "$STORE"
failed=""
df -h "$(dirname "$WORK")" 2>/dev/null | tail -1 || true
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__,
"cuda", torch.cuda.is_available())'
# Most important first: a run stopped at its limit has done these.
# A job is SHAPE/PRUNE[/OBJECTIVE] (objective sft when left out).
JOBS="llama2-7b/wanda/mixed llama3-8b/sparsegpt:2:4/mixed llama2-7b/wanda llama3-8b/sparsegpt:2:4
      llama2-7b/sparsegpt:2:4 llama3-8b/wanda"
for job in ${GPU_CHECK_JOBS:-$JOBS}; do
    shape=${job%%/*} rest=${job#*/}
    prune=${rest%%/*} objective=sft
    [ "$prune" != "$rest" ] && objective=${rest#*/} && objective=${objective:-sft}
    echo "== $shape $prune $objective ($(date -u +%H:%M:%S))"
    # A failed job is reported and the next one runs: the device time is too short to stop at the first failure.
    "$PY" -m bench scaling --device "$DEVICE" --shapes "$shape" --prune "$prune" --objective "$objective" \
        --negatives tfidf \
        --tokenizer "$BUNDLE/tokenizer" --work "$WORK" --store "$STORE" --build-on "$DEVICE" \
        || { echo "== FAILED: $job"; failed="$failed $job"; }
done
echo "== done ($(date -u +%H:%M:%S)); results in $STORE${failed:+; failed:$failed}"
[ -z "$failed" ]

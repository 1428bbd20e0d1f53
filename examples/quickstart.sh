#!/usr/bin/env bash
# Quickstart: pretrain a tiny GLM on the bundled corpus, on CPU with two processes, in a few minutes.
#
#   make quickstart                 # sets up .venv first, then runs this script
#   bash examples/quickstart.sh     # inside an activated environment with megatron_glm installed
#
# 1. trains a sentencepiece tokenizer (8000 pieces, GLM's command tokens reserved) on
#    data/python-docs-en.jsonl.gz                       -> runs/quickstart/data/sp8000.model
# 2. tokenizes the corpus into an indexed dataset       -> runs/quickstart/data/corpus_text_document.*
# 3. pretrains a 4-layer GLM (hidden 256, seq 256, bf16) with blank infilling, two data-parallel
#    processes started by the DeepSpeed launcher (gloo on CPU), validating every 50 iterations
#                                                        -> runs/quickstart/train/
# 4. plots the loss curve                               -> runs/quickstart/loss.png
#    and fails unless the training loss fell by at least QUICKSTART_MIN_DROP nats (default 2.0)
#    from the first logged iteration to the mean of the last five logged ones.
# 5. fills the blank of QUICKSTART_PROMPT with the model it trained (tools/generate.py, greedy)
#    and prints {"prompt", "output", "blanks"}.
#
# Steps 1-2 are skipped when their outputs exist (delete runs/quickstart/data to redo them); step 3
# starts afresh each time (runs/quickstart/train is replaced). docs/quickstart.md has the details.
# Knobs: QUICKSTART_DIR, QUICKSTART_ITERS (150), QUICKSTART_NPROC (2), QUICKSTART_MIN_DROP (2.0),
# QUICKSTART_LAUNCHER (deepspeed | torchrun), QUICKSTART_CORPUS (a jsonl(.gz) with a "text" key;
# give a new QUICKSTART_DIR with it), QUICKSTART_VOCAB (8000), QUICKSTART_PROMPT (text with [MASK]).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${QUICKSTART_DIR:-runs/quickstart}
ITERS=${QUICKSTART_ITERS:-150}
NPROC=${QUICKSTART_NPROC:-2}
MIN_DROP=${QUICKSTART_MIN_DROP:-2.0}
LAUNCHER=${QUICKSTART_LAUNCHER:-deepspeed}
PYTHON=${PYTHON:-python}
CORPUS=${QUICKSTART_CORPUS:-data/python-docs-en.jsonl.gz}
VOCAB=${QUICKSTART_VOCAB:-8000}
PROMPT=${QUICKSTART_PROMPT:-"Return a new [MASK] of the list."}
DATA=$OUT/data
TRAIN=$OUT/train
TOKENIZER=$DATA/sp$VOCAB
DATASET=$DATA/corpus_text_document

start=$SECONDS
step() { printf '\n==> [%4ds] %s\n' $((SECONDS - start)) "$*"; }

mkdir -p "$DATA"

if [[ -s $TOKENIZER.model && -s $TOKENIZER.json ]]; then
    step "1/5 tokenizer: reusing $TOKENIZER.model"
else
    step "1/5 training a sentencepiece tokenizer ($VOCAB pieces) on $CORPUS"
    "$PYTHON" tools/train_tokenizer.py --input "$CORPUS" --json-keys text --vocab-size "$VOCAB" \
        --output-prefix "$TOKENIZER"
fi

# Redo the dataset when it is missing or older than the tokenizer that made it.
if [[ -s $DATASET.idx && -s $DATASET.bin && $DATASET.idx -nt $TOKENIZER.model ]]; then
    step "2/5 dataset: reusing $DATASET.{bin,idx}"
else
    step "2/5 tokenizing $CORPUS into $DATASET.{bin,idx}"
    "$PYTHON" tools/preprocess_data.py --input "$CORPUS" --json-keys text --append-eod \
        --workers 2 --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER.model" \
        --output-prefix "$DATA/corpus"
fi

step "3/5 pretraining a tiny GLM for $ITERS iterations: $NPROC processes, $LAUNCHER launcher"
rm -rf "$TRAIN"
mkdir -p "$TRAIN"
cores=$(nproc 2>/dev/null || echo 2)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / NPROC > 0 ? cores / NPROC : 1))}
port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
case $LAUNCHER in
deepspeed) launch=(deepspeed --num_gpus "$NPROC" --master_port "$port" --log_level warning) ;;
torchrun) launch=(torchrun --nproc-per-node "$NPROC" --master-port "$port") ;;
*) echo "QUICKSTART_LAUNCHER must be deepspeed or torchrun, got '$LAUNCHER'" >&2; exit 2 ;;
esac
train_args=(
    --num-layers 4 --hidden-size 256 --num-attention-heads 8
    --seq-length 218 --max-position-embeddings 256
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER.model"
    --data-path "$DATASET" --split 98,2,0 --num-workers 1
    --train-iters "$ITERS" --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --warmup 0.05
    --log-interval 2 --eval-interval 50 --eval-iters 2
    --log-json "$TRAIN/train_log.jsonl" --tensorboard-dir "$TRAIN/tensorboard"
    --save "$TRAIN/checkpoints" --seed 1234
    --deepspeed --deepspeed_config examples/ds_config_quickstart.json
)
# A progress bar only on a terminal; in CI logs the per-iteration lines are enough.
[[ -t 2 ]] || train_args+=(--no-progress-bar)
echo "+ ${launch[*]} pretrain_glm.py ${train_args[*]}"
"${launch[@]}" pretrain_glm.py "${train_args[@]}"

step "4/5 plotting the loss curve"
"$PYTHON" tools/plot_loss.py "$TRAIN/train_log.jsonl" --output "$OUT/loss.png" \
    --title "GLM quickstart: 4 x 256, $NPROC CPU processes" --require-drop loss "$MIN_DROP"

step "5/5 filling a blank with the trained model"
# as a jsonl record, so that the blank's text is printed with its whitespace escaped
"$PYTHON" -c 'import json, sys; print(json.dumps({"prompt": sys.argv[1]}))' "$PROMPT" \
    >"$OUT/prompt.jsonl"
"$PYTHON" tools/generate.py --load-pretrained "$TRAIN/checkpoints" --input-file "$OUT/prompt.jsonl" \
    --temperature 0 --out-seq-length 8

step "done in $((SECONDS - start)) s. Outputs:"
cat <<EOF
  loss curve     $OUT/loss.png
  JSON log       $TRAIN/train_log.jsonl
  TensorBoard    tensorboard --logdir $TRAIN/tensorboard
  checkpoint     $TRAIN/checkpoints/$ITERS (resume with --load $TRAIN/checkpoints)
  generate       python tools/generate.py --load-pretrained $TRAIN/checkpoints  (docs/generation.md)
  tokenizer      $TOKENIZER.model
  dataset        $DATASET.{bin,idx}
EOF

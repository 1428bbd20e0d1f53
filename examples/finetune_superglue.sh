#!/usr/bin/env bash
# Cloze finetuning of GLM-Large on a SuperGLUE task, as the paper does it (the official
# config_tasks/task_*.sh: sequence 256, LR 1e-5 with linear decay and 10 % warmup, weight decay
# 0.1, batch 16, the task's epochs and pattern), from a pretrained checkpoint of any form:
#
#   TASK=BoolQ DATA_DIR=/data/superglue/BoolQ CHECKPOINT=checkpoints/glm-large \
#   GPUS_PER_NODE=4 bash examples/finetune_superglue.sh
#
# TASK: BoolQ (20 epochs, pattern 4), CB (50, 3), COPA (50, 0), RTE (50, 0), WiC (30, 1); PATTERN_ID
# and EPOCHS override the defaults. DATA_DIR holds the task's train.jsonl and val.jsonl as
# distributed (docs/finetuning.md#data-formats); a generic {"text", "choices", "label"} task is
# TASK=generic. The tokenizer and architecture must be the checkpoint's (here the released
# GLM-Large: BERT large uncased WordPiece, 24 layers, 1024 hidden, 16 heads). Validation every
# 500 iterations keeps the best model in $SAVE_DIR/best; the final metrics go to
# $SAVE_DIR/results.json. Relaunching the same command resumes. Launch variables:
# examples/launch_common.sh; arguments after the script name go to finetune_glm.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"

: "${TASK:?set TASK (BoolQ, CB, COPA, RTE, WiC or generic)}"
: "${DATA_DIR:?set DATA_DIR to the directory holding train.jsonl and val.jsonl}"
: "${CHECKPOINT:?set CHECKPOINT to the pretrained model (any checkpoint form)}"
case ${TASK,,} in
boolq) epochs=20 pattern=4 ;;
cb) epochs=50 pattern=3 ;;
copa) epochs=50 pattern=0 ;;
rte) epochs=50 pattern=0 ;;
wic) epochs=30 pattern=1 ;;
*) epochs=20 pattern=0 ;;
esac
SAVE_DIR=${SAVE_DIR:-checkpoints/finetune-${TASK,,}}

ARGS=(
    --task "$TASK" --data-dir "$DATA_DIR" --load-pretrained "$CHECKPOINT"
    --cloze-eval --pattern-id "${PATTERN_ID:-$pattern}" --epochs "${EPOCHS:-$epochs}"
    --preset large --max-position-embeddings 512 --seq-length 256
    --tokenizer-type BertWordPieceTokenizer --tokenizer-model-type bert-large-uncased
    --lr 1e-5 --lr-decay-style linear --lr-decay-ratio 0 --warmup 0.1
    --micro-batch-size 16 --eval-batch-size 16 --weight-decay 0.1 --clip-grad 1.0
    --save "$SAVE_DIR" --load "$SAVE_DIR" --eval-interval 500 --log-interval 50
    --log-json "$SAVE_DIR/train_log.jsonl" --seed 1234
)
GLM_SCRIPT=finetune_glm.py glm_launch "${ARGS[@]}" "$@"

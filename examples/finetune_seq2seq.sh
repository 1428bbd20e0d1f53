#!/usr/bin/env bash
# Seq2seq finetuning of GLM-Large (summarisation, as the official config_tasks/seq_cnndm_org.sh:
# source 608 and target 160 tokens, LR 1e-5 linear with 6 % warmup, label smoothing 0.1, 10 epochs;
# ROUGE by beam search with 5 beams, length penalty 0.7, no repeated 3-grams, at least 55 tokens):
#
#   DATA_DIR=/data/cnn_dm CHECKPOINT=checkpoints/glm-large-generation \
#   GPUS_PER_NODE=8 bash examples/finetune_seq2seq.sh
#
# DATA_DIR holds train.source/train.target and val.source/val.target (one example per line), or
# train.jsonl/val.jsonl of {"source": ..., "target": ...} (docs/finetuning.md#seq2seq). The best
# validation loss keeps its model in $SAVE_DIR/best; the final loss and ROUGE-1/2/L of the
# validation split go to $SAVE_DIR/results.json. Launch variables: examples/launch_common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"

: "${DATA_DIR:?set DATA_DIR to the directory holding the task files}"
: "${CHECKPOINT:?set CHECKPOINT to the pretrained model (any checkpoint form)}"
SAVE_DIR=${SAVE_DIR:-checkpoints/finetune-seq2seq}

ARGS=(
    --task seq2seq --data-dir "$DATA_DIR" --load-pretrained "$CHECKPOINT" --epochs 10
    --preset large --max-position-embeddings 1024
    --tokenizer-type BertWordPieceTokenizer --tokenizer-model-type bert-large-uncased
    --src-seq-length 608 --tgt-seq-length 160 --label-smoothing 0.1
    --num-beams 5 --length-penalty 0.7 --no-repeat-ngram-size 3 --min-tgt-length 55
    --lr 1e-5 --lr-decay-style linear --lr-decay-ratio 0 --warmup 0.06
    --micro-batch-size 8 --eval-batch-size 4 --weight-decay 0.1 --clip-grad 1.0
    --checkpoint-activations
    --save "$SAVE_DIR" --load "$SAVE_DIR" --save-interval 2000 --eval-interval 2000
    --log-interval 50 --log-json "$SAVE_DIR/train_log.jsonl" --seed 1234
)
GLM_SCRIPT=finetune_glm.py glm_launch "${ARGS[@]}" "$@"

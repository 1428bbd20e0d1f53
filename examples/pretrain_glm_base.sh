#!/usr/bin/env bash
# GLM-Base (110M parameters: 12 layers, hidden 768, 12 heads), the released English recipe
# (GLM_SPEC §3; official config/ds_block_base.sh): BERT uncased WordPiece vocabulary, sequence 512,
# token-span infilling only (--bert-prob 1.0), 150000 iterations with cosine decay over 120000 to 5 % of
# the peak LR 4e-4, 5 % warmup; examples/ds_config_base.json: fp16 with dynamic loss scaling, gradient
# clipping 1.0, AdamW (0.9, 0.98, eps 1e-6, weight decay 0.1), micro batch 16 per GPU; activation
# checkpointing. Global batch = 16 x GPUs, e.g. 1024 on NUM_NODES=8 GPUS_PER_NODE=8.
#
#   DATA_PATH=/data/wiki_book_text_document VOCAB_FILE=/data/bert-base-uncased-vocab.txt \
#   NUM_NODES=8 MASTER_ADDR=worker-0 HOSTFILE=my_hostfile bash examples/pretrain_glm_base.sh
#
# The corpus is made with tools/preprocess_data.py --tokenizer-type BertWordPieceLowerCase
# --vocab-file $VOCAB_FILE. Launch variables (LAUNCHER, NUM_NODES, ...): examples/launch_common.sh.
# Arguments after the script name are appended to the trainer's (later flags win).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"

: "${DATA_PATH:?set DATA_PATH to the corpus prefix made by tools/preprocess_data.py}"
: "${VOCAB_FILE:?set VOCAB_FILE to the BERT uncased vocab.txt}"
SAVE_DIR=${SAVE_DIR:-checkpoints/glm-base}

ARGS=(
    --preset base --seq-length 512 --max-position-embeddings 512
    --tokenizer-type BertWordPieceLowerCase --vocab-file "$VOCAB_FILE"
    --data-path "$DATA_PATH" --split 949,50,1
    --bert-prob 1.0 --gap-sentence-prob 0.0 --avg-block-length 3 --gpt-infill-prob 0.5
    --train-iters 150000 --lr-decay-iters 120000 --lr 4e-4 --lr-decay-style cosine
    --lr-decay-ratio 0.05 --warmup 0.05
    --checkpoint-activations
    --save "$SAVE_DIR" --load "$SAVE_DIR" --save-interval 5000
    --eval-interval 1000 --eval-iters 10 --log-interval 50
    --log-json "$SAVE_DIR/train_log.jsonl" --tensorboard-dir "$SAVE_DIR/tensorboard"
    --seed 1234
    --deepspeed --deepspeed_config "$EXAMPLES_DIR/ds_config_base.json"
)
glm_launch "${ARGS[@]}" "$@"

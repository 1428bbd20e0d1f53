#!/usr/bin/env bash
# GLM-Large (335M parameters: 24 layers, hidden 1024, 16 heads), the released English recipe
# (official config/ds_block_large.sh; the table in docs/blank-infilling.md#released-recipes):
# BERT uncased WordPiece vocabulary, sequence 512 (the raw sample length; the model input is 586),
# token-span infilling only (--bert-prob 1.0), 200000 iterations with cosine decay over 160000
# to 5 % of the peak LR 2e-4, 5 % warmup; examples/ds_config_large.json: fp16 with dynamic loss
# scaling at ZeRO stage 0 as released, gradient clipping 1.0, AdamW (0.9, 0.98, eps 1e-6, weight
# decay 0.1), micro batch 16 per GPU; activation checkpointing. Global batch = 16 x GPUs, e.g. 1024
# on NUM_NODES=8 GPUS_PER_NODE=8.
#
#   DATA_PATH=/data/wiki_book_text_document \
#   NUM_NODES=8 MASTER_ADDR=worker-0 HOSTFILE=my_hostfile bash examples/pretrain_glm_large.sh
#
# The tokenizer is the official one, on the uncased vocabulary bundled with megatron_glm; make the
# corpus with exactly the same flags: tools/preprocess_data.py --tokenizer-type
# BertWordPieceTokenizer --tokenizer-model-type bert-large-uncased. VOCAB_FILE (optional) passes
# --vocab-file to use another vocab.txt.
# Launch variables (LAUNCHER, NUM_NODES, ...): examples/launch_common.sh. Arguments after the script
# name are appended to the trainer's (later flags win); --dry-run checks everything and starts no
# training (examples/README.md).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"

: "${DATA_PATH:?set DATA_PATH to the corpus prefix made by tools/preprocess_data.py}"
SAVE_DIR=${SAVE_DIR:-checkpoints/glm-large}

TOKENIZER=(--tokenizer-type BertWordPieceTokenizer --tokenizer-model-type bert-large-uncased)
if [[ -n ${VOCAB_FILE:-} ]]; then
    TOKENIZER+=(--vocab-file "$VOCAB_FILE")
fi

ARGS=(
    --preset large --seq-length 512 --max-position-embeddings 512
    "${TOKENIZER[@]}"
    --data-path "$DATA_PATH" --split 949,50,1
    --bert-prob 1.0 --gap-sentence-prob 0.0 --avg-block-length 3 --gpt-infill-prob 0.5
    --train-iters 200000 --lr-decay-iters 160000 --lr 2e-4 --lr-decay-style cosine
    --lr-decay-ratio 0.05 --warmup 0.05
    --checkpoint-activations
    --save "$SAVE_DIR" --load "$SAVE_DIR" --save-interval 5000
    --eval-interval 1000 --eval-iters 10 --log-interval 50
    --log-json "$SAVE_DIR/train_log.jsonl" --tensorboard-dir "$SAVE_DIR/tensorboard"
    --seed 1234
    --deepspeed --deepspeed_config "$EXAMPLES_DIR/ds_config_large.json"
)
glm_launch "${ARGS[@]}" "$@"

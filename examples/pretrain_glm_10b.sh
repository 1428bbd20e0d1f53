#!/usr/bin/env bash
# GLM-10B (9.9B parameters: 48 layers, hidden 4096, 64 heads), the released English recipe
# (official config/ds_block_10B.sh; the table in docs/blank-infilling.md#released-recipes): GPT-2
# BPE vocabulary, sequence 512 (the raw sample length; the model input is 586; position tables for
# 1024), the three objectives mixed 0.5 token spans / 0.3 sentences / 0.2 document with task masks
# ([sMASK], [gMASK]), gpt_min_ratio 0.25, block mask prob 0.1, short sequences 2 %; 250k
# iterations with cosine decay over 175k to 10 % of the peak LR 1e-4, 4 % warmup;
# examples/ds_config_10b.json: fp16 with dynamic loss scaling, clipping 1.0, AdamW (0.9, 0.95,
# eps 1e-8, weight decay 0.1), micro batch 21 per GPU, ZeRO stage 2; activation checkpointing.
#
#   DATA_PATH=/data/pile_text_document NUM_NODES=16 MASTER_ADDR=worker-0 HOSTFILE=my_hostfile \
#   bash examples/pretrain_glm_10b.sh
#
# The tokenizer is the official one (--tokenizer-type GPT2BPETokenizer, model type gpt2 by default)
# on the vocabulary bundled with megatron_glm; make the corpus with exactly this flag:
# tools/preprocess_data.py --tokenizer-type GPT2BPETokenizer. VOCAB_FILE and MERGE_FILE (optional)
# pass --vocab-file / --merge-file to use another vocab.json / merges.txt.
# TP_SIZE (default 1) sets --tensor-model-parallel-size: raise it (2, 4) when the model does not fit
# your GPUs (the global batch shrinks by the same factor unless you raise
# gradient_accumulation_steps). The release's second stage ("longer": sequence 1024, LR 3e-5) is
# not scripted here. Launch variables: examples/launch_common.sh. Arguments after the script name
# are appended to the trainer's (later flags win); --dry-run checks everything and starts no
# training (examples/README.md).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"

: "${DATA_PATH:?set DATA_PATH to the corpus prefix made by tools/preprocess_data.py}"
SAVE_DIR=${SAVE_DIR:-checkpoints/glm-10b}

TOKENIZER=(--tokenizer-type GPT2BPETokenizer)
if [[ -n ${VOCAB_FILE:-} ]]; then
    TOKENIZER+=(--vocab-file "$VOCAB_FILE")
fi
if [[ -n ${MERGE_FILE:-} ]]; then
    TOKENIZER+=(--merge-file "$MERGE_FILE")
fi

ARGS=(
    --preset 10b --seq-length 512 --max-position-embeddings 1024
    --tensor-model-parallel-size "${TP_SIZE:-1}"
    "${TOKENIZER[@]}"
    --data-path "$DATA_PATH" --split 949,50,1
    --bert-prob 0.5 --gap-sentence-prob 0.3 --avg-block-length 3 --gpt-infill-prob 0.5
    --gpt-min-ratio 0.25 --task-mask --block-mask-prob 0.1 --short-seq-prob 0.02
    --train-iters 250000 --lr-decay-iters 175000 --lr 1e-4 --lr-decay-style cosine
    --lr-decay-ratio 0.1 --warmup 0.04
    --checkpoint-activations
    --save "$SAVE_DIR" --load "$SAVE_DIR" --save-interval 2000
    --eval-interval 1000 --eval-iters 10 --log-interval 50
    --log-json "$SAVE_DIR/train_log.jsonl" --tensorboard-dir "$SAVE_DIR/tensorboard"
    --seed 1234
    --deepspeed --deepspeed_config "$EXAMPLES_DIR/ds_config_10b.json"
)
glm_launch "${ARGS[@]}" "$@"

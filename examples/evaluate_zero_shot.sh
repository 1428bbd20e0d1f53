#!/usr/bin/env bash
# Zero-shot evaluation of a pretrained GLM (one process, tools/evaluate_lm.py), as the official
# config_tasks/zero_lm.sh and zero_lambada(_uni).sh: perplexity with windows of 512 tokens moving
# by 256 (each token after the first scored once, with at least 256 tokens of context), and LAMBADA
# last-word accuracy with the context in Part A (bidirectional) and as a left-to-right prefix
# (unidirectional):
#
#   CHECKPOINT=checkpoints/glm-large TEXT=/data/wikitext-103/wiki.test.tokens \
#   LAMBADA=/data/lambada_test.jsonl bash examples/evaluate_zero_shot.sh
#
# Each run writes results.json under $SAVE_DIR/<name>. Tokenizer and blank as the checkpoint was
# trained (here GLM-Large's BERT vocabulary and [MASK]; add --task-mask for [gMASK] models).
set -euo pipefail
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${CHECKPOINT:?set CHECKPOINT to the model (any checkpoint form)}"
SAVE_DIR=${SAVE_DIR:-checkpoints/zero-shot}
COMMON=(--load-pretrained "$CHECKPOINT" --eval-batch-size 16
    --tokenizer-type BertWordPieceTokenizer --tokenizer-model-type bert-large-uncased)

if [[ -n ${TEXT:-} ]]; then
    python "$REPO_DIR/tools/evaluate_lm.py" --task perplexity --valid-data "$TEXT" \
        --seq-length 510 --overlapping-eval 256 --save "$SAVE_DIR/perplexity" "${COMMON[@]}" "$@"
fi
if [[ -n ${LAMBADA:-} ]]; then
    python "$REPO_DIR/tools/evaluate_lm.py" --task lambada --valid-data "$LAMBADA" \
        --seq-length 512 --save "$SAVE_DIR/lambada" "${COMMON[@]}" "$@"
    python "$REPO_DIR/tools/evaluate_lm.py" --task lambada --valid-data "$LAMBADA" \
        --seq-length 512 --unidirectional --save "$SAVE_DIR/lambada-uni" "${COMMON[@]}" "$@"
fi

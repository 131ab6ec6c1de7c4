#!/usr/bin/env bash
# fairseq route of the offline demo: prepare the pydoc corpus (a byte-level BPE
# trained offline), binarise it for fairseq, and train a small transformer LM
# with the ScaleGrad criterion on the CPU, printing training and validation loss.
#
#   bash scripts/demo_fairseq.sh [OUT_DIR] [extra fairseq-train flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo-fairseq}
shift || true
PY=.venv/bin/python

if [ ! -f "$OUT/data-bin/dict.txt" ]; then
    $PY scripts/prepare_data.py --train-tokenizer --vocab-size 4000 \
        --output-dir "$OUT/data" --fairseq-data-bin "$OUT/data-bin"
fi
.venv/bin/fairseq-train "$OUT/data-bin" --user-dir scalegrad \
    --task language_modeling --arch transformer_lm \
    --decoder-layers 2 --decoder-embed-dim 128 --decoder-ffn-embed-dim 512 --decoder-attention-heads 4 \
    --share-decoder-input-output-embed --tokens-per-sample 128 --sample-break-mode none \
    --criterion scalegrad --gamma 0.2 \
    --optimizer adam --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 50 \
    --max-tokens 4096 --max-update 200 --validate-interval-updates 100 \
    --save-dir "$OUT/checkpoints" --no-epoch-checkpoints \
    --log-format simple --log-interval 25 --cpu --seed 1 --num-workers 0 "$@"

#!/usr/bin/env bash
# Builds shards from the complete raw train/dev splits (what the configs/flan_t5_*.yaml and llava.yaml recipes read).
#   bash shards/build_full.sh [RAW_DIR] [OUT_DIR]     (defaults: ../shared/data/raw, shards/full)
set -euo pipefail
cd "$(dirname "$0")/.."
raw=${1:-../shared/data/raw}
out=${2:-shards/full}
for pair in twitter2015:twitter2015/train.txt:twitter2015/valid.txt twitter2017:twitter2017/train.txt:twitter2017/valid.txt \
            mnre_v1:mnre_v1/ours_train.txt:mnre_v1/ours_val.txt mnre_v2:mnre_v2/mnre_train.txt:mnre_v2/mnre_val.txt \
            m2e2:m2e2/text_event_train.json:m2e2/text_event_dev.json; do
  IFS=: read -r dataset train dev <<<"$pair"
  python launchers/build_shards.py --quiet --out "$out" --dataset "$dataset" --input "$raw/$train" --split train
  python launchers/build_shards.py --quiet --out "$out" --dataset "$dataset" --input "$raw/$dev" --split dev
done

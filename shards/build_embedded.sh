#!/usr/bin/env bash
# Rebuilds the embedded sample shards from the raw train/dev files (deterministic: same bytes every run).
#   bash shards/build_embedded.sh [RAW_DIR]     (default: ../shared/data/raw beside the checkout)
set -euo pipefail
cd "$(dirname "$0")/.."
raw=${1:-../shared/data/raw}
build() { python launchers/build_shards.py --quiet --out shards --samples-per-shard 200 --seed 0 "$@"; }
for pair in twitter2015:twitter2015/train.txt:twitter2015/valid.txt twitter2017:twitter2017/train.txt:twitter2017/valid.txt \
            mnre_v1:mnre_v1/ours_train.txt:mnre_v1/ours_val.txt mnre_v2:mnre_v2/mnre_train.txt:mnre_v2/mnre_val.txt \
            m2e2:m2e2/text_event_train.json:m2e2/text_event_dev.json; do
  IFS=: read -r dataset train dev <<<"$pair"
  build --dataset "$dataset" --input "$raw/$train" --split train --sample 400
  build --dataset "$dataset" --input "$raw/$dev" --split dev --sample 100
done

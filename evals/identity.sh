#!/bin/bash
# Byte-identity of a code change: the stages after SAE training (collect, lineage, label, report)
# re-run on copies of a finished demo run with the code of OLD (e.g. a `git worktree add` of the
# old commit) and of NEW, `score --stats-only` on the dev file with each, then every output
# compared. The LLM answers come from the run's cache.sqlite, so no model output varies.
#   bash evals/identity.sh OLD_CHECKOUT [NEW_CHECKOUT] [RUN]
set -u
OLD=$(realpath "$1"); NEW=$(realpath "${2:-.}"); RUN=$(realpath "${3:-runs/demo}")
PY=$NEW/.venv/bin/python
DEV=$NEW/../shared/data/llmjp_sae_human_labels.dev.jsonl.gz
OUT=$(mktemp -d)
for X in old new; do
  CODE=$NEW; [ $X = old ] && CODE=$OLD
  D=$OUT/run-$X; mkdir -p $D
  cp -r $RUN/lm $RUN/cache.sqlite $RUN/manifest.json $D/
  for s in $RUN/step-*; do mkdir -p $D/$(basename $s); cp -r $s/sae $D/$(basename $s)/; done
  echo "== $X: $CODE"
  ( cd $OUT && export PYTHONPATH=$CODE && $PY -m autointerp.cli collect $D && $PY -m autointerp.cli lineage $D --sample all \
    && $PY -m autointerp.cli label $D --features 4 && $PY -m autointerp.cli report $D ) > $D.log 2>&1 || echo "failed: $D.log"
  mkdir -p $OUT/dev-$X; cp $DEV $OUT/dev-$X/records.jsonl.gz
  ( cd $OUT && PYTHONPATH=$CODE $PY -m autointerp.cli score $OUT/dev-$X/records.jsonl.gz --stats-only ) 2>&1 | tail -1
done
cd $OUT
for f in $(cd run-new && find . -name "*.jsonl" -o -name "*.jsonl.zst" -o -name "*.html" | sort); do
  a=run-old/$f; b=run-new/$f
  if [[ $f == *.zst ]]; then cmp -s <(zstd -dc $a) <(zstd -dc $b) && echo "same $f" || echo "DIFF $f"
  else cmp -s $a $b && echo "same $f" || echo "DIFF $f"; fi
done
cmp -s dev-old/labels.jsonl dev-new/labels.jsonl && echo "same dev labels.jsonl" || echo "DIFF dev labels.jsonl"
echo "outputs in $OUT"

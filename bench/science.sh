#!/usr/bin/env bash
# The README's science section: both bundled sequences, 5 task orders, methods finetune,
# average, pam, ties, magmax, condu (nothing tuned per method: one learning rate per sequence,
# chosen by `adb run` on a validation split), 2 worker processes; then `bench/science.py`
# prints the markdown for bench/RESULTS.md and writes bench/out/science/science.json.
# Then the whole-layer methods of issue 15 (LAYER_METHODS) on the same stores: they merge the
# independent experts the first run trained (reused by fingerprint), so they cost merges and
# evals only; their table rows come from <seq>.layer.json.
# Resumable: finished steps are found in the stores and skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
ADB=.venv/bin/adb
OUT=${SCIENCE_OUT:-bench/out/science}
ORDERS=${ORDERS:-5}
JOBS=${JOBS:-2}
METHODS=finetune,average,pam,ties,magmax,condu
LAYER_METHODS=${LAYER_METHODS:-opcm,continual_ta,continual_ties,tsv,iso_c,iso_cts,knots,dop}
bash bench/debian-data.sh
mkdir -p "$OUT"
for seq in split-fashion-mnist split-wordnet; do
  [ -d "$OUT/$seq/.adb" ] || $ADB init "$OUT/$seq" >/dev/null
  SECONDS=0
  $ADB --store "$OUT/$seq" run "$seq" --methods "$METHODS" --orders "$ORDERS" --jobs "$JOBS" \
    --json > "$OUT/$seq.json"
  echo "$SECONDS" > "$OUT/$seq.time"
  SECONDS=0
  $ADB --store "$OUT/$seq" run "$seq" --methods "$LAYER_METHODS" --orders "$ORDERS" \
    --jobs "$JOBS" --json > "$OUT/$seq.layer.json"
  echo "$SECONDS" > "$OUT/$seq.layer.time"
  $ADB --store "$OUT/$seq" report -o "$OUT/$seq-report" >/dev/null
done
.venv/bin/python bench/science.py "$OUT"

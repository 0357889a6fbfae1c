#!/usr/bin/env bash
# The README's science checks on the demo sequence: 4 methods over 3 task orders, a PAM p sweep
# (30/50/70, same orders), then `bench/science.py` summarises everything into
# bench/out/science.json and prints the markdown for bench/RESULTS.md. Resumable.
set -euo pipefail
cd "$(dirname "$0")/.."
ADB=.venv/bin/adb
OUT=bench/out/science
ORDERS=${ORDERS:-3}
mkdir -p "$OUT"
SEQ=$(.venv/bin/python -c "from adapterdb.cli.run import sequence_path; print(sequence_path('split-fashion-mnist'))")
for run in main p30 p70; do
  [ -d "$OUT/$run/.adb" ] || $ADB init "$OUT/$run" >/dev/null
done
$ADB --store "$OUT/main" run split-fashion-mnist --methods finetune,average,pam,condu \
  --orders "$ORDERS" --json > "$OUT/main.json"
for p in 30 70; do
  sed -e "s/align: {p: 50,/align: {p: $p,/" -e "s/^name: split-fashion-mnist/name: split-fashion-mnist-p$p/" \
    "$SEQ" > "$OUT/p$p.yaml"
  $ADB --store "$OUT/p$p" run "$OUT/p$p.yaml" --methods pam --orders "$ORDERS" --json > "$OUT/p$p.json"
done
$ADB --store "$OUT/main" report -o "$OUT/report" >/dev/null
.venv/bin/python bench/science.py "$OUT"

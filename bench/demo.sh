#!/usr/bin/env bash
# `make demo`: the main job on the bundled default. Split-Fashion-MNIST (5 confusable pairs) on
# pretrained EfficientNet-Lite0 with LoRA; methods finetune, average, pam, condu (routing on).
# Re-running resumes: finished steps are found in the store and skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
ADB=.venv/bin/adb
STORE=${DEMO_STORE:-bench/out/demo}
# Data from Debian packages: Fashion-MNIST for the demo, WordNet for `adb run split-wordnet`.
bash bench/debian-data.sh fashion-mnist
bash bench/debian-data.sh wordnet || echo "(the demo goes on: only split-wordnet needs WordNet)" >&2

mkdir -p "$STORE"
[ -d "$STORE/.adb" ] || $ADB init "$STORE"
export ADB_STORE="$STORE"
time $ADB run split-fashion-mnist --methods "${DEMO_METHODS:-finetune,average,pam,condu}" \
  --orders "${DEMO_ORDERS:-1}"
$ADB report -o "$STORE/report"
echo "report: $STORE/report/report.md"

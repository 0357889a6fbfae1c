#!/usr/bin/env bash
# `make demo`: the main job on the bundled default. Split-Fashion-MNIST (5 confusable pairs) on
# pretrained EfficientNet-Lite0 with LoRA; methods finetune, average, pam, condu (routing on).
# Re-running resumes: finished steps are found in the store and skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
ADB=.venv/bin/adb
STORE=${DEMO_STORE:-bench/out/demo}
FMNIST=${ADB_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}

if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ] && [ ! -f "$FMNIST/train-images-idx3-ubyte" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing Debian's dataset-fashion-mnist (the official idx files)"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "Fashion-MNIST not found in $FMNIST: install Debian's dataset-fashion-mnist, or put the" >&2
    echo "four official idx files (train/t10k images and labels, .gz or not) in a folder and set" >&2
    echo "ADB_FASHION_MNIST=/that/folder" >&2
    exit 1
  fi
fi

mkdir -p "$STORE"
[ -d "$STORE/.adb" ] || $ADB init "$STORE"
export ADB_STORE="$STORE"
time $ADB run split-fashion-mnist --methods "${DEMO_METHODS:-finetune,average,pam,condu}" \
  --orders "${DEMO_ORDERS:-1}"
$ADB report -o "$STORE/report"
echo "report: $STORE/report/report.md"

#!/usr/bin/env bash
# `adb train` on a GPU in bf16, end to end: two Split-Fashion-MNIST tasks on EfficientNet-Lite0
# (train -> merge -> train with PAM alignment against the global -> merge --method pam -> eval),
# then the whole demo sequence in bf16. Every step must say where it ran: the expert commits
# record accelerate's device and precision, and the script fails unless they read cuda + bf16.
# Usage: bash bench/cuda_check.sh [OUT_DIR]   (ADB=path/to/adb, ADB_FASHION_MNIST=idx folder)
set -euo pipefail
cd "$(dirname "$0")/.."
ADB=${ADB:-.venv/bin/adb}
OUT=${1:-bench/out/cuda}
PY=$(head -1 "$(command -v "$ADB")" | sed 's/^#!//')
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, torch.cuda.get_device_name(0))"

rm -rf "$OUT" && mkdir -p "$OUT"
export ADB_STORE="$OUT/store"
$ADB init "$ADB_STORE"
for pair in "tshirt-shirt 0 6" "sandal-sneaker 5 7"; do
  set -- $pair
  cat >"$OUT/$1.yaml" <<EOF
name: $1
model: {packaged: efficientnet-lite0}
data: {builtin: fashion-mnist, classes: [$2, $3], limit: 2000, eval_limit: 1000, image_size: 64}
lora: {r: 8, alpha: 16}
optim: {lr: 3.0e-3, steps: 200, batch_size: 64, precision: bf16}
align: {p: 50, every: 10}
EOF
done

$ADB train "$OUT/tshirt-shirt.yaml"
$ADB merge --method average --into main
$ADB train "$OUT/sandal-sneaker.yaml"
$ADB merge --method pam --into main
$ADB eval main --tasks "$OUT/tshirt-shirt.yaml" "$OUT/sandal-sneaker.yaml" --json >"$OUT/eval.json"
cat "$OUT/eval.json"
for task in tshirt-shirt sandal-sneaker; do
  $ADB show "experts/main/$task" --json >"$OUT/expert-$task.json"
done
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
for name in ("tshirt-shirt", "sandal-sneaker"):
    stats = json.loads((out / f"expert-{name}.json").read_text())["stats"]
    checks = len(stats["align_checks"])
    print(f"{name}: trained on {stats['device']}, {stats['train_seconds']:.1f}s, {checks} checks")
    assert stats["device"].startswith("cuda") and " bf16 " in stats["device"], stats["device"]
second = json.loads((out / "expert-sandal-sneaker.json").read_text())["stats"]
assert second["align_checks"], "the second task must run PAM alignment checks"
EOF

# The demo's sequence, all four methods, in bf16 on the GPU.
sed 's/optim: {/optim: {precision: bf16, /' trainers/sequences/split-fashion-mnist.yaml \
  >"$OUT/sequence.yaml"
export ADB_STORE="$OUT/demo"
$ADB init "$ADB_STORE"
start=$(date +%s)
$ADB run "$OUT/sequence.yaml" --methods finetune,average,pam,condu
echo "demo sequence on the GPU: $(($(date +%s) - start)) s"

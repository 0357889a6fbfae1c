#!/usr/bin/env bash
# Wall time of whole `adb merge --into` commands, start-up included: two Gemma-2B-shaped fp32
# LoRAs (bench/shapes.py, 157 MB each) imported into a store, then `average` and `ties` of a
# branch holding the first with the second, 3 runs each, printed in seconds.
# Usage: bash bench/merge_verb.sh [WORK_DIR]   (ADB=path/to/adb, default .venv/bin/adb)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ADB=${ADB:-$ROOT/.venv/bin/adb}
PY=$(head -1 "$(command -v "$ADB")" | sed 's/^#!//')
W=${1:-bench/out/merge_verb}
rm -rf "$W" && mkdir -p "$W" && cd "$W"
"$PY" - "$ROOT/bench" <<'EOF'
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, sys.argv[1])
from shapes import gemma_like_config, gemma_like_lora

for i in range(2):
    folder = Path(f"a{i}")
    folder.mkdir()
    save_file(gemma_like_lora(seed=i), str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(gemma_like_config()))
EOF
$ADB init . >/dev/null
$ADB import a0 -b t0 >/dev/null
$ADB import a1 -b t1 >/dev/null
for method in average ties; do
  for run in 1 2 3; do
    $ADB branch "$method$run" t0 >/dev/null
    start=$(date +%s%N)
    $ADB merge --method "$method" --into "$method$run" t1 >/dev/null
    end=$(date +%s%N)
    echo "$method run $run: $(((end - start) / 1000000)) ms"
  done
done

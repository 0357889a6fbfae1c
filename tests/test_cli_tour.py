"""The README's CLI tour runs as written, top to bottom, each line through bash."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import adb_env, make_peft
from readme_blocks import block


def test_readme_cli_tour_runs_line_by_line(tmp_path: Path) -> None:
    for i in (1, 2, 3):
        make_peft(tmp_path / f"lora-task{i}", seed=i)
    bin_dir = str(Path(sys.executable).parent)
    env = adb_env({"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"})
    outputs = {}
    for line in block("cli-tour").splitlines():
        proc = subprocess.run(
            ["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"`{line}` failed ({proc.returncode}): {proc.stderr}"
        outputs[line.split("#")[0].strip()] = proc.stdout
    # the session is coherent: the expert waits, the reset undoes the regretted merge
    assert "t2" in outputs["adb status"] and "wait to be merged" in outputs["adb status"]
    assert outputs["adb reset main@{1}"].startswith("main is now at")
    assert "merge t2 with pam" in outputs["adb reset main@{1}"]
    assert "refs/experts/main/t3" in outputs["adb log --all"]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()

"""train.py's configuration errors end in one line naming the fix, with no traceback and nothing written."""

import os
import subprocess
import sys

from .docs.commands import ROOT


def test_train_before_stage_1_says_to_run_stage_1_in_one_line(tmp_path):
    """The demo's stage 2 needs models/demo/vae.safetensors; under an empty LDM_ROOT it is missing."""
    environment = {**os.environ, "LDM_ROOT": str(tmp_path), "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "train.py", "logger=none"], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "model.vae_weights=" in errors[0] and "vae.safetensors" in errors[0]
    assert "python train.py experiment=demo_vae" in errors[0] and "make demo" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # stopped before the built-in set was generated

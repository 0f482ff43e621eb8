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
    assert "model.latents.vae_weights=" in errors[0] and "vae.safetensors" in errors[0]
    assert "python train.py experiment=demo_vae" in errors[0] and "make demo" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # stopped before the built-in set was generated


def test_train_refuses_a_ckpt_path_that_is_not_a_weights_only_checkpoint_in_one_line(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    environment = {**os.environ, "LDM_ROOT": str(tmp_path), "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "train.py", "logger=none", "model.latents.vae_weights=null", f"ckpt_path={junk}",
                             "data.synthetic.num_train=64", "data.synthetic.num_val=16",
                             "data.synthetic.samples_per_shard=32"], cwd=ROOT, env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(junk) in errors[0], result.stderr
    assert "weights_only=False" not in result.stderr and "Traceback" not in result.stderr

"""FSDP parts that run on the CPU: the wrapping (U-Net sharded per block, frozen encoders left whole and out of
the optimizer), a step with the EMA on shards, and a sharded checkpoint consolidated and loaded in one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from ldm.training.fsdp import UNetFSDPStrategy

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def test_trainer_fsdp_config_builds_the_unet_strategy_and_lightning_keeps_fsdp_off_the_cpu():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, UNetFSDPStrategy) and strategy._state_dict_type == "sharded"
    assert isinstance(strategy.kwargs["auto_wrap_policy"], ModuleWrapPolicy) and strategy.kwargs["use_orig_params"]
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", devices=1, strategy="fsdp")


@pytest.mark.whole_machine
@pytest.mark.slow
def test_fsdp_wraps_the_unet_only_its_sharded_checkpoint_loads_in_one_process_and_rank_zero_samples_it_whole(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", FSDP_TEST_PORT="29563")
    result = subprocess.run([sys.executable, str(HERE / "fsdp_cpu_run.py"), str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    report = torch.load(tmp_path / "report.pt", weights_only=True)

    from tests.training.fsdp_cpu_run import tiny_module

    single = tiny_module()
    whole = {name: sum(p.numel() for p in getattr(single, name).parameters()) for name in ("network", "vae", "text_encoder")}
    assert report["units"].count("UNetModel") == 2  # the U-Net and its EMA copy
    assert report["units"].count("TimestepEmbedSequential") == 2 * len(
        [m for m in single.network.modules() if type(m).__name__ == "TimestepEmbedSequential"])
    assert report["managed_frozen"] == []  # no VAE or text-encoder parameter inside a FlatParameter
    assert report["optimizer_is_unet"]
    assert report["local_numel"]["vae"] == whole["vae"] and report["local_numel"]["text_encoder"] == whole["text_encoder"]
    assert report["local_numel"]["network"] < 0.6 * whole["network"]  # about half of the U-Net per rank

    consolidated = tmp_path / "single.ckpt"
    subprocess.run([sys.executable, "-m", "lightning.pytorch.utilities.consolidate_checkpoint",
                    str(tmp_path / "sharded.ckpt"), "--output_file", str(consolidated)], check=True, env=env,
                   capture_output=True)
    checkpoint = torch.load(consolidated, map_location="cpu", weights_only=True)
    single.load_state_dict(checkpoint["state_dict"], strict=True)
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(value, full[key], rtol=0, atol=0, msg=key)
    assert checkpoint["global_step"] == 1 and len(checkpoint["optimizer_states"]) == 1
    # The first EMA update (made on the shards) copies the weights: the gathered EMA equals the U-Net.
    for key, value in single.network.state_dict().items():
        torch.testing.assert_close(single.ema_network.module.state_dict()[key], value, rtol=0, atol=0)
    # Rank 0's images from the gathered EMA U-Net are the consolidated model's images.
    from tests.training.fsdp_cpu_run import SAMPLE_OPTIONS, SAMPLE_PROMPTS

    expected = single.pipeline(use_ema=True)(SAMPLE_PROMPTS, height=32, width=32, **SAMPLE_OPTIONS)
    torch.testing.assert_close(report["images"], expected, rtol=0, atol=1e-6)

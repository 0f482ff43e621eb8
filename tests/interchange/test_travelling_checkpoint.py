"""A training checkpoint copied elsewhere, its run's models/ folder gone: sample, eval and export work when
given the frozen VAE file (option or LDM_ROOT); without it one line names the file, its hash and the option;
a different file of the same name is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.checkpoints import save_weights
from ldm.interchange.frozen_files import FrozenFileError, file_sha256
from ldm.pipeline import TextToImagePipeline
from ldm.tools.export import main as export_main
from ldm.tools.sample import main as sample_main

from .conftest import build_module

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def travelled(trained_run, tmp_path):
    """(copied checkpoint, the VAE file now in ``stash/models/demo/``, its sha256); the original models folder is
    moved away for the test and put back after it."""
    models = trained_run.parents[5] / "models"
    vae_file = models / "demo" / "vae.safetensors"
    sha256 = file_sha256(vae_file)
    copy = tmp_path / "elsewhere" / "last.ckpt"
    copy.parent.mkdir()
    shutil.copy(trained_run, copy)
    stash = tmp_path / "stash"
    stash.mkdir()
    shutil.move(models, stash / "models")
    try:
        yield copy, stash / "models" / "demo" / "vae.safetensors", sha256
    finally:
        shutil.move(stash / "models", models)


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "LDM_ROOT"}
    environment.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=300)


def test_checkpoint_records_each_frozen_file_it_leaves_out(trained_run):
    checkpoint = torch.load(trained_run, map_location="cpu", weights_only=True)
    assert not any(key.startswith("vae.") for key in checkpoint["state_dict"])
    record = checkpoint["ldm_frozen_files"]["vae_weights"]
    vae_file = trained_run.parents[5] / "models" / "demo" / "vae.safetensors"
    assert record["resolved_path"] == str(vae_file.resolve())
    assert record["size"] == vae_file.stat().st_size and record["sha256"] == file_sha256(vae_file)


def test_moved_checkpoint_works_given_the_file_by_option_or_ldm_root(travelled, trained_run, tmp_path, monkeypatch):
    copy, vae_file, _ = travelled
    expected = TextToImagePipeline.from_pretrained(copy, vae_weights=vae_file)
    assert torch.equal(expected.vae.decoder.conv_out.weight, build_vae(0).decoder.conv_out.weight)

    paths = sample_main(["--model", str(copy), "--vae-weights", str(vae_file), "--prompt", "a red circle",
                         "--steps", "2", "--out-dir", str(tmp_path / "by_option")])
    assert len(paths) == 1 and paths[0].is_file()
    monkeypatch.setenv("LDM_ROOT", str(vae_file.parents[2]))  # stash/: models/demo/vae.safetensors below it
    paths = sample_main(["--model", str(copy), "--prompt", "a red circle", "--steps", "2",
                         "--out-dir", str(tmp_path / "by_root")])
    assert paths[0].read_bytes() == (tmp_path / "by_option" / paths[0].name).read_bytes()
    exported = export_main(["--model", str(copy), "--format", "diffusers", "--out", str(tmp_path / "exported")])
    assert (exported / "vae" / "diffusion_pytorch_model.safetensors").is_file()

    monkeypatch.delenv("LDM_ROOT")
    eval_dir = tmp_path / "eval"
    completed = subprocess.run([
        sys.executable, str(ROOT / "eval.py"), f"ckpt_path={copy}", f"vae_weights={vae_file}",
        f"paths.root_dir={tmp_path}", f"hydra.run.dir={eval_dir}", "logger=none",
        "eval/feature_extractor@feature_extractor=pooled_pixels", "data.synthetic.num_train=64",
        "data.synthetic.num_val=16", "data.synthetic.samples_per_shard=32", "eval.num_samples=4",
        "eval.num_inference_steps=2", "eval.batch_size=4", "eval.kid_subsets=2", "eval.num_grid_images=2", "eval.prdc_k=2",
    ], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads((eval_dir / "results.json").read_text())["num_samples"] == 4


def build_vae(seed: int):
    torch.manual_seed(seed)
    return build_module().vae


def test_missing_frozen_file_is_named_in_one_line_with_its_hash_and_option(travelled):
    copy, _, sha256 = travelled
    for module, args in (("ldm.tools.sample", ["--prompt", "x"]), ("ldm.tools.export", ["--out", "never"])):
        completed = run_tool(module, "--model", str(copy), *args)
        assert completed.returncode == 2
        lines = completed.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in completed.stderr, completed.stderr
        assert "vae.safetensors" in lines[0] and sha256 in lines[0] and "--vae-weights" in lines[0]
    assert not (ROOT / "never").exists()


def test_a_different_file_with_the_same_name_is_refused(travelled, tmp_path):
    copy, vae_file, sha256 = travelled
    other = tmp_path / "other" / "models" / "demo" / "vae.safetensors"
    save_weights(build_vae(1), other, metadata={"latent_scale_factor": 0.8})
    other_sha256 = file_sha256(other)
    with pytest.raises(FrozenFileError, match=f"{other_sha256}.*{sha256}"):
        TextToImagePipeline.from_pretrained(copy, vae_weights=other)
    with pytest.raises(FrozenFileError, match="is another file"):
        TextToImagePipeline.from_pretrained(copy, search_dirs=[tmp_path / "other"])
    assert TextToImagePipeline.from_pretrained(copy, search_dirs=[tmp_path / "other", vae_file.parents[2]])

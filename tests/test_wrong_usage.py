"""Wrong usage of train.py, eval.py and the tools ends with one line that names the wrong key, value or file, and
with the documented exit status (tools: 2, train.py and eval.py: 1); a refused write leaves the file untouched.

Every case runs in this process: the tools' ``main(argv)`` under ``run_cli`` (what ``python -m`` runs), and train.py's
and eval.py's own functions on a composed config, so that a case costs the check and not a Python start-up."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image

from ldm.checkpoints import CheckpointMismatchError, check_resumable
from ldm.config import one_line_config_errors, register_resolvers
from ldm.interchange.frozen_files import file_sha256
from ldm.tools import export, make_shards, posthoc_ema, precompute_latents, sample
from ldm.tools.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["experiment=demo", "model.latents.vae_weights=null", "logger=none", "callbacks=default", "trainer.max_steps=1",
            "trainer.limit_val_batches=0", "trainer.max_time=null", "trainer.enable_progress_bar=false",
            "ckpt_path=null", "data.synthetic.num_train=64", "data.synthetic.num_val=8",
            "data.synthetic.samples_per_shard=32", "data.batch_size=4", "data.num_workers=0",
            "data.train_epoch_length=8"]


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Tiny inputs shared by all cases: existing outputs, files that are no shard, a table, images, shards."""
    root = tmp_path_factory.mktemp("misuse")
    paths = {"root": root}
    paths["existing_file"] = root / "existing.safetensors"
    paths["existing_file"].write_bytes(b"someone's model")
    paths["existing_folder"] = root / "existing_folder"
    paths["existing_folder"].mkdir()
    (paths["existing_folder"] / "model_index.json").write_text("{}")
    paths["not_a_tar"] = root / "notatar.tar"
    paths["not_a_tar"].write_text("hello")
    paths["empty_tar"] = root / "empty.tar"
    paths["empty_tar"].write_bytes(b"")
    images = root / "images"
    images.mkdir()
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    (images / "a.png").write_bytes(buffer.getvalue())
    (images / "a.txt").write_text("a black square")
    paths["images"] = images
    paths["uncaptioned"] = root / "uncaptioned"
    paths["uncaptioned"].mkdir()
    (paths["uncaptioned"] / "a.png").write_bytes(buffer.getvalue())
    paths["table"] = root / "list.csv"
    paths["table"].write_text("file,text\nimages/a.png,a black square\n")
    paths["shards"] = root / "shards"
    assert make_shards.main(["--images-dir", str(images), "--out-dir", str(paths["shards"])])["samples"] == 1
    paths["latents_other"] = root / "latents_other"
    paths["latents_other"].mkdir()
    (paths["latents_other"] / "latents.json").write_text(json.dumps({"format": 1, "resolution": 16, "vae": {},
                                                                     "vae_weights": None}))
    paths["models"] = root / "models"
    (paths["models"] / "demo").mkdir(parents=True)
    (paths["models"] / "demo" / "vae.safetensors").write_bytes(b"the stage-1 VAE of the checkpoints")
    write_tar(paths["latents_other"] / "train-000000.tar", {"000.latent_mean.npy": b"x", "000.txt": b"y"})
    return paths


def run_tool(main: Callable, argv: list[str], capsys) -> tuple[int, list[str]]:
    """A tool as ``python -m`` runs it: exit status and the lines on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_cli(main, argv)
    return stopped.value.code, capsys.readouterr().err.strip().splitlines()


def load_train_entry():
    spec = importlib.util.spec_from_file_location("train_entry_for_misuse", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def composed(config_name: str, overrides: list[str], root: Path):
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name, return_hydra_config=True, overrides=overrides)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(root)
        cfg.paths.output_dir = str(root / "run")
        del cfg.hydra
    return cfg


def run_entry(config_name: str, overrides: list[str], root: Path, capsys) -> tuple[int, list[str]]:
    """train.py's ``train`` or eval.py's body on a composed config, under their one-line error handling."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped, one_line_config_errors():
        cfg = composed(config_name, overrides, root)
        if config_name == "train":
            load_train_entry().train(cfg)
        else:
            from ldm.config import check_run_config
            from ldm.evaluation.job import run_evaluation

            check_run_config(cfg, "eval")
            run_evaluation(cfg, device=torch.device("cpu"))
    return stopped.value.code, capsys.readouterr().err.strip().splitlines()


# (tool, argv with {name} for the inputs' paths, what the one line must contain, the file a refused write keeps)
TOOL_CASES = {
    "sample lora-scale nan": (sample, "--model {root}/m --prompt x --lora-scale nan", "--lora-scale: nan", None),
    "sample guidance inf": (sample, "--model {root}/m --prompt x --guidance-scale inf", "--guidance-scale: inf", None),
    "sample steps 0": (sample, "--model {root}/m --prompt x --steps 0", "--steps: 0 must be", None),
    "sample num-images -1": (sample, "--model {root}/m --prompt x --num-images -1", "--num-images", None),
    "sample eta nan": (sample, "--model {root}/m --prompt x --eta nan", "--eta: nan", None),
    "sample seed -1": (sample, "--model {root}/m --prompt x --seed -1", "--seed: -1", None),
    "sample size malformed": (sample, "--model {root}/m --prompt x --size 32by64", "--size", None),
    "sample height abc": (sample, "--model {root}/m --prompt x --height abc", "--height", None),
    "sample unknown sampler": (sample, "--model {root}/m --prompt x --sampler foo", "--sampler", None),
    "sample size and height": (sample, "--model {root}/m --prompt x --size 32x32 --height 32", "--size", None),
    "sample eta without ddim": (sample, "--model {root}/m --prompt x --eta 0.5 --sampler euler", "--eta", None),
    "sample no prompt": (sample, "--model {root}/m", "--prompt", None),
    "sample missing prompts file": (sample, "--model {root}/m --prompts-file {root}/gone.txt", "gone.txt", None),
    "sample missing model": (sample, "--model {root}/gone.ckpt --prompt x", "gone.ckpt", None),
    "sample model not a checkpoint": (sample, "--model {not_a_tar} --prompt x", "notatar.tar", None),
    "sample out-dir not empty": (sample, "--model {root}/m --prompt x --out-dir {existing_folder}",
                                 "existing_folder exists; set --overwrite", "existing_folder"),
    "export lora-scale nan": (export, "--model {root}/m --out {root}/new.safetensors --lora-scale nan",
                              "--lora-scale: nan", None),
    "export sd onto a file": (export, "--model {root}/m --format sd --out {existing_file}",
                              "existing.safetensors exists; set --overwrite", "existing_file"),
    "export lora onto a file": (export, "--model {root}/m --format lora --out {existing_file}",
                                "existing.safetensors exists; set --overwrite", "existing_file"),
    "export diffusers onto a folder": (export, "--model {root}/m --format diffusers --out {existing_folder}",
                                       "existing_folder exists; set --overwrite", "existing_folder"),
    "export unknown format": (export, "--model {root}/m --format onnx --out {root}/x", "--format", None),
    "export missing model": (export, "--model {root}/gone.ckpt --out {root}/x", "gone.ckpt", None),
    "export lora without merge": (export, "--model {root}/m --lora {existing_file} --out {root}/x", "--merge-lora",
                                  None),
    "posthoc sigma-rel nan": (posthoc_ema, "--model {root}/m --snapshots {root} --sigma-rel nan --out {root}/x",
                              "--sigma-rel: nan", None),
    "posthoc sigma-rel too large": (posthoc_ema, "--model {root}/m --snapshots {root} --sigma-rel 0.5 --out {root}/x",
                                    "--sigma-rel 0.5 must lie in (0, 0.28)", None),
    "posthoc step -1": (posthoc_ema, "--model {root}/m --snapshots {root} --sigma-rel 0.1 --step -1 --out {root}/x",
                        "--step: -1", None),
    "posthoc onto a file": (posthoc_ema, "--model {root}/m --snapshots {root} --sigma-rel 0.1 --format sd "
                            "--out {existing_file}", "existing.safetensors exists; set --overwrite", "existing_file"),
    "make_shards samples-per-shard 0": (make_shards, "--images-dir {images} --out-dir {root}/s0 "
                                        "--samples-per-shard 0", "--samples-per-shard: 0 must be", None),
    "make_shards samples-per-shard nan": (make_shards, "--images-dir {images} --out-dir {root}/s0 "
                                          "--samples-per-shard nan", "--samples-per-shard", None),
    "make_shards missing images dir": (make_shards, "--images-dir {root}/gone --out-dir {root}/s0", "gone", None),
    "make_shards missing table": (make_shards, "--csv {root}/gone.csv --out-dir {root}/s0", "gone.csv", None),
    "make_shards table without the column": (make_shards, "--csv {table} --out-dir {root}/s0",
                                             "has no column 'path' (--path-column)", None),
    "make_shards nothing captioned": (make_shards, "--images-dir {uncaptioned} --out-dir {root}/s1",
                                      "no sample was written ({'missing_caption': 1})", None),
    "make_shards into shards": (make_shards, "--images-dir {images} --out-dir {shards}",
                                "shards exists; set --overwrite", "shards"),
    "make_shards out-dir is a file": (make_shards, "--images-dir {images} --out-dir {existing_file}",
                                      "existing.safetensors is a file", "existing_file"),
    "precompute resolution 0": (precompute_latents, "--shards {not_a_tar} --out-dir {root}/l --vae v.yaml "
                                "--resolution 0", "--resolution: 0 must be", None),
    "precompute resolution nan": (precompute_latents, "--shards {not_a_tar} --out-dir {root}/l --vae v.yaml "
                                  "--resolution nan", "--resolution", None),
    "precompute batch-size 0": (precompute_latents, "--shards {not_a_tar} --out-dir {root}/l --vae v.yaml "
                                "--resolution 32 --batch-size 0", "--batch-size: 0 must be", None),
    "precompute part -1": (precompute_latents, "--shards {not_a_tar} --out-dir {root}/l --vae v.yaml "
                           "--resolution 32 --part -1", "--part: -1", None),
    "precompute min-width 0": (precompute_latents, "--shards {not_a_tar} --out-dir {root}/l --vae v.yaml "
                               "--resolution 32 --min-width 0", "--min-width: 0", None),
    "precompute buckets not json": (precompute_latents, "--shards {not_a_tar} --out-dir {root}/l --vae v.yaml "
                                    "--resolution 32 --buckets [[32,", "--buckets", None),
    "precompute missing vae config": (precompute_latents, "--shards {not_a_tar} --out-dir {root}/l "
                                      "--vae {root}/gone.yaml --resolution 32", "gone.yaml: no such config", None),
}

TINY_VAE = str(ROOT / "configs/model/vae/tiny.yaml")
TOOL_CASES["precompute part beyond num-parts"] = (
    precompute_latents, f"--shards {{not_a_tar}} --out-dir {{root}}/l --vae {TINY_VAE} --resolution 32 "
    "--num-parts 2 --part 3", "--part 3 must lie in [0, --num-parts 2)", None)
TOOL_CASES["precompute into latents of other settings"] = (
    precompute_latents, f"--shards {{not_a_tar}} --out-dir {{latents_other}} --vae {TINY_VAE} --resolution 32",
    "latents.json was written with other settings", "latents_other")


@pytest.mark.parametrize("case", sorted(TOOL_CASES))
def test_a_tool_refuses_wrong_usage_in_one_line(case, inputs, capsys):
    tool, argv, expected, kept = TOOL_CASES[case]
    kept_hash = file_sha256(inputs[kept]) if kept else None
    code, lines = run_tool(tool.main, argv.format(**{k: str(v) for k, v in inputs.items()}).split(" "), capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    if kept:
        assert file_sha256(inputs[kept]) == kept_hash


# A run of its own (not TINY_RUN's): data=latents.
LATENT_RUN = ["experiment=demo", "data=latents", "model.latents.vae_weights=null", "logger=none", "callbacks=default",
              "trainer.max_steps=1", "trainer.limit_val_batches=0", "trainer.max_time=null", "ckpt_path=null",
              "data.batch_size=4", "data.num_workers=0", "data.train_epoch_length=8"]

# (config, overrides with {name} for the inputs' paths, what the one line must contain, the file a refused write
# keeps); train cases start from TINY_RUN unless they name an experiment of their own.
ENTRY_CASES = {
    "train typo of a top-level key": ("train", ["+ckpt_pth=x"], "ckpt_pth is not a key of train.yaml; did you mean "
                                                                "ckpt_path?", None),
    "train unknown nested key": ("train", ["+data.resolutoin=32"], "data.resolutoin is not an argument", None),
    "train max_steps 0": ("train", ["trainer.max_steps=0"], "trainer.max_steps=0 must be >= 1", None),
    "train val_check_interval 0": ("train", ["trainer.val_check_interval=0"], "trainer.val_check_interval=0", None),
    "train accumulate 0": ("train", ["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0", None),
    "train clip nan": ("train", ["trainer.gradient_clip_val=nan"], "trainer.gradient_clip_val=nan must be a finite",
                       None),
    "train limit_val_batches -1": ("train", ["trainer.limit_val_batches=-1"], "trainer.limit_val_batches=-1", None),
    "train seed -5": ("train", ["seed=-5"], "seed=-5 must be >= 0", None),
    "train lr nan": ("train", ["model.optimizer.lr=nan"], "model.optimizer.lr=nan", None),
    "train ema decay 1.5": ("train", ["model.ema_decay=1.5"], "model.ema_decay=1.5", None),
    "train caption dropout nan": ("train", ["data.caption_dropout_prob=nan"], "data.caption_dropout_prob=nan", None),
    "train resolution the U-Net cannot divide": ("train", ["data.resolution=36"], "data.resolution=36", None),
    "train shard not a tar": ("train", ["data.train_shards={not_a_tar}"], "notatar.tar is not a tar archive", None),
    "train shard empty": ("train", ["data.train_shards={empty_tar}"], "empty.tar is an empty file", None),
    "train shards missing": ("train", ["data.train_shards='{root}/gone-{{0..3}}.tar'"], "no file matched", None),
    "train ckpt_path missing": ("train", ["ckpt_path={root}/gone.ckpt"], "gone.ckpt", None),
    "train ckpt_path not a checkpoint": ("train", ["ckpt_path={not_a_tar}"], "ckpt_path=", None),
    "train latents of another resolution": (
        "train", [*LATENT_RUN, "data.train_shards={latents_other}/train-000000.tar", "data.resolution=32"],
        "data.resolution=32, but the latents in", None),
    "train stage 1 onto its VAE": ("train", ["experiment=demo_vae", "logger=none", "ckpt_path=null"],
                                   "vae.safetensors exists; set overwrite=true", "models"),
    "eval typo of a top-level key": ("eval", ["ckpt_path=x", "+vae_weight=x"], "vae_weight is not a key of eval.yaml",
                                     None),
    "eval num_samples 0": ("eval", ["ckpt_path=x", "eval.num_samples=0"], "eval.num_samples", None),
    "eval guidance nan": ("eval", ["ckpt_path=x", "eval.guidance_scales=[nan]"], "eval.guidance_scales", None),
    "eval seed nan": ("eval", ["ckpt_path=x", "seed=nan"], "seed=nan", None),
    "eval ckpt_path missing": ("eval", ["ckpt_path={root}/gone.ckpt", "logger=none"], "gone.ckpt", None),
}


@pytest.mark.parametrize("case", sorted(ENTRY_CASES))
def test_train_and_eval_refuse_wrong_usage_in_one_line(case, inputs, capsys):
    config_name, overrides, expected, kept = ENTRY_CASES[case]
    kept_hash = file_sha256(inputs[kept]) if kept else None
    values = {k: str(v) for k, v in inputs.items()}
    own_run = any(override.startswith("experiment=") for override in overrides)
    prefix = TINY_RUN if config_name == "train" and not own_run else []
    code, lines = run_entry(config_name, [*prefix, *(o.format(**values) for o in overrides)], inputs["root"], capsys)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    if kept:
        assert file_sha256(inputs[kept]) == kept_hash


def test_a_checkpoint_of_another_architecture_is_refused_naming_both_configs():
    """``check_resumable`` (called by the module before Lightning loads the weights): both values of each differing
    key, from the config the checkpoint records and the run's."""
    saved = {"network.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3), "network.out.2.weight": torch.zeros(4, 32, 3, 3)}
    state = {"network.input_blocks.0.0.weight": torch.zeros(64, 4, 3, 3), "network.out.2.weight": torch.zeros(4, 64, 3, 3)}
    checkpoint = {"state_dict": saved, "ldm_model_config": {"network": {"model_channels": 32, "num_heads": 4}}}
    with pytest.raises(CheckpointMismatchError, match=r"ckpt_path=a.ckpt is of another architecture "
                                                      r"\(model.network.model_channels=32 there, 64 here\)"):
        check_resumable(checkpoint, state, {"network": {"model_channels": 64, "num_heads": 4}}, "a.ckpt")
    check_resumable({"state_dict": saved, "ldm_model_config": checkpoint["ldm_model_config"]}, saved,
                    {"network": {"model_channels": 32, "num_heads": 4, "use_checkpoint": True}})  # fits: no error


def test_overwrite_replaces_a_folder_of_shards_whole(inputs, tmp_path):
    """The option the refusal names does what it says: the old set goes, none of its shards is left beside the new."""
    out = tmp_path / "shards"
    out.mkdir()
    for index in range(3):
        write_tar(out / f"{index:05d}.tar", {"000.txt": b"old"})
    summary = make_shards.main(["--images-dir", str(inputs["images"]), "--out-dir", str(out), "--overwrite"])
    assert summary["shards"] == 1 and sorted(p.name for p in out.iterdir()) == ["00000.tar"]
    with tarfile.open(out / "00000.tar") as tar:
        assert b"a black square" in [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".txt")]

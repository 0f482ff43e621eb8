"""Precomputed latents: the tool writes the VAE posterior with the same keys and captions, resumes, splits
by parts; data=latents batches train LatentDiffusion with no VAE encode."""

from __future__ import annotations

import importlib.util
import json
import tarfile
from pathlib import Path

import numpy
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from ldm.checkpoints import save_weights
from ldm.config import instantiate_module
from ldm.data.datamodule import LatentShardDataModule
from ldm.data.latents import load_npy
from ldm.models.conditioner import with_empty_captions
from ldm.data.shards import image_text_dataset
from ldm.data.synthetic import write_synthetic_shards
from ldm.tools import precompute_latents as tool

ROOT = Path(__file__).resolve().parents[2]
VAE = str(ROOT / "configs/model/vae/tiny.yaml")
TEXT = str(ROOT / "configs/model/text_encoder/tiny.yaml")


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> list[Path]:
    """3 shards of 8, 8 and 4 samples (32 px)."""
    return write_synthetic_shards(tmp_path_factory.mktemp("images"), num_samples=20, samples_per_shard=8, seed=7)


@pytest.fixture(scope="module")
def vae_weights(tmp_path_factory) -> str:
    torch.manual_seed(3)
    vae, _, _ = tool.build(VAE)
    return str(save_weights(vae, tmp_path_factory.mktemp("vae") / "vae.safetensors", {"latent_scale_factor": 0.5}))


@pytest.fixture(scope="module")
def latent_dir(image_shards, vae_weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents")
    spec = str(image_shards[0].parent / "train-{000000..000002}.tar")
    tool.main(["--shards", spec, "--out-dir", str(out), "--vae", VAE, "--vae-weights", vae_weights,
               "--text-encoder", TEXT, "--resolution", "32", "--batch-size", "5", "--device", "cpu"])
    return out


def members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_latent_shards_keep_keys_captions_and_store_the_posterior(image_shards, latent_dir, vae_weights):
    assert sorted(p.name for p in latent_dir.glob("*.tar")) == [p.name for p in image_shards]
    manifest = json.loads((latent_dir / "latents.json").read_text())
    assert manifest["resolution"] == 32 and manifest["vae"]["ch"] == 16 and manifest["text_encoder"] is not None
    assert manifest["latent_scale_factor"] == 0.5
    vae, _, _ = tool.build(VAE, vae_weights)
    text_encoder, _, _ = tool.build(TEXT)
    images = list(image_text_dataset(str(image_shards[0]), 32, train=False))
    files = members(latent_dir / image_shards[0].name)
    for sample in images:
        key = sample["key"]
        assert files[f"{key}.txt"].decode() == sample["caption"]
        with torch.no_grad():
            posterior = vae.encode(sample["image"][None])
            states = text_encoder([sample["caption"]])
        mean, std = load_npy(files[f"{key}.latent_mean.npy"]), load_npy(files[f"{key}.latent_std.npy"])
        assert mean.shape == (4, 8, 8) and mean.dtype == "float16"
        torch.testing.assert_close(torch.from_numpy(mean).float(), posterior.mean[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(torch.from_numpy(std).float(), posterior.std[0], atol=2e-3, rtol=2e-3)
        text = torch.from_numpy(load_npy(files[f"{key}.text_states.npy"])).float()
        torch.testing.assert_close(text, states[0], atol=5e-3, rtol=5e-3)
        metadata = json.loads(files[f"{key}.json"])
        assert metadata["original_size"] == [32, 32] and metadata["shape"] in ("circle", "square", "triangle")
    with tarfile.open(latent_dir / image_shards[0].name) as archive:  # integer times: no pax header per member
        assert all(member.pax_headers == {} and member.mtime == 0 for member in archive.getmembers())


@pytest.mark.parametrize("array", [numpy.arange(24, dtype=numpy.float16).reshape(2, 3, 4),
                                   numpy.ones((77, 8), dtype=numpy.float32), numpy.array(3.5),
                                   numpy.zeros((0, 4), dtype=numpy.int64), numpy.arange(6, dtype=">f4")])
def test_npy_reading_equals_numpys_and_refuses_truncated_data(array):
    from ldm.data.latents import npy_bytes

    data = npy_bytes(array)
    for _ in range(2):  # the first read parses the header, the second reuses it
        loaded = load_npy(data)
        assert loaded.dtype == array.dtype and loaded.shape == array.shape and numpy.array_equal(loaded, array)
        assert loaded.flags.writeable
    if array.size:
        with pytest.raises(ValueError):
            load_npy(data[:-1])


def test_a_rerun_resumes_and_parts_split_the_shards(image_shards, latent_dir, vae_weights, tmp_path):
    spec = str(image_shards[0].parent / "train-{000000..000002}.tar")
    common = ["--shards", spec, "--vae", VAE, "--vae-weights", vae_weights, "--resolution", "32", "--device", "cpu"]
    done = tool.main([*common, "--out-dir", str(latent_dir), "--text-encoder", TEXT])
    assert done["written"] == 0 and done["already_done"] == 3
    first = tool.main([*common, "--out-dir", str(tmp_path), "--num-parts", "2", "--part", "0"])
    second = tool.main([*common, "--out-dir", str(tmp_path), "--num-parts", "2", "--part", "1"])
    assert (first["written"], second["written"]) == (1, 2)  # contiguous ranges [0, 1) and [1, 3)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [p.name for p in image_shards]
    with pytest.raises(ValueError, match="other settings.*resolution: 32 there, 16 now"):  # no mixing
        tool.main([*common[:-4], "--resolution", "16", "--device", "cpu", "--out-dir", str(tmp_path)])


def test_an_unreadable_shard_writes_nothing_and_fails_the_run(image_shards, tmp_path):
    spec = f"{image_shards[0]}::{tmp_path / 'gone.tar'}"
    with pytest.raises(SystemExit, match="re-run the same command"):
        tool.main(["--shards", spec, "--out-dir", str(tmp_path / "out"), "--vae", VAE, "--resolution", "32",
                   "--device", "cpu"])
    assert [p.name for p in (tmp_path / "out").glob("*.tar")] == [image_shards[0].name]


def latent_module(latent_dir, **overrides) -> LatentShardDataModule:
    settings = dict(train_shards=str(latent_dir / "train-{000000..000002}.tar"), val_shards=str(latent_dir / "train-000002.tar"),
                    batch_size=4, num_workers=0, train_epoch_length=8, use_text_states=True, caption_dropout_prob=0.5)
    module = LatentShardDataModule(**{**settings, **overrides})
    module.setup("fit")
    return module


def test_latent_batches_have_the_documented_fields(latent_dir):
    batch = next(iter(latent_module(latent_dir).train_dataloader()))
    assert batch["latent_mean"].shape == batch["latent_std"].shape == (4, 4, 8, 8)
    assert batch["text_states"].shape == (4, 16, 64) and batch["latent_mean"].dtype == torch.float32
    assert batch["original_size"].tolist() == [[32, 32]] * 4 and "image" not in batch
    val_keys = [key for batch in latent_module(latent_dir).val_dataloader() for key in batch["key"]]
    assert len(val_keys) == 4


def tiny_diffusion():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo", "model.latents.vae_weights=null", "model.latents.scale_factor=0.5"])
    torch.manual_seed(0)
    return instantiate_module(cfg.model)


def test_latent_batches_train_without_any_vae_encode(latent_dir, monkeypatch):
    module = tiny_diffusion()

    def no_encode(*args, **kwargs):
        raise AssertionError("the VAE encoder ran on a data=latents batch")

    monkeypatch.setattr(module.vae, "encode", no_encode)
    batch = next(iter(latent_module(latent_dir, caption_dropout_prob=0.0).train_dataloader()))
    torch.manual_seed(1)
    latents = module.batch_latents(batch)
    torch.manual_seed(1)
    drawn = (batch["latent_mean"] + batch["latent_std"] * torch.randn_like(batch["latent_mean"])) * 0.5
    torch.testing.assert_close(latents, drawn)  # mean + std * eps, times latent_scale_factor
    assert torch.equal(module.batch_conditioning(batch).tokens, batch["text_states"])
    loss = module.diffusion_loss(latents, module.batch_conditioning(batch))
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in module.network.parameters())


def test_dropped_captions_get_the_empty_caption_states():
    states = torch.randn(3, 16, 64)
    empty = torch.full((1, 16, 64), 7.0)
    context = with_empty_captions(states, ["a", "", "c"], lambda captions: empty)
    assert torch.equal(context[1], empty[0]) and torch.equal(context[[0, 2]], states[[0, 2]])
    with pytest.raises(ValueError, match="differ from the text encoder"):
        with_empty_captions(states, [""] * 3, lambda captions: torch.zeros(1, 77, 64))


def train_entry():
    """train.py as a module, so that a test runs its ``train(cfg)``."""
    spec = importlib.util.spec_from_file_location("train_entry_for_latents", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def latent_run_config(latent_dir, tmp_path, *overrides: str):
    """A tiny train.py config on the latent shards of ``latent_dir``, its run folder under ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "experiment=demo", "data=latents", f"data.train_shards='{latent_dir}/train-{{000000..000002}}.tar'",
            "data.resolution=32", "data.batch_size=4", "data.num_workers=0", "data.train_epoch_length=8",
            "callbacks=default", "logger=none", "trainer.limit_val_batches=0", "trainer.max_time=null",
            "trainer.enable_progress_bar=false", "ckpt_path=null", *overrides,
        ])
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "run")
        del cfg.hydra
    return cfg


def test_a_data_latents_run_logs_its_throughput(latent_dir, tmp_path):
    cfg = latent_run_config(latent_dir, tmp_path, "callbacks.throughput.window=2", "callbacks.throughput.peak_tflops=1.0",
                            "model.latents.vae_weights=null", "model.latents.scale_factor=0.5", "trainer.max_steps=4")
    metrics = train_entry().train(cfg)
    assert metrics["perf/latents_per_s"] > 0 and metrics["perf/images_per_s"] == metrics["perf/latents_per_s"]
    assert metrics["perf/network_tflops"] > 0


def test_several_towers_precompute_their_concatenated_states_and_the_pooled_embedding(image_shards, vae_weights,
                                                                                      tmp_path):
    """An SDXL-class conditioner (two towers) stores (L, D1 + D2) states and the pooled embedding; a data=latents
    batch then gives the U-Net the same context and vector as encoding the captions."""
    spec = str(image_shards[0].parent / "train-000002.tar")
    xl_text = str(ROOT / "configs/model/text_encoder/tiny_xl.yaml")
    tool.main(["--shards", spec, "--out-dir", str(tmp_path), "--vae", VAE, "--vae-weights", vae_weights,
               "--text-encoder", xl_text, "--resolution", "32", "--batch-size", "4", "--device", "cpu"])
    files = members(tmp_path / "train-000002.tar")
    key = next(name for name in files if name.endswith(".text_states.npy")).removesuffix(".text_states.npy")
    assert load_npy(files[f"{key}.text_states.npy"]).shape == (16, 96)
    assert load_npy(files[f"{key}.text_pooled.npy"]).shape == (32,)
    batch = next(iter(latent_module(tmp_path, train_shards=str(tmp_path / "train-000002.tar"),
                                    val_shards=str(tmp_path / "train-000002.tar"), caption_dropout_prob=0.0)
                      .train_dataloader()))
    assert batch["text_pooled"].shape == (4, 32)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo", "model.latents.vae_weights=null", "model.latents.scale_factor=0.5",
                                          "model/network=tiny_xl", "model/text_encoder=tiny_xl"])
    module = instantiate_module(cfg.model).eval()
    batch.setdefault("target_size", torch.tensor([[32, 32]] * 4))  # bucketed data modules give it
    cond = module.batch_conditioning(batch)
    encoded = module.batch_conditioning({k: v for k, v in batch.items() if k not in ("text_states", "text_pooled")})
    context, vector, encoded_context, encoded_vector = cond.tokens, cond.vector, encoded.tokens, encoded.vector
    torch.testing.assert_close(context, encoded_context, atol=2e-3, rtol=1e-2)  # stored as float16
    torch.testing.assert_close(vector, encoded_vector, atol=2e-3, rtol=1e-2)


@pytest.mark.slow
def test_the_builtin_set_precomputed_is_what_data_demo_latents_reads(tmp_path):
    """--builtin writes the built-in set and encodes its train and val shards with the text states, where
    configs/data/demo_latents.yaml (what `make demo` trains on) finds them; its states are the text encoder's."""
    data_dir = tmp_path / "data"
    summary = tool.main(["--builtin", str(data_dir), "--out-dir", str(data_dir / "demo-latents"), "--vae", VAE,
                         "--text-encoder", TEXT, "--resolution", "32", "--batch-size", "256"])
    assert summary["written"] == 17 and not summary["failed"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=["experiment=demo", "data=demo_latents",
                                                                    "data.num_workers=0"])
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
    import hydra

    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["latent_mean"].shape == (64, 4, 8, 8) and batch["text_states"].shape == (64, 16, 64)
    text_encoder = hydra.utils.instantiate(cfg.model.text_encoder).eval()
    with torch.no_grad():
        expected = text_encoder(batch["caption"][:4])
    # Stored as float16: about 3 significant digits.
    torch.testing.assert_close(batch["text_states"][:4], expected, rtol=2e-3, atol=2e-3)


def test_training_with_another_vae_than_the_latents_was_made_with_is_refused_naming_both_hashes(
        latent_dir, vae_weights, tmp_path):
    """Latents record the sha256 of the VAE that made them; a run whose model.latents.vae_weights is another VAE (its
    decoder could not read them) stops at setup, before any step."""
    from ldm.config_check import ConfigError
    from ldm.interchange.frozen_files import file_sha256

    torch.manual_seed(4)
    other_vae, _, _ = tool.build(VAE)
    other = str(save_weights(other_vae, tmp_path / "other_vae.safetensors", {"latent_scale_factor": 0.5}))
    made_with = json.loads((latent_dir / "latents.json").read_text())["vae_sha256"]
    assert made_with == file_sha256(vae_weights) != file_sha256(other)
    cfg = latent_run_config(latent_dir, tmp_path, "data.use_text_states=true", f"model.latents.vae_weights={other}",
                            "trainer.max_steps=2")
    with pytest.raises(ConfigError, match=f"model.latents.vae_weights={other} has sha256 {file_sha256(other)}.*"
                                          f"made with {vae_weights} of sha256 {made_with}"):
        train_entry().train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()

"""EncodedSyntheticDataModule: the built-in set encoded once by the trained module's own frozen VAE and text
encoder, cached by their weights, read back as latent batches; a run that trains the text tower is refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ldm.data.encoded import EncodedSyntheticDataModule
from ldm.data.shards import image_text_dataset
from ldm.data.synthetic import parse_caption
from ldm.tools import precompute_latents as tool

ROOT = Path(__file__).resolve().parents[2]


def fake_trainer(vae_seed: int = 3, lora=None) -> SimpleNamespace:
    """What the data module reads of a Trainer: the module's VAE, text encoder and device, rank 0, a barrier."""
    torch.manual_seed(vae_seed)
    vae, _, _ = tool.build(str(ROOT / "configs/model/vae/tiny.yaml"))
    text_encoder, _, _ = tool.build(str(ROOT / "configs/model/text_encoder/tiny.yaml"))
    module = SimpleNamespace(vae=vae.eval(), text_encoder=text_encoder.eval(), device=torch.device("cpu"),
                             mode=SimpleNamespace(lora=lora))
    return SimpleNamespace(lightning_module=module, is_global_zero=True,
                           strategy=SimpleNamespace(barrier=lambda name=None: None))


def data_module(tmp_path: Path, trainer: SimpleNamespace) -> EncodedSyntheticDataModule:
    module = EncodedSyntheticDataModule(
        synthetic={"data_dir": str(tmp_path), "num_train": 12, "num_val": 6, "samples_per_shard": 12,
                   "shapes": ["circle", "cross"]},
        batch_size=4, val_batch_size=6, num_workers=0, caption_dropout_prob=0.0)
    module.trainer = trainer
    module.prepare_data()
    module.setup("fit")
    return module


def test_batches_hold_the_modules_own_encodings_of_the_images(tmp_path):
    trainer = fake_trainer()
    data = data_module(tmp_path, trainer)
    batch = next(iter(data.val_dataloader()))
    vae, text_encoder = trainer.lightning_module.vae, trainer.lightning_module.text_encoder
    assert set(batch) >= {"latent_mean", "latent_std", "text_states", "caption"} and "image" not in batch
    with torch.no_grad():
        posterior = vae.encode(image_batch(tmp_path))
        states = text_encoder(list(batch["caption"]))
    torch.testing.assert_close(batch["latent_mean"], posterior.mean, atol=2e-3, rtol=2e-3)  # stored as float16
    torch.testing.assert_close(batch["text_states"], states, atol=2e-3, rtol=2e-3)
    assert all(parse_caption(caption)["shape"] in ("circle", "cross") for caption in batch["caption"])


def image_batch(data_dir: Path) -> torch.Tensor:
    """The validation images of the built-in set under ``data_dir``, in shard order, in [-1, 1]."""
    urls = [str(p) for p in sorted(data_dir.glob("synthetic-*/val-*.tar"))]
    return next(iter(image_text_dataset(urls, 32, train=False, batch_size=6)))["image"]


def test_another_vae_gets_its_own_cache_folder(tmp_path):
    first = data_module(tmp_path, fake_trainer(vae_seed=3)).encoded_dir
    again = data_module(tmp_path, fake_trainer(vae_seed=3)).encoded_dir
    other = data_module(tmp_path, fake_trainer(vae_seed=4)).encoded_dir
    assert first == again != other
    assert sorted(p.name for p in first.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]


def test_a_run_that_trains_the_text_tower_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model.mode.text_encoder=true"):
        data_module(tmp_path, fake_trainer(lora=SimpleNamespace(text_encoder=True)))


def test_own_shards_are_refused_with_the_way_to_precompute_them():
    with pytest.raises(ValueError, match="data=latents"):
        EncodedSyntheticDataModule(train_shards="/data/{000..009}.tar", synthetic=None)

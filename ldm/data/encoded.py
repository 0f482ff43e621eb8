"""The built-in set as latents and text states, encoded once by the model being trained.

``data=latents`` trains without the VAE encoder and the text tower in the step, but needs a separate
``precompute_latents`` run with the right weights. A fine-tune of a small set (LoRA, ``experiment=demo_lora``)
can do the same in one command: before the first step, the model's own frozen VAE and text encoder encode the
set (``ldm.data.precompute``, under a second for the demo's 126 images) and training reads the
result as ``data=latents`` would. So the stored latents can come from no other weights than the run's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.data.datamodule import LatentShardDataModule
from ldm.data.precompute import output_name, precompute_latents
from ldm.interchange.frozen_files import file_sha256


def weights_fingerprint(*modules: nn.Module, files: list[str] = ()) -> str:
    """sha256 over the modules' state (names, shapes, values) and the bytes of ``files``: another VAE, text
    encoder or image set gives another value."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    for path in files:
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


class EncodedSyntheticDataModule(LatentShardDataModule):
    """``data.synthetic`` (the built-in set, as ``ShardDataModule`` takes it) encoded before the first step by the
    trained module's frozen ``vae`` and ``text_encoder`` into latent shards with text states, which training then
    reads (``LatentShardDataModule``; batches as there). Each image's posterior is stored, so training still
    samples it; the built-in set is neither cropped nor flipped, so nothing else changes.

    The shards are cached in ``<synthetic.data_dir>/latents/<set>-<fingerprint>/``: the fingerprint covers the
    VAE's and text encoder's weights and the image shards, so another base model or set gets its own folder.
    A run that trains the text tower (``model.mode.text_encoder``) cannot use stored text states and is refused.
    """

    def __init__(self, **options: Any) -> None:
        if options.get("train_shards") is not None or options.get("synthetic") is None:
            raise ValueError("EncodedSyntheticDataModule encodes the built-in set (data.synthetic) and takes no "
                             "data.train_shards; for shards of your own, precompute them (python -m "
                             "ldm.tools.precompute_latents) and use data=latents")
        options.pop("train_shards", None)
        super().__init__(train_shards=None, use_text_states=True, **options)
        self.encoded_dir: Path | None = None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)  # the built-in set's image shards
        if self.encoded_dir is None:
            self.encoded_dir = self._encode()
        self.train_urls = [str(self.encoded_dir / output_name(url)) for url in self.train_urls]
        self.val_urls = [str(self.encoded_dir / output_name(url)) for url in self.val_urls or []] or None

    def _encode(self) -> Path:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None:
            raise RuntimeError("EncodedSyntheticDataModule encodes its images with the model being trained: use it "
                               "through a Trainer")
        lora = getattr(getattr(module, "mode", None), "lora", None)
        if lora is not None and lora.text_encoder:
            raise ValueError("model.mode.text_encoder=true trains the text tower, so its states cannot be stored "
                             "once: use data=synthetic (images, encoded at every step) with it")
        image_urls = [*self.train_urls, *(self.val_urls or [])]
        fingerprint = weights_fingerprint(module.vae, module.text_encoder, files=image_urls)
        folder = Path(self.synthetic.data_dir) / "latents" / f"{Path(image_urls[0]).parent.name}-{fingerprint[:16]}"
        if self.trainer.is_global_zero:
            manifest = {"format": 1, "resolution": self.resolution, "encoded_by": type(self).__name__,
                        "weights_and_images_sha256": fingerprint}
            with torch.no_grad():
                summary = precompute_latents(image_urls, folder, module.vae, self.resolution, manifest,
                                             batch_size=self.batch_size, device=module.device,
                                             text_encoder=module.text_encoder)
            if summary["failed"]:
                raise RuntimeError(f"could not read the built-in set's shards {summary['failed']}: delete "
                                   f"{Path(image_urls[0]).parent} to have it written again")
        self.trainer.strategy.barrier("encoded_synthetic")
        return folder

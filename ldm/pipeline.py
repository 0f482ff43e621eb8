"""Text to image: conditioner -> guided sampler over the denoising network -> VAE decode.

The one generation path of the project: sample logging during training, evaluation, notebooks,
export and ``python -m ldm.tools.sample`` all call ``TextToImagePipeline``. ``from_pretrained``
builds one from a diffusers folder, an SD single file or an ldm training checkpoint without any
training code (no Lightning, no Hydra).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.conditioning import Conditioning
from ldm.diffusion.guidance import classifier_free_guidance
from ldm.diffusion.sampling import sample
from ldm.models.conditioner import default_sizes


class TextToImagePipeline:
    """Generates images for prompts with classifier-free guidance, over any network family.

    The contracts (``ldm.conditioning``): ``text_encoder.condition(prompts, sizes) -> Conditioning`` (the
    conditioner: one text tower, or SDXL's ``TextConditioner``, whose vector y also embeds the size fields);
    ``network(x, t, cond) -> prediction``; ``vae.decode(z)``. Latents are divided by ``latent_scale_factor``
    before decoding, as they were multiplied by it when the network was trained. ``model_config``: the
    ``_target_`` configs of the components (``network``, ``vae``, ``text_encoder``, ``noise_schedule``), which
    export needs; ``ema_state``: an EMA network kept beside ``network``'s raw weights (written into SD files as
    ``model_ema``).
    """

    def __init__(
        self,
        network: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        alphas_cumprod: Tensor,
        latent_scale_factor: float,
        prediction_type: str = "epsilon",
        latent_channels: int | None = None,
        vae_downsample_factor: int | None = None,
        sampler_options: Mapping[str, Any] | None = None,
        model_config: Mapping[str, Mapping[str, Any]] | None = None,
        ema_state: dict[str, Tensor] | None = None,
    ) -> None:
        self.network = network
        self.vae = vae
        self.text_encoder = text_encoder
        self.alphas_cumprod = alphas_cumprod
        self.latent_scale_factor = float(latent_scale_factor)
        self.prediction_type = prediction_type
        # The objective's own sampler settings (flow: shift; EDM: sigma_data, sigma range); a call may override them.
        self.sampler_options = dict(sampler_options or {})
        self.latent_channels = latent_channels or int(getattr(vae, "embed_dim", 4))
        self.vae_downsample_factor = vae_downsample_factor or int(getattr(vae, "downsample_factor", 8))
        self.model_config = {name: dict(config) for name, config in (model_config or {}).items()}
        self.ema_state = ema_state

    @classmethod
    def from_pretrained(cls, source: str | Path, device: str | torch.device = "cpu", **load_options: Any
                        ) -> "TextToImagePipeline":
        """The pipeline of a diffusers folder, an SD ``.safetensors``/``.ckpt`` file or an ldm training
        checkpoint. ``load_options`` go to ``ldm.interchange.load_model.load_model`` (``use_ema``,
        ``vae_weights``, ``pretrained``, ``model_config``, ``prediction_type``, ``search_dirs``; ``lora``: a LoRA
        file in diffusers' or kohya's layout merged in at ``lora_scale``)."""
        from ldm.interchange.load_model import load_model  # deferred: conversions are not needed to sample

        model = load_model(source, **load_options)
        return cls(
            network=model.network.to(device), vae=model.vae.to(device), text_encoder=model.text_encoder.to(device),
            alphas_cumprod=model.noise_schedule.alphas_cumprod, latent_scale_factor=model.latent_scale_factor,
            prediction_type=model.prediction_type, model_config=model.model_config, ema_state=model.ema_state,
            sampler_options=model.sampler_options,
        )

    @property
    def resolution(self) -> int:
        """The image side the model was built for (its VAE's ``resolution``), the default size to generate."""
        return int(self.model_config.get("vae", {}).get("resolution") or getattr(self.vae, "resolution", 256))

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def size_multiple(self) -> int:
        """What every image side must be a multiple of: the VAE's downsampling factor x the network's."""
        return self.vae_downsample_factor * int(getattr(self.network, "downsample_factor", 1))

    def check_size(self, height: int, width: int) -> None:
        """ValueError unless a height x width image can be generated: any aspect ratio, with each side a
        positive multiple of ``size_multiple`` (so the latents go down and up the network's levels whole)."""
        multiple = self.size_multiple
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            def nearest(side: int) -> int:
                return max(multiple, round(side / multiple) * multiple)

            raise ValueError(
                f"height={height} and width={width} must be positive multiples of {multiple} (the VAE's factor "
                f"{self.vae_downsample_factor} x the network's {multiple // self.vae_downsample_factor}); "
                f"e.g. height={nearest(height)} width={nearest(width)}")

    def initial_noise(self, seeds: Sequence[int], height: int, width: int) -> Tensor:
        """Standard-normal latents (N, C, height/f, width/f), image i drawn from its own ``seeds[i]``.

        Per-image seeds make an image independent of the batch it is generated in.
        """
        self.check_size(height, width)
        factor = self.vae_downsample_factor
        shape = (self.latent_channels, height // factor, width // factor)
        noises = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(noises).to(self.device)

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        height: int,
        width: int,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        sampler: str | None = None,
        seed: int | Sequence[int] = 0,
        negative_prompt: str = "",
        guidance_rescale: float = 0.0,
        batch_size: int | None = None,
        original_size: Sequence[int] | None = None,
        crop_coords: Sequence[int] = (0, 0),
        target_size: Sequence[int] | None = None,
        **sampler_kwargs,
    ) -> Tensor:
        """Images (N, 3, height, width) in [0, 1] for ``prompts``, sampled in batches of ``batch_size``.

        ``sampler``: None takes the objective's default (ddim for epsilon / v / x0, flow_euler, edm_heun).
        ``original_size``, ``crop_coords``, ``target_size``: the micro-conditioning of an SDXL-class model
        ((height, width), (top, left), (height, width); by default (height, width), (0, 0), (height, width)),
        the same for both guidance branches; a model without it ignores them."""
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale={guidance_scale} must be a finite number (1 turns guidance off)")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be at least 1")
        prompts = list(prompts)
        seeds = list(seed) if isinstance(seed, Sequence) else [seed + i for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds given for {len(prompts)} prompts")
        noise = self.initial_noise(seeds, height, width)
        batch_size = batch_size or len(prompts)
        sizes = {"height": height, "width": width, "original_size": original_size, "crop_coords": crop_coords,
                 "target_size": target_size}
        uncond = self.encode_prompts([negative_prompt], **sizes)  # the same for every batch
        images = []
        for start in range(0, len(prompts), batch_size):
            cond = self.encode_prompts(prompts[start : start + batch_size], **sizes)
            denoise = classifier_free_guidance(self.network, cond, uncond, guidance_scale, guidance_rescale)
            # Stochastic samplers draw their step noise from a generator tied to the batch's first seed.
            generator = torch.Generator(self.device).manual_seed(int(seeds[start]) + 1)
            latents = sample(
                sampler,
                denoise,
                noise[start : start + batch_size],
                self.alphas_cumprod.to(self.device),
                num_inference_steps,
                prediction_type=self.prediction_type,
                generator=generator,
                **{**self.sampler_options, **sampler_kwargs},
            )
            decoded = self.vae.decode(latents / self.latent_scale_factor)
            images.append(((decoded.float() + 1.0) / 2.0).clamp(0.0, 1.0))
        return torch.cat(images)

    def generate_at_sizes(self, prompts: Sequence[str], sizes: Sequence[Sequence[int]], seed: int | Sequence[int] = 0,
                          **options: Any) -> list[Tensor]:
        """Images for ``prompts``, image i of ``sizes[i] = (height, width)``: a list of (3, height_i, width_i) in
        [0, 1], in prompt order. One ``__call__`` per distinct size (``options`` go to each); image i keeps its
        own seed (``seed + i``, or ``seed[i]``), so it is the image a call at its size alone would give."""
        prompts = list(prompts)
        if len(sizes) != len(prompts):
            raise ValueError(f"{len(sizes)} sizes given for {len(prompts)} prompts")
        seeds = list(seed) if isinstance(seed, Sequence) else [seed + i for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds given for {len(prompts)} prompts")
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, (height, width) in enumerate(sizes):
            by_size.setdefault((int(height), int(width)), []).append(index)
        images: list[Tensor | None] = [None] * len(prompts)
        for (height, width), indices in by_size.items():
            generated = self([prompts[i] for i in indices], height=height, width=width,
                             seed=[seeds[i] for i in indices], **options)
            for index, image in zip(indices, generated):
                images[index] = image
        return images

    def encode_prompts(self, prompts: Sequence[str], height: int, width: int, original_size: Sequence[int] | None = None,
                       crop_coords: Sequence[int] = (0, 0), target_size: Sequence[int] | None = None) -> Conditioning:
        """The Conditioning of prompts generated at height x width with the given micro-conditioning (see
        ``__call__``; a conditioner without size conditions ignores them)."""
        sizes = default_sizes(height, width, len(prompts), original_size, crop_coords, target_size)
        return self.text_encoder.condition(list(prompts), sizes)

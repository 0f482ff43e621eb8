"""The evaluation job behind ``eval.py``: checkpoint -> generated images -> FID/KID/CLIP score -> JSON + W&B.

Every process of the job runs ``run_evaluation``; each generates its share of the samples and the
per-sample results are gathered in sample order, so one process and several give the same numbers.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.config import instantiate_group
from ldm.config_check import build_options
from ldm.diffusion.sampling import DEFAULT_SAMPLERS
from ldm.evaluation.analysis import MemorizationSets, SampleAnalysis, memorization_grid
from ldm.evaluation.distributed import barrier
from ldm.evaluation.evaluate import SamplingSettings, guidance_sweep, size_sweep
from ldm.evaluation.metrics import PooledPixelFeatures
from ldm.evaluation.options import EvalOptions
from ldm.evaluation.reference import extract_features, read_image_caption_set, read_images_by_size, reference_features
from ldm.evaluation.report import (format_table, log_to_wandb, plot_guidance_curve, plot_sigma_rel_curve, sample_grid,
                                   write_results)
from ldm.evaluation.uncertainty import spread_over_seeds
from ldm.interchange.posthoc_ema import apply_posthoc_ema
from ldm.pipeline import TextToImagePipeline
from ldm.ranks import rank_and_world_size
from ldm.visualization import captioned_grid, to_pil_images

logger = logging.getLogger(__name__)


def rank_zero_first(build):
    """``build()`` on rank 0, then on the other ranks: whatever rank 0 caches on disk, they read."""
    rank, _ = rank_and_world_size(from_launcher=False)
    result = build() if rank == 0 else None
    barrier()
    return result if rank == 0 else build()


def generation_captions(reference_captions: list[str], num_samples: int, prompts_file: str | None) -> list[str]:
    """``num_samples`` captions: the reference set's (or the prompt file's lines), repeated in order if too few."""
    captions = reference_captions
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"eval.prompts_file={prompts_file} does not exist; give a file of one prompt per line")
        captions = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not captions:
            raise ValueError(f"eval.prompts_file={prompts_file} holds no prompts")
    if num_samples <= 0:
        raise ValueError(f"eval.num_samples={num_samples} must be positive")
    return [captions[i % len(captions)] for i in range(num_samples)]


def run_evaluation(cfg: DictConfig, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` as ``configs/eval.yaml`` describes; returns the results (written by rank 0)."""
    rank, world_size = rank_and_world_size(from_launcher=False)
    options = build_options(EvalOptions, cfg.eval, "eval")
    if not cfg.get("ckpt_path"):
        raise ValueError("ckpt_path is required: python eval.py ckpt_path=outputs/train/demo/<time>/checkpoints/last.ckpt")
    pipeline = TextToImagePipeline.from_pretrained(
        cfg.ckpt_path, device=device, use_ema=None if options.use_ema else False, vae_weights=cfg.get("vae_weights"),
        pretrained=cfg.get("pretrained"), options={"vae_weights": "vae_weights=", "pretrained": "pretrained="})
    resolution = options.resolution

    reference_shards = options.reference_shards
    datamodule = None
    if not reference_shards or (options.memorization and not options.memorization_shards):
        datamodule = hydra.utils.instantiate(cfg.data)  # the data config's shards (the built-in set is made if missing)
        rank_zero_first(datamodule.prepare_data)
        datamodule.setup("validate")
    if not reference_shards:
        reference_shards = datamodule.val_urls
    if not reference_shards:
        raise ValueError("no reference images: set eval.reference_shards or use data with validation shards")

    extractor = rank_zero_first(lambda: hydra.utils.instantiate(cfg.feature_extractor)).to(device).eval()
    extractor_name = getattr(extractor, "name", type(extractor).__name__)
    if options.sizes:
        return evaluate_sizes(cfg, options, pipeline, reference_shards, extractor, extractor_name)
    real, real_captions, cache_file = rank_zero_first(lambda: reference_features(
        reference_shards, resolution, extractor, extractor_name, options.reference_cache_dir, options.num_reference))
    captions = generation_captions(real_captions, options.num_samples, options.prompts_file)
    clip_score = hydra.utils.instantiate(cfg.clip) if cfg.get("clip") else None
    scales = options.scales
    settings = SamplingSettings(
        sampler=options.sampler, num_inference_steps=options.num_inference_steps, seed=options.seed,
        batch_size=options.batch_size, height=resolution, width=resolution,
        sampler_options={**options.sampler_options, **options.micro_conditioning},  # the pipeline's keywords both
    )
    memorization_sets = None
    if options.memorization:
        memorization_sets = training_set_for_memorization(
            options, options.memorization_shards or datamodule.train_urls, reference_shards, extractor, extractor_name)
    compare_pipeline = None
    if cfg.get("compare"):
        compare_pipeline = TextToImagePipeline.from_pretrained(
            cfg.compare, device=device, use_ema=None if options.use_ema else False, vae_weights=cfg.get("vae_weights"),
            options={"vae_weights": "vae_weights="})
    analysis = SampleAnalysis(real, options, settings, captions, extractor, clip_score, memorization_sets, compare_pipeline)
    log_row = lambda row: logger.info("guidance %.2f: %s", row["guidance_scale"], row) if rank == 0 else None  # noqa: E731
    pixel_size = options.memorization_pixel_size if options.memorization else None
    rows, images = guidance_sweep(
        pipeline, captions, real, scales, settings, extractor, clip_score, options.kid_subset_size,
        options.kid_subsets, keep_images=options.num_grid_images, on_row=log_row, pixel_size=pixel_size, analyse=analysis,
    )
    seed_rows = {seed: guidance_sweep(pipeline, captions, real, scales, replace(settings, seed=seed), extractor,
                                      clip_score, options.kid_subset_size, options.kid_subsets, on_row=log_row)[0]
                 for seed in options.generation_seeds[1:]}
    for index, row in enumerate(rows):
        if seed_rows:
            per_seed = [row] + [other[index] for other in seed_rows.values()]
            row["seed_spread"] = {"seeds": options.generation_seeds, **spread_over_seeds(per_seed)}
    memorization_pairs = None
    if rank == 0 and memorization_sets is not None and options.memorization_grid_pairs:
        memorization_pairs = memorization_grid(pipeline, analysis.memorization_results[scales[0]], memorization_sets,
                                               captions, scales[0], settings, options.memorization_grid_pairs)
    posthoc_rows = posthoc_ema_sweep(pipeline, options, captions, real, settings, extractor, clip_score, log_row)
    results = {
        "metrics": {k: v for k, v in rows[0].items() if k not in ("guidance_scale", "num_samples")} if len(rows) == 1 else None,
        "rows": rows,
        "checkpoint": str(cfg.ckpt_path),
        "use_ema": options.use_ema,
        "sampler": settings.sampler or DEFAULT_SAMPLERS.get(pipeline.prediction_type, "ddim"),
        "num_inference_steps": settings.num_inference_steps,
        "sampler_options": settings.sampler_options,
        "guidance_scales": scales, "seed": settings.seed, "num_samples": len(captions), "resolution": resolution,
        "feature_extractor": {"name": extractor_name, "num_features": int(real.shape[1]),
                              "val_accuracy": getattr(extractor, "val_accuracy", None)},
        "clip_model": OmegaConf.to_container(cfg.clip, resolve=True) if cfg.get("clip") else None,
        "reference": {"shards": str(reference_shards) if isinstance(reference_shards, str) else list(reference_shards),
                      "num_images": int(real.shape[0]), "feature_cache": str(cache_file) if cache_file else None},
        "prompts_file": options.prompts_file, "world_size": world_size,
        "seeds": options.generation_seeds, "compare": str(cfg.compare) if cfg.get("compare") else None,
        "prdc_k": options.prdc_k, "bootstrap_resamples": options.bootstrap_resamples,
        "posthoc_ema": {"snapshots": options.posthoc_ema_snapshots, "rows": posthoc_rows} if posthoc_rows else None,
    }
    if rank == 0:
        output_dir = Path(options.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        grids = {f"guidance_{scale:g}": sample_grid(images[scale], captions, f"w={scale:g}") for scale in images
                 if len(images[scale])}
        if memorization_pairs is not None:
            grids["memorization_pairs"] = memorization_pairs
        for name, grid in grids.items():
            grid.save(output_dir / f"samples_{name}.png")
        plot = None
        if len(rows) > 1 and rows[0]["clip_score"] is not None:
            plot = plot_guidance_curve(rows, output_dir / "fid_vs_clip_score.png")
        if len(rows) > 1 and "adherence_all" in rows[0]:  # built-in captions: a measured prompt-following axis
            plot_guidance_curve(rows, output_dir / "fid_vs_adherence_all.png", x_metric="adherence_all")
        results["plot"] = str(plot) if plot else None
        if posthoc_rows:
            results["posthoc_ema"]["plot"] = str(plot_sigma_rel_curve(posthoc_rows, output_dir / "fid_vs_sigma_rel.png"))
        write_results(output_dir / "results.json", results)
        log_to_wandb(instantiate_group(cfg.get("logger")), results, grids, plot)
        print(format_table(rows))
        if posthoc_rows:
            print(format_table(posthoc_rows, first_column="sigma_rel"))
        print(f"results written to {output_dir / 'results.json'}")
    return results


def evaluate_sizes(cfg: DictConfig, options: EvalOptions, pipeline: TextToImagePipeline,
                   reference_shards: str | list[str], extractor: torch.nn.Module, extractor_name: str) -> dict[str, Any]:
    """``eval.sizes``: FID, KID, adherence and CLIP score at each image size against the reference images stored
    at that size, and over all sizes pooled; writes ``results.json`` (``per_size`` and the pooled ``rows``)
    and a grid of each size's first images."""
    rank, world_size = rank_and_world_size(from_launcher=False)
    for height, width in options.sizes:
        pipeline.check_size(height, width)
    stored = read_images_by_size(reference_shards, options.num_reference)
    sizes = [(int(h), int(w)) for h, w in options.sizes]
    missing = [f"{h}x{w}" for h, w in sizes if (h, w) not in stored]
    if missing:
        raise ValueError(f"eval.sizes: no reference image of {', '.join(missing)} in {reference_shards} (stored sizes: "
                         f"{', '.join(f'{h}x{w}' for h, w in stored)})")
    real_by_size = {size: extract_features(extractor, torch.stack(stored[size][0])) for size in sizes}
    captions_by_size = {size: generation_captions(stored[size][1], options.num_samples, options.prompts_file)
                        for size in sizes}
    settings = SamplingSettings(sampler=options.sampler, num_inference_steps=options.num_inference_steps,
                                seed=options.seed, batch_size=options.batch_size,
                                sampler_options=dict(options.sampler_options))
    clip_score = hydra.utils.instantiate(cfg.clip) if cfg.get("clip") else None
    rows, per_size, images = size_sweep(pipeline, captions_by_size, real_by_size, options.scales, settings, extractor,
                                        clip_score, options.kid_subset_size, options.kid_subsets,
                                        keep_images=options.num_grid_images)
    results = {
        "metrics": {k: v for k, v in rows[0].items() if k not in ("guidance_scale", "num_samples")} if len(rows) == 1 else None,
        "rows": rows,
        "per_size": {name: {"height": h, "width": w, "num_reference": len(stored[(h, w)][0]), "rows": size_rows}
                     for (h, w), (name, size_rows) in zip(sizes, per_size.items())},
        "checkpoint": str(cfg.ckpt_path), "use_ema": options.use_ema,
        "sampler": settings.sampler or DEFAULT_SAMPLERS.get(pipeline.prediction_type, "ddim"),
        "num_inference_steps": settings.num_inference_steps, "sampler_options": settings.sampler_options,
        "guidance_scales": options.scales, "seed": settings.seed, "sizes": [list(size) for size in sizes],
        "feature_extractor": {"name": extractor_name, "num_features": int(next(iter(real_by_size.values())).shape[1]),
                              "val_accuracy": getattr(extractor, "val_accuracy", None)},
        "reference": {"shards": str(reference_shards) if isinstance(reference_shards, str) else list(reference_shards),
                      "num_images": sum(len(stored[size][0]) for size in sizes)},
        "prompts_file": options.prompts_file, "world_size": world_size,
    }
    if rank == 0:
        output_dir = Path(options.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        grids = {}
        for scale, kept in images.items():
            if kept:
                labels = [f"{h}x{w}: {c}" for (h, w), captions in captions_by_size.items()
                          for c in captions[: options.num_grid_images]]
                grids[f"guidance_{scale:g}"] = captioned_grid(to_pil_images(kept), labels, columns=6)
        for name, grid in grids.items():
            grid.save(output_dir / f"samples_{name}.png")
        write_results(output_dir / "results.json", results)
        log_to_wandb(instantiate_group(cfg.get("logger")), results, grids, None)
        for name, size_rows in per_size.items():
            print(f"{name}:\n{format_table(size_rows)}")
        print(f"all sizes:\n{format_table(rows)}")
        print(f"results written to {output_dir / 'results.json'}")
    return results


def training_set_for_memorization(options: EvalOptions, train_shards: str | list[str], reference_shards: str | list[str],
                                  extractor: torch.nn.Module, extractor_name: str) -> MemorizationSets:
    """The training images the memorization check searches (the first ``memorization_num_train``), their
    features and downsampled pixels, and the reference images' downsampled pixels."""
    pixels = PooledPixelFeatures(options.memorization_pixel_size)
    if not isinstance(train_shards, str):  # weighted sources give one list of shards per source
        train_shards = [url for item in train_shards for url in ([item] if isinstance(item, str) else item)]
    images, captions = read_image_caption_set(train_shards, options.resolution, options.memorization_num_train)
    validation_pixels, _, _ = reference_features(reference_shards, options.resolution, pixels, pixels.name,
                                                 options.reference_cache_dir, options.num_reference)
    return MemorizationSets(images, captions, extract_features(extractor, images), extract_features(pixels, images),
                            validation_pixels)


def posthoc_ema_sweep(pipeline: TextToImagePipeline, options: EvalOptions, captions: list[str], real: torch.Tensor,
                      settings: SamplingSettings, extractor: torch.nn.Module, clip_score, log_row) -> list[dict[str, Any]]:
    """With ``eval.sigma_rels``: the first guidance scale's metrics for the post-hoc EMA of each sigma_rel,
    reconstructed from ``eval.posthoc_ema_snapshots`` into the pipeline's U-Net (which keeps the last one)."""
    if not options.sigma_rels:
        return []
    rows = []
    for sigma_rel in options.sigma_rels:
        apply_posthoc_ema(pipeline, options.posthoc_ema_snapshots, float(sigma_rel))
        row = guidance_sweep(pipeline, captions, real, options.scales[:1], settings, extractor, clip_score,
                             options.kid_subset_size, options.kid_subsets, on_row=log_row)[0][0]
        rows.append({"sigma_rel": float(sigma_rel), **row})
    return rows

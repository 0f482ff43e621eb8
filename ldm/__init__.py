"""ldm: latent diffusion training framework."""

"""diffusers <-> original key conversion names every key that is not part of the layout it reads.
(That the conversions map real models' weights both ways is tests/models/test_diffusers_parity.py.)"""

import pytest
import torch

from ldm.checkpoints import CheckpointMismatchError
from ldm.interchange.diffusers_keys import (
    diffusers_unet_to_ldm,
    diffusers_vae_to_ldm,
    ldm_unet_to_diffusers,
    ldm_vae_to_diffusers,
)


def test_diffusers_conversion_names_every_key_outside_the_layout():
    weight = torch.zeros(4, 4)
    unet = {"conv_in.weight": weight, "class_embedding.linear_1.weight": weight, "down_blocks.0.bogus.0.weight": weight}
    with pytest.raises(CheckpointMismatchError, match="2 key") as error:
        diffusers_unet_to_ldm(unet, layers_per_block=2)
    assert "class_embedding.linear_1.weight" in str(error.value) and "down_blocks.0.bogus.0.weight" in str(error.value)
    assert "conv_in.weight" not in str(error.value)
    vae = {"encoder.conv_in.weight": weight, "text_model.embeddings.weight": weight}
    with pytest.raises(CheckpointMismatchError, match="text_model.embeddings.weight"):
        diffusers_vae_to_ldm(vae, num_levels=4)
    assert diffusers_vae_to_ldm({"encoder.conv_in.weight": weight}, num_levels=4) == {"encoder.conv_in.weight": weight}


def test_export_conversion_names_every_key_outside_the_original_layout():
    weight = torch.zeros(4, 4)
    with pytest.raises(CheckpointMismatchError, match="label_emb.1.weight"):
        ldm_unet_to_diffusers({"input_blocks.0.0.weight": weight, "label_emb.1.weight": weight}, layers_per_block=2)
    with pytest.raises(CheckpointMismatchError, match="encoder.down.0.attn.0.q.weight"):
        ldm_vae_to_diffusers({"encoder.down.0.attn.0.q.weight": weight}, num_levels=4)

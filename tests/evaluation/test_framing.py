"""The framing measure (is the shape wholly inside the image?) on built-in images and on cut ones."""

import numpy
import torch

from ldm.data.synthetic import render_scene
from ldm.evaluation.framing import shape_inside_frame


def as_tensor(image) -> torch.Tensor:
    return torch.from_numpy(numpy.asarray(image)).permute(2, 0, 1).float() / 255


def test_a_framed_shape_is_inside_and_a_cut_or_missing_one_is_not():
    framed = as_tensor(render_scene("circle", "red", "gray", size=0.4, centre=(0.5, 0.5)))
    cut = as_tensor(render_scene("square", "blue", "white", size=0.5, centre=(0.1, 0.5)))  # crosses the left edge
    touching = as_tensor(render_scene("triangle", "cyan", "black", size=0.5, centre=(0.25, 0.75)))  # at its edges
    empty = torch.ones(3, 32, 32)
    assert shape_inside_frame(torch.stack([framed, cut, touching, empty])).tolist() == [True, False, False, False]

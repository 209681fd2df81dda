"""The VAE decoder graph: a bundle's final latents to images.

``vae_decoder`` takes ``latents [N, ...]`` exactly as the plan leaves them (packed for FLUX and
Qwen-Image) and returns ``images [N, H, W, C]`` in [0, 1], float32 at both ends.  Everything
the family says about its latents (:meth:`rstr.families.base.Family.decode`: unpacking, the
scaling factor and shift, Qwen-Image's per-channel mean and std, the one video frame) is
inside the graph, so a runtime only runs it.  The VAE computes in the bundle's dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rstr.export.graphs import export_graph
from torch import nn

from rstr.families.base import Family, TensorSpec

GRAPH = "vae_decoder"


class VaeDecoder(nn.Module):
    """``latents -> images``: :meth:`Family.decode` with the VAE registered for the exporter."""

    def __init__(self, family: Family):
        super().__init__()
        self.family = family
        self.vae = family.vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.family.decode(latents)


def export_vae_decoder(family: Family, path: Path) -> None:
    """Export ``vae_decoder.onnx`` (dynamic batch) from the family's VAE."""
    latents = torch.randn(family.sample_shape(2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        export_graph(
            VaeDecoder(family).eval(), (latents,), path, ["latents"], ["images"], {"latents": "batch", "images": "batch"}, True
        )


def _image_shape(family: Family) -> tuple[int, int, int]:
    shape = family.image_shape()
    if shape is None:
        raise RuntimeError(f"the {family.name} model has no VAE to export")
    return shape


def decoder_graph(family: Family) -> dict:
    """The manifest's ``graphs.vae_decoder``: its file, input and output described once."""
    h, w, c = _image_shape(family)
    latents = TensorSpec("latents", torch.float32, ("batch", *family.sample_shape(1)[1:]))
    images = TensorSpec("images", torch.float32, ("batch", h, w, c))
    return {"file": f"{GRAPH}.onnx", "inputs": [latents.to_json()], "outputs": [images.to_json()]}


def decoder_section(family: Family) -> dict | None:
    """The manifest's ``decoder``: the VAE graph when the model has a VAE, the pixel rule for pixel models, else None."""
    if family.vae is not None:
        h, w, c = _image_shape(family)
        return {"kind": "vae", "graph": GRAPH, "channels": c, "size": h, "range": [0.0, 1.0]}
    image = family.image
    return None if image is None else {"kind": "pixels", **image.to_json()}

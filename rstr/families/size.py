"""Output size and prompt length chosen at build time (``rstr-export build --height/--width/--max-text-len``).

A bundle's graphs have fixed shapes past the batch axis, so the image side and the number of
prompt tokens are fixed when it is built.  By default they are the model's: the transformer's
``sample_size`` for spatial latents, ``rstr.json``'s ``latent_size`` and ``text_len`` (or the
family's defaults) otherwise.  :func:`set_size` overrides them where the model allows it and
refuses, in one line, a value it cannot run.
"""

from __future__ import annotations

import torch

from rstr.errors import ModelError
from rstr.families.base import Family

LATENT_FACTOR = 8  # pixels per latent pixel when the directory has no VAE to say (every stock pipeline here)


def set_size(family: Family, height: int | None, width: int | None, max_text_len: int | None) -> None:
    """Make ``family`` generate ``height`` x ``width`` images from prompts of ``max_text_len`` tokens (None: as it is)."""
    for flag, value in (("--height", height), ("--width", width), ("--max-text-len", max_text_len)):
        if value is not None and value <= 0:
            raise ModelError(f"{flag} {value} must be a positive number")
    if max_text_len is not None:
        if not family.text_len:
            raise ModelError(f"--max-text-len {max_text_len}: the {family.name} model takes no prompts; leave it out")
        family.text_len = max_text_len
    if height is None and width is None:
        return
    if height != width:
        raise ModelError(f"--height {height} --width {width}: give both, equal (bundles make square images)")
    assert height is not None
    factor = family.vae_scale_factor if family.vae is not None else LATENT_FACTOR
    step = factor * family.latent_multiple
    if height % step:
        raise ModelError(
            f"--height {height} must be a multiple of {step} for the {family.name} model "
            f"({factor} pixels per latent pixel x {family.latent_multiple} latent pixels per token)"
        )
    if not family.resize(height // factor):
        side = family.to_images(torch.zeros(family.sample_shape(1))).shape[-1] * factor
        raise ModelError(
            f"--height {height}: the {family.name} model's transformer makes {side} x {side} images only; leave --height/--width out"
        )

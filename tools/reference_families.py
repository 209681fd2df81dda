"""The four reference families of ``tools/train_reference.py``: what differs between them.

Each family's transformer (a small config of its diffusers class), its shipped sampler (DDIM, or
flow-matching Euler as FLUX.1-dev and Qwen-Image configure it) and its training defaults are a
:class:`Spec` in :data:`SPECS`; the text families' frozen random "text encoder" is
:func:`make_class_table` (saved by :func:`save_class_table`), read per row by :func:`conditioning`.
The recipe itself is in ``train_reference.py``'s docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rstr._io import write_json
from rstr.families import REFERENCE_MODEL

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # DiT: = num_embeds_ada_norm, the row diffusers adds; text families: the negative row
IMAGE_SIZE = 8
TEXT_LEN = 8  # tokens per prompt
TEXT_DIM = 64  # width of a token embedding (the "text encoder" output)
POOLED_DIM = 32  # FLUX's pooled prompt embedding
TABLE_FORMAT = "rstr.class-embeddings/1"
SAMPLE_STEPS = 25
REFERENCE_DIR = REFERENCE_MODEL.parent


# ------------------------------------------------------------------------- architectures
# DiT and PixArt: 16 patches of 2x2 pixels, 4 blocks of 4 heads x 32, eps only (no learned sigma).
_SPATIAL = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=1,
    out_channels=1,
    num_layers=4,
    sample_size=IMAGE_SIZE,
    patch_size=2,
)


def _dit() -> nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**_SPATIAL, num_embeds_ada_norm=NUM_CLASSES, norm_type="ada_norm_zero")


def _pixart() -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        **_SPATIAL,
        cross_attention_dim=128,
        caption_channels=TEXT_DIM,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )


def _flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )


def _qwenimage() -> nn.Module:
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=1,
        num_layers=3,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(8, 12, 12),
    )


def _ddim(spacing: str):
    """The DDIM sampler shipped with DiT and PixArt (same betas as training)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing=spacing,
        prediction_type="epsilon",
    )


def _flow_euler(max_shift: float, max_image_seq_len: int, **extra) -> Callable[[str], object]:
    """The Euler flow-matching sampler with dynamic shifting as FLUX.1-dev and Qwen-Image configure it.

    The factory takes ``spacing`` like :func:`_ddim`, a DDIM option unused here.
    """

    def make(spacing: str):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=1.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=max_shift,
            base_image_seq_len=256,
            max_image_seq_len=max_image_seq_len,
            **extra,
        )

    return make


@dataclass(frozen=True)
class Spec:
    """What differs between families; everything else in ``train_reference.py`` is shared."""

    family: str  # rstr family name
    make_transformer: Callable[[], nn.Module]
    make_scheduler: Callable[[str], object]
    objective: str  # "epsilon" (DDPM, cosine betas) or "flow" (rectified flow)
    packed: bool  # latents packed 2x2 as FLUX / Qwen-Image pipelines do
    table: tuple[str, ...]  # conditioning inputs of the class table, in cond_specs order (empty: class labels)
    steps: int
    batch_size: int
    lr: float
    scales: tuple[float, ...]  # constant CFG scales scored for default_scale

    @property
    def name(self) -> str:
        return f"digits-{self.family}"


_TEXT = dict(steps=3000, batch_size=64, lr=2e-3, scales=(1.1, 1.2, 1.3, 1.5, 2.0))
SPECS = {
    s.family: s
    for s in (
        Spec(
            "dit",
            _dit,
            _ddim,
            "epsilon",
            packed=False,
            table=(),
            steps=4000,
            batch_size=128,
            lr=1e-3,
            scales=(1.0, 1.25, 1.5, 2.0, 3.0),
        ),
        Spec(
            "pixart", _pixart, _ddim, "epsilon", packed=False, table=("encoder_hidden_states", "encoder_attention_mask"), **_TEXT
        ),
        Spec(
            "flux",
            _flux,
            _flow_euler(1.15, 4096),
            "flow",
            packed=True,
            table=("encoder_hidden_states", "pooled_projections"),
            **_TEXT,
        ),
        Spec(
            "qwenimage",
            _qwenimage,
            _flow_euler(0.9, 8192, shift_terminal=0.02, time_shift_type="exponential"),
            "flow",
            packed=True,
            table=("encoder_hidden_states", "encoder_hidden_states_mask"),
            **_TEXT,
        ),
    )
}


# ------------------------------------------------------------------------- class tables
def make_class_table(spec: Spec, seed: int) -> dict[str, torch.Tensor]:
    """The frozen random "text encoder" of a text family: one tensor per conditioning input.

    Each tensor is ``[NUM_CLASSES + 1, *row]``: row ``k`` is the prompt of class ``k`` (``2 + k % 7``
    real tokens, the last the shared end-of-prompt token, then zero padding), row ``NULL_CLASS``
    the empty prompt (the end-of-prompt token alone).  Masks are 1 on real tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = NUM_CLASSES + 1
    words = torch.randn((NUM_CLASSES, TEXT_LEN, TEXT_DIM), generator=gen)
    end = torch.randn((TEXT_DIM,), generator=gen)
    real = [2 + k % (TEXT_LEN - 1) for k in range(NUM_CLASSES)] + [1]
    hidden = torch.zeros((rows, TEXT_LEN, TEXT_DIM))
    mask = torch.zeros((rows, TEXT_LEN))
    for k, n in enumerate(real):
        if k < NUM_CLASSES:
            hidden[k, : n - 1] = words[k, : n - 1]
        hidden[k, n - 1] = end
        mask[k, :n] = 1.0
    table = {"encoder_hidden_states": hidden}
    for name in spec.table[1:]:
        table[name] = torch.randn((rows, POOLED_DIM), generator=gen) if name == "pooled_projections" else mask
    return table


def save_class_table(directory: Path, spec: Spec, table: dict[str, torch.Tensor]) -> None:
    """Write ``class_embeddings/`` (``config.json`` + ``embeddings.safetensors``) in :data:`TABLE_FORMAT`."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    config = {"format": TABLE_FORMAT, "num_classes": NUM_CLASSES, "negative_row": NULL_CLASS, "inputs": list(spec.table)}
    write_json(directory / "config.json", config)
    save_file(
        {k: table[k].float().contiguous() for k in spec.table},
        str(directory / "embeddings.safetensors"),
        metadata={"format": TABLE_FORMAT},
    )


def conditioning(spec: Spec, table: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Conditioning tensors for table rows (class indices; ``NULL_CLASS`` = unconditional)."""
    if not spec.table:
        return {"class_labels": rows}
    return {name: table[name][rows] for name in spec.table}

"""The sampler matches the stock diffusers pipelines, and unguided steps really run one pass."""

from __future__ import annotations

import pytest
import torch
from tiny import stock_call, stock_pipeline, text_conditioning, tiny_dit, tiny_flux, tiny_pixart, tiny_qwenimage

from rstr.sampler import sample
from rstr.schedule import GuidanceSchedule

STEPS, SCALE, B = 3, 3.0, 2


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    rel = ((a - b).abs().max() / b.abs().max()).item()
    assert rel <= rtol, f"max relative error {rel:.2e} > {rtol:.0e}"


class _LatentTap:
    """Captures the latents the pipeline hands to its last scheduler step's output."""

    def __init__(self, scheduler):
        self.last = None
        original = scheduler.step

        def step(*args, **kwargs):
            out = original(*args, **kwargs)
            self.last = out[0] if isinstance(out, tuple) else out.prev_sample
            return out

        scheduler.step = step


def test_dit_matches_dit_pipeline():
    from diffusers import DiTPipeline

    family = tiny_dit(learned_sigma=True, num_classes=1000)  # DiTPipeline hard-codes null class 1000
    pipe = DiTPipeline(transformer=family.transformer, vae=_tiny_vae(), scheduler=family.fresh_scheduler())
    tap = _LatentTap(pipe.scheduler)
    pipe(
        class_labels=[1, 7],
        guidance_scale=SCALE,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    expected = tap.last.chunk(2)[0]  # DiTPipeline steps the doubled batch

    schedule = GuidanceSchedule.constant(SCALE, STEPS, family="dit", sampler=family.sampler)
    ours = sample(family, schedule, family.labels([1, 7]), generator=torch.Generator().manual_seed(0))
    assert_close(ours, expected)


def stock_pixart_latents(family, cond, uncond=None, *, scale: float, steps: int = STEPS, scheduler=None) -> torch.Tensor:
    """``PixArtAlphaPipeline``'s latents from embeddings (no text encoder, a tiny VAE, 8x8) and generator seed 0."""
    pipe = stock_pipeline(family, _tiny_vae(), scheduler)
    g = torch.Generator().manual_seed(0)
    return stock_call(
        pipe, family, cond, uncond, guidance_scale=scale, num_inference_steps=steps, generator=g, output_type="latent"
    )


def test_pixart_matches_pixart_pipeline():
    family = tiny_pixart()
    cond, uncond = text_conditioning(family, B, 0), text_conditioning(family, B, 1)
    expected = stock_pixart_latents(family, cond, uncond, scale=SCALE)
    schedule = GuidanceSchedule.constant(SCALE, STEPS, family="pixart", sampler=family.sampler)
    ours = sample(family, schedule, cond, uncond=uncond, generator=torch.Generator().manual_seed(0))
    assert_close(ours, expected)


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_flux_matches_flux_pipeline_true_cfg(guidance_embeds):
    from diffusers import FluxPipeline

    family = tiny_flux(guidance_embeds)
    cond, uncond = text_conditioning(family, B, 0), text_conditioning(family, B, 1)
    pipe = FluxPipeline(
        scheduler=family.fresh_scheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=family.transformer,
    )
    size = family.latent_size * 8
    expected = pipe(
        prompt_embeds=cond["encoder_hidden_states"],
        pooled_prompt_embeds=cond["pooled_projections"],
        negative_prompt_embeds=uncond["encoder_hidden_states"],
        negative_pooled_prompt_embeds=uncond["pooled_projections"],
        true_cfg_scale=SCALE,
        guidance_scale=3.5,
        num_inference_steps=STEPS,
        height=size,
        width=size,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    schedule = GuidanceSchedule.constant(SCALE, STEPS, family="flux", sampler=family.sampler)
    ours = sample(family, schedule, cond, uncond=uncond, generator=torch.Generator().manual_seed(0))
    assert_close(ours, expected)


def test_qwenimage_matches_qwenimage_pipeline_true_cfg():
    from diffusers import QwenImagePipeline

    family = tiny_qwenimage()
    cond, uncond = text_conditioning(family, B, 0), text_conditioning(family, B, 1)
    pipe = QwenImagePipeline(
        scheduler=family.fresh_scheduler(), vae=None, text_encoder=None, tokenizer=None, transformer=family.transformer
    )
    size = family.latent_size * 8
    expected = pipe(
        prompt_embeds=cond["encoder_hidden_states"],
        prompt_embeds_mask=cond["encoder_hidden_states_mask"],
        negative_prompt_embeds=uncond["encoder_hidden_states"],
        negative_prompt_embeds_mask=uncond["encoder_hidden_states_mask"],
        true_cfg_scale=SCALE,
        num_inference_steps=STEPS,
        height=size,
        width=size,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    schedule = GuidanceSchedule.constant(SCALE, STEPS, family="qwenimage", sampler=family.sampler)
    ours = sample(family, schedule, cond, uncond=uncond, generator=torch.Generator().manual_seed(0))
    assert_close(ours, expected)


def test_conditional_only_matches_pipeline_without_guidance():
    family = tiny_pixart()
    cond = text_conditioning(family, B, 0)
    expected = stock_pixart_latents(family, cond, scale=1.0)
    ours = sample(
        family,
        GuidanceSchedule.conditional_only(STEPS, family="pixart", sampler=family.sampler),
        cond,
        generator=torch.Generator().manual_seed(0),
    )
    assert_close(ours, expected)


@pytest.mark.parametrize("make", [tiny_dit, tiny_flux], ids=["dit", "flux"])
def test_unguided_steps_run_one_pass_at_batch_b(make):
    family = make()
    batches: list[int] = []
    family.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: batches.append(int((args[0] if args else kwargs["hidden_states"]).shape[0])), with_kwargs=True
    )
    guided = (True, False, True, False)
    schedule = GuidanceSchedule(
        family=family.name,
        sampler=family.sampler,
        guided=guided,
        scales=tuple(2.0 if g else None for g in guided),
        default_steps=4,
    )
    if family.name == "dit":
        cond, uncond = family.labels([3, 4]), None
    else:
        cond, uncond = text_conditioning(family, B, 0), text_conditioning(family, B, 1)
    sample(family, schedule, cond, uncond=uncond, generator=torch.Generator().manual_seed(0))
    assert batches == [2 * B, B, 2 * B, B]
    assert schedule.passes_per_image == 6


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=8,
    )

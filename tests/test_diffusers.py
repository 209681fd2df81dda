"""rstr.diffusers: schedules, adapters and exported pipelines inside stock diffusers equal rstr's own sampler."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from test_parity import _LatentTap, _tiny_vae, assert_close
from tiny import stock_call, stock_pipeline, text_conditioning, tiny_dit, tiny_flux, tiny_pixart, tiny_qwenimage

import rstr.diffusers as rd
from rstr.errors import RstrError, ScheduleError
from rstr.families import load_model
from rstr.sampler import sample
from rstr.schedule import GuidanceSchedule

ROOT = Path(__file__).resolve().parent.parent
BUDGET_50 = ROOT / "docs" / "search" / "digits-dit" / "budget-50" / "schedule.json"
B = 2
GUIDED = (True, False, True, False)


def sparse(family) -> GuidanceSchedule:
    return GuidanceSchedule(
        family=family.name, sampler=family.sampler, guided=GUIDED, scales=(3.0, None, 1.5, None), default_steps=4
    )


def count_rows(family) -> list[int]:
    """Rows entering the first transformer block, one entry per real transformer pass."""
    rows: list[int] = []
    family.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(int((args[0] if args else kwargs["hidden_states"]).shape[0])), with_kwargs=True
    )
    return rows


def random_adapter(family, path: Path, targets: list[str], seed: int = 0) -> Path:
    """A peft LoRA in rstr calibrate's layout with random B (and a scale != 1 on one module)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    first = targets[0]
    config = LoraConfig(
        r=2, lora_alpha=2, target_modules=targets, rank_pattern={first: 4}, alpha_pattern={first: 8}, lora_dropout=0.0
    )
    model = get_peft_model(copy.deepcopy(family.transformer), config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = 0.05 * torch.randn_like(p)
    model.save_pretrained(path)
    return path


def calibrated(family, adapter: Path):
    from rstr.calibrate import apply_adapter

    merged = copy.deepcopy(family)
    apply_adapter(merged, adapter)
    return merged


def run_cli(argv, capsys, monkeypatch) -> tuple[int, str]:
    from rstr.cli import main

    monkeypatch.setattr(sys, "argv", ["rstr", *map(str, argv)])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def dit_pipeline(family):
    from diffusers import DiTPipeline

    return DiTPipeline(transformer=family.transformer, vae=rd.PixelDecoder(), scheduler=family.fresh_scheduler())


def run_dit(pipe, labels, seed=0) -> torch.Tensor:
    """The latents DiTPipeline ends with (it decodes them; its scheduler steps the doubled batch)."""
    tap = _LatentTap(pipe.scheduler)
    pipe(class_labels=labels, generator=torch.Generator().manual_seed(seed), output_type="pt")
    return tap.last[: len(labels)]


# ----------------------------------------------------------------------- DiT, classic pipeline
def test_dit_reference_budget_50_schedule_equals_rstr_sampler():
    from diffusers import DiTPipeline

    family = load_model()  # the digits DiT: classes 0..9, null class 10 (DiTPipeline hard-codes 1000)
    schedule = GuidanceSchedule.load(BUDGET_50)
    labels = [1, 7, 3]
    expected = sample(family, schedule, family.labels(labels), generator=torch.Generator().manual_seed(0))
    pipe = dit_pipeline(family)
    stock_scheduler = pipe.scheduler
    rows = count_rows(family)
    with rd.apply(pipe, schedule):
        assert type(pipe).__name__ == "DiTPipeline" and isinstance(pipe, DiTPipeline)
        latents = run_dit(pipe, labels)
        images = pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert_close(latents, expected)
    assert torch.allclose(images, (expected / 2 + 0.5).clamp(0, 1), atol=1e-5)  # PixelDecoder: the digits themselves
    n = len(labels)
    assert rows[: schedule.num_steps] == [2 * n if g else n for g in schedule.guided]  # unguided steps: ONE pass at B
    assert sum(rows[: schedule.num_steps]) == schedule.passes_per_image * n
    # removed: the stock class, scheduler and an unhooked transformer again
    assert type(pipe) is DiTPipeline and pipe.scheduler is stock_scheduler
    assert not family.transformer._diffusers_hook.hooks


# ------------------------------------------------------------------ text pipelines, classic
def latents_call(pipe, family, cond, uncond, **kw):
    return stock_call(pipe, family, cond, uncond, output_type="latent", **kw)


def text_pipeline(kind: str):
    """(family, stock pipeline around its transformer, call) for one text-to-image family."""
    if kind == "pixart":
        family, vae = tiny_pixart(), _tiny_vae()
    elif kind.startswith("flux"):
        family, vae = tiny_flux(guidance_embeds=kind == "flux-guidance"), None
    else:
        family, vae = tiny_qwenimage(), None
    return family, stock_pipeline(family, vae), latents_call


@pytest.mark.parametrize("kind", ["pixart", "flux", "flux-guidance", "qwenimage"])
def test_text_pipelines_follow_the_schedule(kind):
    family, pipe, call = text_pipeline(kind)
    cond, uncond = text_conditioning(family, B, 0), text_conditioning(family, B, 1)
    schedule = sparse(family)
    expected = sample(family, schedule, cond, uncond=uncond, generator=torch.Generator().manual_seed(0))
    rows = count_rows(family)
    with rd.apply(pipe, schedule):
        got = call(pipe, family, cond, uncond, generator=torch.Generator().manual_seed(0))
    assert_close(got, expected)
    if kind == "pixart":  # one 2B call on guided steps, B on unguided ones
        assert rows == [2 * B, B, 2 * B, B]
    else:  # a conditional call every step, an unconditional one only on guided steps
        assert rows == [B] * schedule.passes_per_image


def own_timesteps(family) -> GuidanceSchedule:
    """:func:`sparse` on a grid of its own that starts below the stock pipelines' sigma 1."""
    s = sparse(family)
    return GuidanceSchedule(
        family=s.family, sampler=s.sampler, guided=s.guided, scales=s.scales, default_steps=4, timesteps=(950, 600, 300, 80)
    )


@pytest.mark.parametrize("kind", ["flux", "qwenimage"])
def test_flow_pipelines_follow_a_schedule_with_its_own_timesteps(kind):
    """The pipelines shift the sigmas they pass; the pinned scheduler runs the schedule's grid as given."""
    family, pipe, call = text_pipeline(kind)
    cond, uncond = text_conditioning(family, B, 0), text_conditioning(family, B, 1)
    schedule = own_timesteps(family)
    expected = sample(family, schedule, cond, uncond=uncond, generator=torch.Generator().manual_seed(0))
    stock = sample(family, sparse(family), cond, uncond=uncond, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(expected, stock, atol=1e-3)
    scheduler = pipe.scheduler
    with rd.apply(pipe, schedule):
        got = call(pipe, family, cond, uncond, generator=torch.Generator().manual_seed(0))
        assert [float(t) for t in pipe.scheduler.timesteps] == [950.0, 600.0, 300.0, 80.0]
    assert_close(got, expected)
    assert pipe.scheduler is scheduler


def test_remove_restores_the_stock_pipeline():
    family, pipe, call = text_pipeline("pixart")
    cond, uncond = text_conditioning(family, B, 0), text_conditioning(family, B, 1)
    stock = call(
        pipe, family, cond, uncond, guidance_scale=3.0, num_inference_steps=3, generator=torch.Generator().manual_seed(0)
    )
    rd.apply(pipe, sparse(family))
    call(pipe, family, cond, uncond, generator=torch.Generator().manual_seed(0))
    rd.remove(pipe)
    again = call(
        pipe, family, cond, uncond, guidance_scale=3.0, num_inference_steps=3, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(stock, again)
    with pytest.raises(RstrError, match="follows no rstr schedule"):
        rd.remove(pipe)


def test_apply_refuses_what_the_schedule_decides():
    family, pipe, call = text_pipeline("flux")
    cond, uncond = text_conditioning(family, B, 0), text_conditioning(family, B, 1)
    with rd.apply(pipe, sparse(family)):
        with pytest.raises(RstrError, match="true_cfg_scale= is set by the rstr schedule"):
            call(pipe, family, cond, uncond, true_cfg_scale=4.0)
        with pytest.raises(ScheduleError, match="num_inference_steps 28 differs from the schedule's 4 steps"):
            call(pipe, family, cond, uncond, num_inference_steps=28)
        with pytest.raises(RstrError, match="no unconditional pass at step 0: give it a negative prompt"):
            call(pipe, family, cond, None)
        with pytest.raises(RstrError, match="already follows an rstr schedule"):
            rd.apply(pipe, sparse(family))
    with rd.apply(pipe, GuidanceSchedule.constant(2.0, 1, family="flux", sampler=family.sampler)):  # caught after the last step
        with pytest.raises(
            RstrError, match="the schedule has guided steps but the pipeline made no unconditional pass at step 0"
        ):
            call(pipe, family, cond, None)
    with pytest.raises(ScheduleError, match="schedule is for family 'dit'"):
        rd.apply(pipe, GuidanceSchedule.constant(2.0, 4, family="dit", sampler="ddim"))
    with pytest.raises(RstrError, match="StableDiffusionPipeline is not supported"):
        rd.apply(type("StableDiffusionPipeline", (), {})(), sparse(family))


def test_conditional_only_schedule_runs_the_pipeline_without_cfg():
    family, pipe, call = text_pipeline("qwenimage")
    cond = text_conditioning(family, B, 0)
    schedule = GuidanceSchedule.conditional_only(3, family=family.name, sampler=family.sampler)
    expected = sample(family, schedule, cond, generator=torch.Generator().manual_seed(0))
    rows = count_rows(family)
    with rd.apply(pipe, schedule):
        got = call(pipe, family, cond, text_conditioning(family, B, 1), generator=torch.Generator().manual_seed(0))
    assert_close(got, expected)
    assert rows == [B, B, B]


# ------------------------------------------------------------------------- guider path
def test_guider_round_trip(tmp_path):
    schedule = GuidanceSchedule.load(BUDGET_50)
    guider = rd.ScheduledGuidance.from_schedule(schedule)
    guider.save_pretrained(tmp_path)
    loaded = rd.ScheduledGuidance.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "guider_config.json").read_text())["schedule"] == schedule.to_dict()
    assert loaded.schedule == schedule and loaded.new().schedule == schedule
    assert loaded.call_kwargs() == {"num_inference_steps": 20}  # its timesteps come from rd.pinned_scheduler
    c, u = torch.randn(2, 4), torch.randn(2, 4)
    for i, t in enumerate(schedule.timesteps):
        outs = []
        for g in (guider, loaded):
            g.set_state(step=i, num_inference_steps=schedule.num_steps, timestep=torch.tensor(t))
            outs.append((g.num_conditions, g(_batches(g, c, u)).pred))
        assert outs[0][0] == outs[1][0] == (2 if schedule.guided[i] else 1)
        want = u + schedule.scales[i] * (c - u) if schedule.guided[i] else c
        assert torch.equal(outs[0][1], want) and torch.equal(outs[1][1], want)
    with pytest.raises(ScheduleError, match="the pipeline runs 25 steps but the schedule has 20"):
        loaded.set_state(step=0, num_inference_steps=25, timestep=torch.tensor(999))
    assert rd.ScheduledGuidance.from_schedule(schedule, enabled=False).new().config.enabled is False


def _batches(guider, c, u):
    """The batches a modular pipeline would run, with their predictions attached."""
    batches = guider.prepare_inputs({"x": (c, u)})
    for batch in batches:
        batch.noise_pred = batch.x
    return batches


@pytest.mark.parametrize("grid", ["stock", "own"])
def test_qwenimage_modular_pipeline_with_the_guider(tmp_path, grid):
    from diffusers.modular_pipelines.qwenimage.modular_blocks_qwenimage import QwenImageCoreDenoiseStep

    from rstr.families.flux import pack_latents

    family = tiny_qwenimage()
    cond, uncond = text_conditioning(family, B, 0), text_conditioning(family, B, 1)
    schedule = sparse(family) if grid == "stock" else own_timesteps(family)
    rd.ScheduledGuidance.from_schedule(schedule).save_pretrained(tmp_path)
    guider = rd.ScheduledGuidance.from_pretrained(tmp_path)
    pipe = QwenImageCoreDenoiseStep().init_pipeline()
    scheduler = family.fresh_scheduler() if grid == "stock" else rd.pinned_scheduler(family.fresh_scheduler(), schedule)
    pipe.update_components(transformer=family.transformer, scheduler=scheduler, guider=guider)
    expected = sample(family, schedule, cond, uncond=uncond, generator=torch.Generator().manual_seed(0))
    rows = count_rows(family)
    size = family.latent_size * 8
    latents = pipe(
        prompt_embeds=cond["encoder_hidden_states"],
        prompt_embeds_mask=cond["encoder_hidden_states_mask"],
        negative_prompt_embeds=uncond["encoder_hidden_states"],
        negative_prompt_embeds_mask=uncond["encoder_hidden_states_mask"],
        height=size,
        width=size,
        generator=torch.Generator().manual_seed(0),
        output="latents",
        **guider.call_kwargs(),
    )
    assert_close(pack_latents(latents[:, :, 0]), expected)
    assert rows == [B] * schedule.passes_per_image  # the guider asks for one batch on unguided steps


# ---------------------------------------------------------------------------- adapters
def test_apply_with_adapter_equals_merged_adapter_and_unloads(tmp_path):
    family = tiny_dit(learned_sigma=True, num_classes=10)
    adapter = random_adapter(family, tmp_path / "adapter", ["attn1.to_q", "attn1.to_v", "ff.net.2"])
    schedule = sparse(family)
    expected = sample(calibrated(family, adapter), schedule, family.labels([2, 5]), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in family.transformer.state_dict().items()}
    pipe = dit_pipeline(family)
    with rd.apply(pipe, schedule, adapter=adapter):
        got = run_dit(pipe, [2, 5])
    assert_close(got, expected)
    after = family.transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("kind", ["flux", "qwenimage"])
def test_exported_lora_loads_with_load_lora_weights(tmp_path, kind):
    family, pipe, call = text_pipeline(kind)
    adapter = random_adapter(family, tmp_path / "adapter", ["to_q", "to_v"])
    cond, uncond = text_conditioning(family, B, 0), text_conditioning(family, B, 1)
    schedule = sparse(family)
    expected = sample(calibrated(family, adapter), schedule, cond, uncond=uncond, generator=torch.Generator().manual_seed(0))
    out = rd.export_lora(family, adapter, tmp_path / "lora")
    assert out.name == "pytorch_lora_weights.safetensors"
    pipe.load_lora_weights(out.parent)
    with rd.apply(pipe, schedule):
        got = call(pipe, family, cond, uncond, generator=torch.Generator().manual_seed(0))
    assert_close(got, expected)


# ------------------------------------------------------------------- export-diffusers
def test_export_diffusers_round_trip_reproduces_the_sampler(tmp_path, capsys, monkeypatch):
    from diffusers import DiffusionPipeline, DiTPipeline

    reference = load_model()
    adapter = random_adapter(reference, tmp_path / "adapter", ["attn1.to_q", "attn1.to_out.0", "ff.net.2"])
    out = tmp_path / "digits-pipe"
    code, err = run_cli(["export-diffusers", "--schedule", BUDGET_50, "--adapter", adapter, "--out", out], capsys, monkeypatch)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "digits-pipe"]  # written atomically, nothing left over

    schedule = GuidanceSchedule.load(BUDGET_50)
    expected = sample(
        calibrated(reference, adapter), schedule, reference.labels([0, 9]), generator=torch.Generator().manual_seed(3)
    )
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, DiTPipeline) and isinstance(pipe.vae, rd.PixelDecoder)
    rd.apply(pipe, rd.ScheduledGuidance.from_pretrained(out, subfolder="guider"))
    assert_close(run_dit(pipe, [0, 9], seed=3), expected, rtol=1e-4)
    assert_close(run_dit(rd.load_pipeline(out), [0, 9], seed=3), expected, rtol=1e-4)
    exported = load_model(out)  # rstr reads it too (rstr.json kept): the adapter is fused into its weights
    assert_close(sample(exported, schedule, exported.labels([0, 9]), generator=torch.Generator().manual_seed(3)), expected)

    code, err = run_cli(["export-diffusers", "--schedule", BUDGET_50, "--out", out], capsys, monkeypatch)
    assert code == 1 and "already exists; pass --force" in err


def test_export_diffusers_reproduces_the_bundle(tmp_path, pixel_dit_bundle, capsys, monkeypatch):
    """The conftest bundle's model and own-timestep schedule, exported for diffusers: same latents as the ONNX bundle."""
    from diffusers.utils.torch_utils import randn_tensor
    from rstr.engines import Pipeline

    source = pixel_dit_bundle.parent
    out = tmp_path / "pipe"
    code, err = run_cli(
        ["export-diffusers", "--model", source / "model", "--schedule", source / "schedule.json", "--out", out],
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    pipe = rd.load_pipeline(out)
    got = run_dit(pipe, [3, 4], seed=0)
    noise = randn_tensor((2, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float32)  # what DiTPipeline drew
    bundle = Pipeline.load(pixel_dit_bundle, backend="onnxruntime")({"class_labels": [3, 4]}, noise=noise.numpy())
    assert_close(got, torch.from_numpy(bundle.latents), rtol=1e-4)


def test_export_from_a_pipeline_directory_keeps_its_components(tmp_path):
    """A pipeline directory as input: its VAE travels, the transformer is replaced by the calibrated one."""
    from safetensors.torch import save_file

    family, pipe, call = text_pipeline("pixart")
    pipe.save_pretrained(tmp_path / "source")
    (tmp_path / "source" / "rstr.json").write_text(
        json.dumps({"default_steps": 4, "default_scale": 3.0, "text_len": family.text_len})
    )
    table = tmp_path / "source" / "class_embeddings"  # a 2-class table: rstr's stand-in for a text encoder
    table.mkdir()
    rows = {s.name: torch.randn(3, *s.concrete(1)[1:]) for s in family.cond_specs()}
    rows["encoder_attention_mask"] = torch.ones_like(rows["encoder_attention_mask"])
    save_file(rows, str(table / "embeddings.safetensors"))
    (table / "config.json").write_text(
        json.dumps(
            {
                "format": "rstr.class-embeddings/1",
                "num_classes": 2,
                "negative_row": 2,
                "inputs": [s.name for s in family.cond_specs()],
            }
        )
    )
    source = load_model(tmp_path / "source")
    adapter = random_adapter(source, tmp_path / "adapter", ["attn1.to_q", "attn2.to_k"])
    schedule = sparse(source)
    cond, uncond = text_conditioning(family, B, 0), text_conditioning(family, B, 1)
    expected = sample(calibrated(source, adapter), schedule, cond, uncond=uncond, generator=torch.Generator().manual_seed(0))
    out = rd.export_pipeline(tmp_path / "source", schedule, tmp_path / "out", adapter=adapter)
    exported = rd.load_pipeline(out)
    assert all(torch.equal(a, b) for a, b in zip(exported.vae.state_dict().values(), pipe.vae.state_dict().values()))
    assert_close(call(exported, family, cond, uncond, generator=torch.Generator().manual_seed(0)), expected)
    again = load_model(out)  # rstr reads the export: rstr.json and the class table came along, the adapter is fused
    cond2, uncond2 = again.conditioning_for(torch.tensor([1, 0]))
    assert torch.equal(cond2["encoder_hidden_states"], rows["encoder_hidden_states"][[1, 0]])
    assert_close(
        sample(again, schedule, cond2, uncond=uncond2, generator=torch.Generator().manual_seed(0)),
        sample(calibrated(source, adapter), schedule, cond2, uncond=uncond2, generator=torch.Generator().manual_seed(0)),
    )


def test_export_diffusers_user_errors_are_one_line(tmp_path, capsys, monkeypatch):
    GuidanceSchedule.constant(2.0, 4, family="flux", sampler="flow_euler").save(tmp_path / "flux.json")
    code, err = run_cli(
        ["export-diffusers", "--schedule", tmp_path / "flux.json", "--out", tmp_path / "out"], capsys, monkeypatch
    )
    assert (
        code == 1
        and err.strip() == "rstr: error: schedule is for family 'flux' but the model is 'dit'; search a schedule for this model"
    )
    code, err = run_cli(
        ["export-diffusers", "--schedule", BUDGET_50, "--model", tmp_path / "none", "--out", tmp_path / "out"],
        capsys,
        monkeypatch,
    )
    assert code == 1 and err.startswith(f"rstr: error: model path {tmp_path / 'none'} does not exist")
    assert not (tmp_path / "out").exists()

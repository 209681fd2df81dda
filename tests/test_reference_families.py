"""The reference models of the text families (digits-pixart, digits-flux, digits-qwenimage) as shipped.

Each directory must load with plain diffusers, carry a class table in the ``rstr.class-embeddings/1``
format that matches its family's conditioning inputs, and sample recognisable digits through rstr's
sampler with conditioning gathered from that table.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rstr.families import FAMILIES, REFERENCE_MODEL, load_model
from rstr.metrics import load_classifier
from rstr.sampler import sample

MODELS = {"digits-pixart": "pixart", "digits-flux": "flux", "digits-qwenimage": "qwenimage"}
INPUTS = {
    "pixart": ["encoder_hidden_states", "encoder_attention_mask"],
    "flux": ["encoder_hidden_states", "pooled_projections"],
    "qwenimage": ["encoder_hidden_states", "encoder_hidden_states_mask"],
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def shipped(request):
    """(directory, rstr.json, family built from the diffusers-loaded transformer and scheduler, table)."""
    import diffusers

    path = REFERENCE_MODEL.parent / request.param
    meta = json.loads((path / "rstr.json").read_text())
    family_cls = FAMILIES[MODELS[request.param]]
    transformer = getattr(diffusers, family_cls.transformer_class).from_pretrained(path / "transformer")
    sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_pretrained(path / "scheduler")
    family = family_cls(transformer, scheduler, default_steps=meta["default_steps"], meta=meta, path=path)
    table = load_file(str(path / "class_embeddings" / "embeddings.safetensors"))
    return path, meta, family, table


def test_metadata(shipped):
    path, meta, family, _ = shipped
    assert meta["name"] == path.name and meta["family"] == family.name == MODELS[path.name]
    assert meta["num_classes"] == 10 and meta["seed"] == 0
    assert meta["image"] == {"channels": 1, "size": 8, "range": [-1, 1]}
    assert meta["text_len"] == 8 and family.text_len == 8
    if family.name != "pixart":
        assert meta["latent_size"] == 8 and family.sample_shape(1) == (1, 16, 4)
    else:
        assert family.sample_shape(1) == (1, 1, 8, 8) and not family.learned_sigma
    calibration = meta["recipe"]["scale_calibration"]
    best = min(calibration["fd_by_scale"], key=lambda w: calibration["fd_by_scale"][w]["fd"])
    assert float(best) == meta["default_scale"] and meta["default_steps"] == calibration["steps"]
    # guidance matters: constant CFG at the default scale beats conditional-only, with class accuracy >= 0.98
    chosen = calibration["fd_by_scale"][best]
    assert chosen["fd"] < calibration["conditional_only"]["fd"] and chosen["accuracy"] >= 0.98
    for key in ("train_seconds", "torch", "device", "final_loss_avg200"):
        assert key in meta["recipe"]


def test_classifier_is_the_shared_one(shipped):
    path, meta, _, _ = shipped
    assert (path / meta["classifier"]).read_bytes() == (REFERENCE_MODEL / "classifier.safetensors").read_bytes()


def test_small_enough_to_commit(shipped):
    path, _, family, _ = shipped
    assert sum(p.numel() for p in family.transformer.parameters()) < 2_500_000
    assert sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) < 12 * 2**20


def test_class_table_format(shipped):
    path, _, family, table = shipped
    config = json.loads((path / "class_embeddings" / "config.json").read_text())
    names = [s.name for s in family.cond_specs()]
    assert config == {"format": "rstr.class-embeddings/1", "num_classes": 10, "negative_row": 10, "inputs": names}
    assert names == INPUTS[family.name] and sorted(table) == sorted(names)
    with safe_open(str(path / "class_embeddings" / "embeddings.safetensors"), "pt") as f:
        assert (f.metadata() or {}).get("format") == "rstr.class-embeddings/1"
    for spec in family.cond_specs():
        t = table[spec.name]
        assert t.dtype == torch.float32 and tuple(t.shape) == (11, *spec.concrete(1)[1:]) and torch.isfinite(t).all()
    hidden = table["encoder_hidden_states"]
    real = (hidden.abs().sum(-1) > 0).float()  # padding tokens are zero vectors
    assert real.sum(1).tolist() == [2 + k % 7 for k in range(10)] + [1]
    assert torch.equal(real, (torch.arange(8) < real.sum(1, keepdim=True)).float())  # real tokens first
    # every prompt ends with the shared end-of-prompt token; the empty prompt (row 10) is that token alone
    ends = hidden[torch.arange(11), real.sum(1).long() - 1]
    assert torch.equal(ends, ends[10].expand_as(ends))
    mask_name = {"pixart": "encoder_attention_mask", "qwenimage": "encoder_hidden_states_mask"}.get(family.name)
    if mask_name:
        assert torch.equal(table[mask_name], real)
    else:
        assert table["pooled_projections"].abs().sum(1).min() > 0


def test_loader_draws_the_same_rows(shipped):
    path, _, family, table = shipped
    loaded = load_model(path)
    labels = torch.tensor([0, 3, 9])
    cond, uncond = loaded.conditioning_for(labels)
    for name in table:
        assert torch.equal(cond[name], table[name][labels])
        assert torch.equal(uncond[name], table[name][[10, 10, 10]])


def test_guided_sampling_makes_the_asked_digits(shipped):
    _, meta, family, table = shipped
    labels = torch.arange(20) % 10
    rows = lambda idx: {k: v[idx] for k, v in table.items()}  # noqa: E731
    schedule = family.constant_cfg(meta["default_scale"])
    gen = torch.Generator().manual_seed(0)
    latents = sample(family, schedule, rows(labels), uncond=rows(torch.full_like(labels, 10)), generator=gen)
    assert latents.shape == family.sample_shape(20) and torch.isfinite(latents).all()
    images = family.to_images(latents).clamp(-1, 1)
    assert images.shape == (20, 1, 8, 8)
    accuracy = (load_classifier(REFERENCE_MODEL / "classifier.safetensors").logits(images).argmax(1) == labels).float().mean()
    assert accuracy >= 0.8

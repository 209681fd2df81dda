"""Text models without classes take a prompt set (--prompts): search, calibration and sampling draw from it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny import TEXT_LEN, tiny_pixart

from rstr.calibrate import calibrate
from rstr.calibrate.train import Preset, seed_conditioning
from rstr.errors import ModelError
from rstr.families import load_model
from rstr.schedule import GuidanceSchedule
from rstr.search import preset_config, run_search

NUM_PROMPTS = 3


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny PixArt-alpha transformer directory (no class table) and a prompt set of 3 prompts plus the negative."""
    root = tmp_path_factory.mktemp("pixart-prompts")
    family = tiny_pixart()
    family.transformer.save_pretrained(root / "model" / "transformer")
    family.scheduler.save_pretrained(root / "model" / "scheduler")
    (root / "model" / "rstr.json").write_text(json.dumps({"default_steps": 4, "default_scale": 3.0, "text_len": TEXT_LEN}))
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(NUM_PROMPTS + 1, TEXT_LEN)
    mask[-1, 1:] = 0  # the negative (empty) prompt keeps one token
    save_file(
        {"encoder_hidden_states": torch.randn(NUM_PROMPTS + 1, TEXT_LEN, 32, generator=g), "encoder_attention_mask": mask},
        str(root / "prompts.safetensors"),
        metadata={"format": "rstr.prompts/1"},
    )
    return root / "model", root / "prompts.safetensors"


def test_prompt_set_is_the_conditioning(pixart_dir):
    model, prompts = pixart_dir
    family = load_model(model, prompts=prompts)
    assert (family.num_classes, family.quality, family.prompts) == (NUM_PROMPTS, "teacher", prompts.resolve())
    noise, cond = seed_conditioning(family, range(5))
    table = family.class_embeddings.tables
    assert torch.equal(cond["encoder_hidden_states"][4], table["encoder_hidden_states"][4 % NUM_PROMPTS])
    uncond = family.unconditional(cond)
    assert torch.equal(uncond["encoder_attention_mask"][0], table["encoder_attention_mask"][NUM_PROMPTS])
    with pytest.raises(Exception, match="no class table"):
        load_model(model).conditioning_for(torch.tensor([0]))


def test_bad_prompt_files_are_refused(pixart_dir, tmp_path):
    model, _ = pixart_dir
    save_file(
        {"encoder_hidden_states": torch.zeros(3, TEXT_LEN, 32)},
        str(tmp_path / "p.safetensors"),
        metadata={"format": "rstr.prompts/1"},
    )
    with pytest.raises(ModelError, match="expected the conditioning inputs"):
        load_model(model, prompts=tmp_path / "p.safetensors")
    save_file({"x": torch.zeros(3)}, str(tmp_path / "q.safetensors"))
    with pytest.raises(ModelError, match="metadata format None"):
        load_model(model, prompts=tmp_path / "q.safetensors")
    (tmp_path / "r.safetensors").write_text("not safetensors")
    with pytest.raises(ModelError, match="not a readable safetensors"):
        load_model(model, prompts=tmp_path / "r.safetensors")


def test_search_with_workers_and_calibration_use_the_prompts(pixart_dir, tmp_path):
    """Worker processes load the model with the same prompt set (teacher fidelity needs identical conditioning)."""
    model, prompts = pixart_dir
    family = load_model(model, prompts=prompts)
    config = replace(
        preset_config("fast", budget=0.75, steps=4, seed=0),
        step_counts=(3, 4),
        population=4,
        generations=1,
        search_num=4,
        held_out_num=4,
        held_out_groups=1,
        finalists=1,
        batch_size=4,
    )
    inline = run_search(family, config, tmp_path / "a", progress=False)
    pooled = run_search(family, config, tmp_path / "b", progress=False, workers=2)
    assert inline.report["objective"]["name"] == "teacher-fidelity"
    assert inline.schedule == pooled.schedule
    assert inline.report["result"]["search"] == pooled.report["result"]["search"]
    schedule = GuidanceSchedule(
        family="pixart", sampler="ddim", guided=(True, False, False), scales=(3.0, None, None), default_steps=4
    )
    tiny = Preset(pool=8, probe=4, probe_iterations=2, validation=4, batch_size=4, iterations=2, lr=1e-3, checkpoint_every=2)
    result = calibrate(family, schedule, tmp_path / "adapter", preset=tiny, budget=0.05, progress=False)
    assert np.isfinite(result.validation_after)


def test_cli_takes_prompts(pixart_dir, tmp_path):
    model, prompts = pixart_dir
    out = tmp_path / "x.npy"
    cmd = [
        sys.executable,
        "-m",
        "rstr.cli",
        "sample",
        "--model",
        str(model),
        "--prompts",
        str(prompts),
        "--classes",
        "2,0",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert np.load(out).shape == (2, 4, 8, 8)
    no_prompts = subprocess.run(cmd[:6] + cmd[8:], capture_output=True, text=True)
    assert no_prompts.returncode == 1 and "no class table" in no_prompts.stderr and "Traceback" not in no_prompts.stderr

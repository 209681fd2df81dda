"""Linear multistep schedulers baked into the plan: DPM-Solver++ 2M and UniPC bundles equal the stock pipeline.

A tiny PixArt-alpha with its stock ``DPMSolverMultistepScheduler`` (what the real model ships) or
``UniPCMultistepScheduler`` is exported with ``rstr-export build``; the bundle's latents from the
stock pipeline's noise equal ``PixArtAlphaPipeline``'s, the C++ runtime equals the Python ONNX
Runtime runner, and schedulers that are not linear are refused in one line.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rstr.engines.bundle import Bundle
from rstr.engines.manifest import Manifest
from rstr.engines.onnxruntime import OnnxRuntimeRunner
from rstr.export.build import BuildOptions, build
from rstr.export.plan import build_plan
from test_cpp import run
from tiny import TEXT_LEN, text_conditioning, tiny_pixart

from rstr.errors import BundleError, RstrError
from rstr.schedule import GuidanceSchedule

STEPS, SCALE, B = 6, 3.0, 2
MIXED = (True, True, False, True, False, False)


def _scheduler(name: str):
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    return {"dpm": DPMSolverMultistepScheduler(), "unipc": UniPCMultistepScheduler()}[name]


def _schedule(family, guided: tuple[bool, ...]) -> GuidanceSchedule:
    scales = tuple(SCALE if g else None for g in guided)
    return GuidanceSchedule(family="pixart", sampler=family.sampler, guided=guided, scales=scales, default_steps=STEPS)


CASES = {  # bundle -> (scheduler, guided steps): all guided and none match the stock pipeline at CFG 3 and 1
    "dpm-cfg": ("dpm", (True,) * STEPS),
    "unipc-cond-only": ("unipc", (False,) * STEPS),
    "dpm-mixed": ("dpm", MIXED),
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """``bundles(name)``: the built (and, by the build, verified against the PyTorch sampler) bundle of a case."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            scheduler, guided = CASES[name]
            family = tiny_pixart()
            family.scheduler = _scheduler(scheduler)
            tmp = tmp_path_factory.mktemp(name)
            family.transformer.save_pretrained(tmp / "model" / "transformer")
            family.scheduler.save_pretrained(tmp / "model" / "scheduler")
            (tmp / "model" / "rstr.json").write_text(json.dumps({"default_steps": STEPS, "text_len": TEXT_LEN}))
            _schedule(family, guided).save(tmp / "schedule.json")
            options = BuildOptions(
                model=tmp / "model", schedule=tmp / "schedule.json", out=tmp / "bundle", measure=False, batch=B
            )
            assert build(options).verification.max_rel_error <= 1e-4
            built[name] = tmp / "bundle"
        return built[name]

    return get


def _inputs(family) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    cond, uncond = text_conditioning(family, B, 0), text_conditioning(family, B, 1)
    noise = family.noise(B, torch.Generator().manual_seed(0))
    to_np = lambda d: {k: v.numpy() for k, v in d.items()}  # noqa: E731
    return to_np(cond), to_np(uncond), noise.numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("name", list(CASES))
def test_plan_carries_the_history_the_scheduler_uses(bundles, name):
    path = bundles(name)
    plan = Bundle.open(path).plan
    assert plan.history == {"dpm": 1, "unipc": 2}[CASES[name][0]]
    first, last = plan.steps[0], plan.steps[-1]
    assert first.past_sample == first.past_eps == ()  # no past at the first step: a first-order update
    assert last.past_sample == last.past_eps == ()  # lower_order_final: the last step is first order too
    data = json.loads((path / "manifest.json").read_text())
    assert isinstance(data["plan"]["steps"][0]["coef_eps"], float)
    assert len(data["plan"]["steps"][2]["coef_eps"]) == 2


@pytest.mark.parametrize("name", ["dpm-cfg", "unipc-cond-only"])  # the stock pipeline runs constant CFG (or none)
def test_bundle_equals_the_stock_pipeline(bundles, name):
    """The bundle (ONNX Runtime) from the stock pipeline's noise gives the stock PixArtAlphaPipeline's latents."""
    from test_parity import stock_pixart_latents

    path = bundles(name)
    scheduler, guided = CASES[name]
    family = tiny_pixart()
    cond, uncond, noise = _inputs(family)
    to_t = lambda d: {k: torch.from_numpy(v) for k, v in d.items()}  # noqa: E731
    scale = SCALE if all(guided) else 1.0
    expected = stock_pixart_latents(family, to_t(cond), to_t(uncond), scale=scale, steps=STEPS, scheduler=_scheduler(scheduler))
    with OnnxRuntimeRunner(Bundle.open(path)) as runner:
        got = runner.infer(noise, cond, uncond)
    assert _rel(got, expected.numpy()) <= 1e-4


@pytest.mark.cpp
@pytest.mark.parametrize("name", list(CASES))
def test_cpp_runtime_equals_python_onnxruntime(bundles, name, rstr_run, tmp_path):
    path = bundles(name)
    cond, uncond, noise = _inputs(tiny_pixart())
    args = ["--noise", tmp_path / "noise.npy", "--out", tmp_path / "out.npy"]
    np.save(tmp_path / "noise.npy", noise)
    for flag, inputs in (("--cond", cond), ("--uncond", uncond)):
        for k, v in inputs.items():
            np.save(tmp_path / f"{flag[2:]}-{k}.npy", v)
            args += [flag, f"{k}={tmp_path / f'{flag[2:]}-{k}.npy'}"]
    proc = run(rstr_run, path, *args)
    assert proc.returncode == 0, proc.stderr
    with OnnxRuntimeRunner(Bundle.open(path)) as runner:
        want = runner.infer(noise, cond, uncond)
    assert _rel(np.load(tmp_path / "out.npy"), want) <= 1e-5


@pytest.mark.parametrize(
    "config",
    [{"thresholding": True}, {"algorithm_type": "sde-dpmsolver++"}],
    ids=["thresholding", "sde"],
)
def test_non_linear_scheduler_is_refused_in_one_line(config):
    from diffusers import DPMSolverMultistepScheduler

    family = tiny_pixart()
    family.scheduler = DPMSolverMultistepScheduler(**config)
    with pytest.raises(RstrError, match=r"DPMSolverMultistepScheduler update at step 0 is not linear") as err:
        build_plan(family, _schedule(family, MIXED), batch=1)
    assert "\n" not in str(err.value)


def test_coefficients_as_numbers_or_lists_round_trip_and_old_bundles_load(bundles, tmp_path):
    """One-step coefficients stay plain numbers (old bundles load unchanged); lists of length 1 mean the same;
    an empty list, and step graphs with a history the plan does not use, are refused (tests/bad_bundles.py has
    the other way round, for every reader)."""
    path = bundles("dpm-mixed")
    data = json.loads((path / "manifest.json").read_text())
    manifest = Manifest.from_json(data)
    assert manifest.to_json() == data
    as_lists = copy.deepcopy(data)
    for s in as_lists["plan"]["steps"]:
        s["coef_sample"], s["coef_eps"] = (v if isinstance(v, list) else [v] for v in (s["coef_sample"], s["coef_eps"]))
    assert Manifest.from_json(as_lists) == manifest
    as_lists["plan"]["steps"][1]["coef_eps"] = []
    with pytest.raises(BundleError, match=r"plan.steps\[1\].coef_eps"):
        Manifest.from_json(as_lists)
    one_step = copy.deepcopy(data)
    for s in one_step["plan"]["steps"]:
        s["coef_sample"], s["coef_eps"] = (v[0] if isinstance(v, list) else v for v in (s["coef_sample"], s["coef_eps"]))
    copy_ = tmp_path / "one-step"
    shutil.copytree(path, copy_)
    (copy_ / "manifest.json").write_text(json.dumps(one_step))
    with pytest.raises(
        BundleError,
        match=r"graphs.step_guided.inputs are \[.*history.*\]; the runtime binds \[coef_eps, coef_sample, model_output",
    ):
        Bundle.open(copy_)


def test_scheduler_config_infinities_load_and_nan_is_refused(tmp_path):
    """diffusers saves DPMSolverMultistepScheduler with ``"lambda_min_clipped": -Infinity``: a model directory as
    it ships loads; ``NaN`` in the same file is still one clear line."""
    from rstr.families import load_model

    family = tiny_pixart()
    family.scheduler = _scheduler("dpm")
    family.transformer.save_pretrained(tmp_path / "transformer")
    family.scheduler.save_pretrained(tmp_path / "scheduler")
    config = tmp_path / "scheduler" / "scheduler_config.json"
    assert "-Infinity" in config.read_text()
    assert load_model(tmp_path).scheduler.config.lambda_min_clipped == float("-inf")
    config.write_text(config.read_text().replace("-Infinity", "NaN"))
    with pytest.raises(RstrError, match=r"scheduler_config.json is not valid JSON \(NaN is not a JSON number\)"):
        load_model(tmp_path)

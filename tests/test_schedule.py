"""GuidanceSchedule: constructors, properties, JSON round trip, and every malformed file refused."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from rstr.errors import ModelError, ScheduleError
from rstr.families import load_model
from rstr.schedule import GuidanceSchedule

KW = dict(family="dit", sampler="ddim")


def test_constructors_and_compute():
    const = GuidanceSchedule.constant(1.5, 25, **KW)
    assert const.passes_per_image == 50 and const.compute_fraction == 1.0
    cond = GuidanceSchedule.conditional_only(25, **KW)
    assert cond.passes_per_image == 25 and cond.compute_fraction == 0.5 and cond.scales == (None,) * 25
    first = GuidanceSchedule.first_k(1.5, 8, 5, default_steps=25, **KW)
    assert first.guided == (True,) * 5 + (False,) * 3
    assert first.passes_per_image == 13 and math.isclose(first.compute_fraction, 13 / 50)
    inter = GuidanceSchedule.interval(2.0, 10, 3, 6, **KW)
    assert [i for i, g in enumerate(inter.guided) if g] == [3, 4, 5]


def test_json_round_trip_is_identical(tmp_path):
    s = GuidanceSchedule(
        family="flux", sampler="flow_euler", guided=(True, False, True), scales=(3.25, None, 0.5), default_steps=28
    )
    s.save(tmp_path / "s.json")
    loaded = GuidanceSchedule.load(tmp_path / "s.json")
    assert loaded == s and loaded.sha256() == s.sha256()
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["format"] == "rstr.schedule/1" and data["num_steps"] == 3 and "timesteps" not in data
    own = GuidanceSchedule(
        family="dit", sampler="ddim", guided=(True, False), scales=(2.0, None), default_steps=25, timesteps=(910, 0)
    )
    own.save(tmp_path / "own.json")
    assert GuidanceSchedule.load(tmp_path / "own.json") == own and "timesteps 910..0" in own.describe()


def _write(tmp_path, **changes):
    data = GuidanceSchedule.first_k(2.0, 4, 2, **KW).to_dict()
    data.update(changes)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format": "rstr.schedule/0"}, "format 'rstr.schedule/0' is not 'rstr.schedule/1'"),
        ({"num_steps": 5}, "num_steps is 5 but 'steps' has 4 entries"),
        (
            {"steps": [{"guided": True, "scale": -1.0}] + [{"guided": False}] * 3},
            "step 0: scale -1.0 must be a finite number >= 0",
        ),
        # The strict JSON reader refuses non-finite numbers before the schedule's rules run (next test: the rules).
        ({"steps": [{"guided": True, "scale": float("nan")}] + [{"guided": False}] * 3}, "(NaN is not a JSON number)"),
        ({"steps": [{"guided": True, "scale": float("inf")}] + [{"guided": False}] * 3}, "(Infinity is not a JSON number)"),
        ({"extra": 1}, "unknown field(s) extra"),
        ({"steps": [{"guided": True, "scale": 1.0, "w": 2}] + [{"guided": False}] * 3}, "step 0 must be"),
        ({"timesteps": [900, 600, 0]}, "4 steps but 3 timesteps"),
        ({"timesteps": [900, 600, 600, 0]}, "must be strictly decreasing and >= 0"),
        ({"timesteps": [900, 600, 300, -1]}, "must be strictly decreasing and >= 0"),
        ({"timesteps": [900.5, 600, 300, 0]}, "must be integers"),
        ({"timesteps": "900,0"}, "'timesteps' must be a list of integers or null"),
        ({"num_steps": "4"}, "num_steps must be an integer (got string)"),
        ({"default_steps": 0}, "default_steps is 0; it must be at least 1"),
        ({"steps": [{"guided": "yes"}] + [{"guided": False}] * 3}, "steps[0].guided must be a boolean (got string)"),
    ],
)
def test_malformed_schedule_refused(tmp_path, changes, message):
    with pytest.raises(ScheduleError) as err:
        GuidanceSchedule.load(_write(tmp_path, **changes))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_non_finite_scale_refused_from_a_dict(scale):
    data = GuidanceSchedule.first_k(2.0, 4, 2, **KW).to_dict()
    data["steps"][0]["scale"] = scale
    with pytest.raises(ScheduleError) as err:
        GuidanceSchedule.from_dict(data)
    assert f"step 0: scale {scale}" in str(err.value) and "must be a finite number >= 0" in str(err.value)


def test_written_schedules_validate_and_a_missing_field_is_named(tmp_path):
    """What rstr writes is valid against schemas/schedule.schema.json; a file without a field names it."""
    from rstr.engines import schema

    own = GuidanceSchedule(
        family="dit", sampler="ddim", guided=(True, False), scales=(2.0, None), default_steps=25, timesteps=(910, 0)
    )
    for s in (own, GuidanceSchedule.first_k(2.0, 4, 2, **KW), GuidanceSchedule.conditional_only(3, **KW)):
        assert schema.check(s.to_dict(), "schedule") is None
    data = own.to_dict()
    del data["sampler"]
    with pytest.raises(ScheduleError, match=r"^schedule: missing field\(s\) sampler$"):
        GuidanceSchedule.from_dict(data)


def test_family_mismatch_refused():
    with pytest.raises(ScheduleError, match="schedule is for family 'flux' but the model is 'dit'"):
        GuidanceSchedule.constant(2.0, 4, family="flux", sampler="flow_euler").check_fits("dit")


def test_missing_and_unsupported_model_paths(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ModelError, match="'UNet2DConditionModel' is not supported"):
        load_model(tmp_path)


def test_cli_bad_schedule_is_one_line_exit_1(tmp_path):
    bad = _write(tmp_path, format="nope")
    out = subprocess.run(
        [sys.executable, "-m", "rstr.cli", "sample", "--schedule", str(bad), "--out", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert out.stderr.strip().startswith("rstr: error:") and len(out.stderr.strip().splitlines()) == 1
    assert "format 'nope'" in out.stderr


def test_own_timesteps_drive_ddim_and_the_step_plan():
    """A schedule's own timesteps: on the stock grid they reproduce diffusers' DDIM exactly; on any grid the
    exported plan's coefficients are DDIM's closed form between consecutive timesteps."""
    import torch
    from rstr.export.plan import build_plan

    from rstr.sampler import sample

    family = load_model()
    stock = GuidanceSchedule.first_k(1.5, 6, 2, default_steps=25, **KW)
    grid = tuple(int(t) for t in family.scheduler_for(stock).timesteps)
    same = GuidanceSchedule(guided=stock.guided, scales=stock.scales, default_steps=25, timesteps=grid, **KW)
    noise = family.noise(4, torch.Generator().manual_seed(0))
    labels = family.labels([0, 3, 5, 9])
    assert torch.equal(sample(family, same, labels, noise=noise), sample(family, stock, labels, noise=noise))

    own = GuidanceSchedule(
        guided=stock.guided, scales=stock.scales, default_steps=25, timesteps=(930, 700, 420, 200, 60, 0), **KW
    )
    assert not torch.allclose(sample(family, own, labels, noise=noise), sample(family, stock, labels, noise=noise))
    plan = build_plan(family, own, batch=1)
    alphas = family.scheduler.alphas_cumprod.double()
    final = float(family.scheduler.final_alpha_cumprod)
    for step, nxt in zip(plan.steps, [*own.timesteps[1:], None]):
        a, a_prev = float(alphas[int(step.timestep)]), float(alphas[nxt]) if nxt is not None else final
        assert math.isclose(step.coef_sample, (a_prev / a) ** 0.5, rel_tol=1e-5)
        assert math.isclose(step.coef_eps, (1 - a_prev) ** 0.5 - (a_prev * (1 - a) / a) ** 0.5, rel_tol=1e-4, abs_tol=1e-6)


def test_own_timesteps_drive_flow_matching_euler_and_the_step_plan():
    """On flow matching a schedule's timesteps are the sigmas t / T, used as given: on an unshifted scheduler the
    stock grid reproduces the stock sampler; on any grid the plan is Euler between consecutive sigmas, then to 0."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from rstr.export.plan import build_plan
    from tiny import text_conditioning, tiny_flux

    from rstr.sampler import sample

    family = tiny_flux()
    family.scheduler = FlowMatchEulerDiscreteScheduler()  # shift 1, no dynamic shifting: sigmas 1, .75, .5, .25
    kw = dict(family="flux", sampler=family.sampler, guided=(True, True, False, False), scales=(2.0, 1.5, None, None))
    stock = GuidanceSchedule(default_steps=4, **kw)
    same = GuidanceSchedule(default_steps=4, timesteps=(1000, 750, 500, 250), **kw)
    own = GuidanceSchedule(default_steps=4, timesteps=(950, 600, 300, 80), **kw)
    cond, uncond = text_conditioning(family, 2, 0), text_conditioning(family, 2, 1)
    noise = family.noise(2, torch.Generator().manual_seed(0))
    run = lambda s: sample(family, s, cond, uncond=uncond, noise=noise)  # noqa: E731
    assert torch.allclose(run(same), run(stock), atol=1e-6)
    assert not torch.allclose(run(own), run(stock), atol=1e-3)
    plan = build_plan(family, own, batch=1)
    sigmas = [t / 1000 for t in own.timesteps] + [0.0]
    for step, t, s, s_next in zip(plan.steps, own.timesteps, sigmas, sigmas[1:]):
        assert step.timestep == t and math.isclose(step.model_timestep, t / 1000, rel_tol=1e-6)
        assert math.isclose(step.coef_sample, 1.0, rel_tol=1e-6)
        assert math.isclose(step.coef_eps, s_next - s, rel_tol=1e-5)


@pytest.mark.parametrize("timesteps", [(1001, 500), (500, 0)])
def test_flow_matching_timesteps_outside_1_to_t_are_refused(timesteps):
    from tiny import tiny_flux

    family = tiny_flux()
    schedule = GuidanceSchedule(
        family="flux", sampler=family.sampler, guided=(False, False), scales=(None, None), default_steps=2, timesteps=timesteps
    )
    with pytest.raises(ScheduleError, match=r"timesteps \[.*\] must be strictly decreasing integers in \[1, 1000\]"):
        family.scheduler_for(schedule)


def test_own_timesteps_need_a_deterministic_sampler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from tiny import tiny_flux

    family = tiny_flux()
    family.scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    schedule = GuidanceSchedule(
        family="flux", sampler=family.sampler, guided=(False, False), scales=(None, None), default_steps=2, timesteps=(900, 400)
    )
    with pytest.raises(ScheduleError, match="need deterministic DDIM or flow-matching Euler; this model uses FlowMatchEuler"):
        family.scheduler_for(schedule)

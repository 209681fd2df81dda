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
    s = GuidanceSchedule(family="flux", sampler="flow_euler", guided=(True, False, True), scales=(3.25, None, 0.5), default_steps=28)
    s.save(tmp_path / "s.json")
    loaded = GuidanceSchedule.load(tmp_path / "s.json")
    assert loaded == s and loaded.sha256() == s.sha256()
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["format"] == "rstr.schedule/1" and data["num_steps"] == 3


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
        ({"steps": [{"guided": True, "scale": -1.0}] + [{"guided": False}] * 3}, "step 0: scale -1.0 must be a finite number >= 0"),
        ({"steps": [{"guided": True, "scale": float("nan")}] + [{"guided": False}] * 3}, "step 0: scale nan"),
        ({"steps": [{"guided": True, "scale": float("inf")}] + [{"guided": False}] * 3}, "step 0: scale inf"),
        ({"extra": 1}, "unknown field(s) extra"),
        ({"steps": [{"guided": True, "scale": 1.0, "w": 2}] + [{"guided": False}] * 3}, "step 0 must be"),
    ],
)
def test_malformed_schedule_refused(tmp_path, changes, message):
    with pytest.raises(ScheduleError) as err:
        GuidanceSchedule.load(_write(tmp_path, **changes))
    assert message in str(err.value) and "\n" not in str(err.value)


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
    out = subprocess.run([sys.executable, "-m", "rstr.cli", "sample", "--schedule", str(bad), "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().startswith("rstr: error:") and len(out.stderr.strip().splitlines()) == 1
    assert "format 'nope'" in out.stderr

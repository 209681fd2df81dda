"""The main job's decisions and report: gates against the stock model, a truthful report, quiet and scriptable output.

The reference model runs with small seed groups here (the sizes are module constants the tests
lower); the numbers the build prints at full size are in the closing notes and docs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import rstr.export.measure as measure
import rstr.export.stages as stages
from rstr.export.build import BuildOptions, build

from rstr.calibrate import calibrate
from rstr.calibrate.train import Preset
from rstr.errors import RstrError, ScheduleError
from rstr.families import REFERENCE_MODEL, load_model
from rstr.schedule import GuidanceSchedule
from rstr.seeds import HELD_OUT_SEEDS

SEARCHED_50 = Path(__file__).parent.parent / "docs" / "search" / "digits-dit" / "budget-50" / "schedule.json"
SMALL = 200  # images per group in these tests (at 60 the FD is mostly finite-sample bias and ranks nothing)


@pytest.fixture
def small_groups(monkeypatch):
    monkeypatch.setattr(measure, "REPORT_NUM", SMALL)
    monkeypatch.setattr(stages, "GATE_NUM", SMALL)


def test_report_baseline_is_the_stock_model_even_with_an_adapter(tmp_path, small_groups):
    """The report's constant-CFG row is `rstr evaluate` of the stock model on the same seeds, not the merged model's."""
    ref = load_model()
    schedule = GuidanceSchedule.load(SEARCHED_50)
    tiny = Preset(pool=16, probe=8, probe_iterations=2, validation=8, batch_size=8, iterations=6, lr=3e-3, checkpoint_every=6)
    calibrate(ref, schedule, tmp_path / "adapter", preset=tiny, budget=0.01, progress=False)
    # fp32: the bundle side is then the PyTorch model's arithmetic, which `rstr evaluate --adapter` reproduces
    opts = BuildOptions(schedule=SEARCHED_50, adapter=tmp_path / "adapter", out=tmp_path / "b", measure=True, precision="fp32")
    result = build(opts)
    q = result.summary["quality"]
    cmd = [
        sys.executable,
        "-m",
        "rstr.cli",
        "evaluate",
        "--scale",
        str(ref.default_scale),
        "--steps",
        str(schedule.default_steps),
        "--num",
        str(SMALL),
        "--groups",
        "2",
        "--seed-start",
        str(HELD_OUT_SEEDS.start),
        "--json",
    ]
    stock = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    assert q["baseline"]["fd"] == pytest.approx(stock["fd_groups"], rel=1e-9)
    with_adapter = json.loads(
        subprocess.run(
            [*cmd[:4], "--schedule", str(SEARCHED_50), "--adapter", str(tmp_path / "adapter"), *cmd[8:]],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert q["candidate"]["fd"] == pytest.approx(with_adapter["fd_groups"], rel=1e-9)
    assert q["differences"] == pytest.approx([a - b for a, b in zip(q["candidate"]["fd"], q["baseline"]["fd"])])
    report = (tmp_path / "b" / "report.md").read_text()
    assert "freshly loaded with no adapter" in report and q["verdict"] in report


@pytest.fixture(scope="module")
def gate_result():
    """The schedule gate on [a losing candidate, the searched 50% schedule], scored once for the tests below."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages, "GATE_NUM", SMALL)
        bad = GuidanceSchedule.conditional_only(4, family="dit", sampler="ddim", default_steps=25)
        return bad, stages.gate_schedule(load_model(), [bad, GuidanceSchedule.load(SEARCHED_50)])


def test_schedule_gate_falls_back_when_the_search_result_loses(gate_result):
    """A losing candidate (conditional-only, 4 steps) is refused; the next one (the searched 50% schedule) ships."""
    bad, (schedule, gate) = gate_result
    assert schedule == GuidanceSchedule.load(SEARCHED_50)
    assert [c.no_worse for c in gate.comparisons] == [False, True] and gate.chosen == 1
    assert gate.comparisons[0].verdict == "worse" and gate.shipped is gate.comparisons[1]
    assert gate.decision.startswith("fallback 1 ships")
    record = gate.to_json()
    assert record["comparisons"][0]["baseline"]["label"] == "stock constant CFG" and record["chosen"] == 1
    # the loser is worse on the first group, so the gate stops there; the one stock score is paired with both
    assert gate.comparisons[0].groups == 1 and len(gate.comparisons[0].candidate.fd) == 1
    assert gate.comparisons[1].groups == stages.GATE_GROUPS
    assert gate.comparisons[0].baseline.fd == gate.comparisons[1].baseline.fd[:1]


def test_gate_scores_group_by_group_as_one_evaluation_would(gate_result, monkeypatch):
    """Scoring the gate groups one at a time gives the numbers of one evaluation over all of them."""
    from rstr.compare import score
    from rstr.seeds import GATE_SEEDS

    monkeypatch.setattr(stages, "GATE_NUM", SMALL)
    _, (_, gate) = gate_result
    whole = score(load_model(), GuidanceSchedule.load(SEARCHED_50), "x", seed_start=GATE_SEEDS.start, num=SMALL, groups=2)
    assert gate.shipped.candidate.fd == pytest.approx(whole.fd, rel=1e-6)


def test_stage2_is_skipped_when_the_schedule_beats_its_teacher(gate_result, tmp_path):
    _, (schedule, gate) = gate_result
    assert gate.shipped.verdict == "better"
    adapter, decision = stages.run_stage2(load_model(), schedule, gate, "fast", 0, tmp_path)
    assert adapter is None and decision.decision.startswith("Stage-2 skipped") and not (tmp_path / "adapter").exists()


def test_a_given_teacher_runs_stage2_where_the_schedule_beats_constant_cfg(gate_result, monkeypatch, tmp_path):
    """--teacher lifts the skip rule (it compares with constant CFG only) and is what the student is calibrated toward."""
    monkeypatch.setattr(stages, "GATE_NUM", SMALL)  # the gate's scores, reused for the side without the adapter
    _, (schedule, gate) = gate_result
    family = load_model()
    teacher = GuidanceSchedule.constant(1.5, 25, family="dit", sampler="ddim", default_steps=25)
    tiny = Preset(pool=8, probe=4, probe_iterations=2, validation=4, batch_size=4, iterations=2, lr=1e-3, checkpoint_every=2)
    _, decision = stages.run_stage2(family, schedule, gate, tiny, 0, tmp_path, teacher)
    assert not decision.decision.startswith("Stage-2 skipped") and decision.comparisons
    record = json.loads((tmp_path / "adapter" / "calibration.json").read_text())
    assert GuidanceSchedule.from_dict(record["teacher"]) == teacher


def test_teacher_is_refused_where_stage2_does_not_run(tmp_path):
    for given in ({"schedule": SEARCHED_50}, {"adapter": tmp_path}):
        with pytest.raises(RstrError, match="--teacher is Stage-2's, which --schedule and --adapter skip"):
            build(BuildOptions(teacher=SEARCHED_50, out=tmp_path / "b", measure=False, **given))
    assert not (tmp_path / "b").exists()


def test_require_better_refuses_a_losing_bundle_and_writes_nothing(tmp_path, small_groups):
    bad = tmp_path / "bad.json"
    GuidanceSchedule.conditional_only(4, family="dit", sampler="ddim", default_steps=25).save(bad)
    with pytest.raises(RstrError, match="--require-better: the bundle does not beat the stock model"):
        build(BuildOptions(schedule=bad, out=tmp_path / "b", measure=False, require_better=True))
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


def test_schedule_for_another_sampler_is_refused(tmp_path):
    wrong = tmp_path / "flow.json"
    GuidanceSchedule.constant(1.5, 4, family="dit", sampler="flow_euler", default_steps=25).save(wrong)
    with pytest.raises(ScheduleError, match="sampler 'flow_euler' but the model uses 'ddim'"):
        build(BuildOptions(schedule=wrong, out=tmp_path / "b", measure=False))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rstr.export.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_quiet_and_json_output(tmp_path):
    """--quiet prints the final table and nothing on stderr; --json one JSON object; no third-party noise either way."""
    fp32 = ("--precision", "fp32")  # the loud build below runs the default precision gate too
    quiet = run_cli("build", "--schedule", str(SEARCHED_50), "--out", "q", "--no-measure", "--quiet", *fp32, cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "" and "compute saved vs constant CFG" in quiet.stdout
    js = run_cli("build", "--schedule", str(SEARCHED_50), "--out", "j", "--no-measure", "--json", *fp32, cwd=tmp_path)
    assert js.returncode == 0 and js.stderr == ""
    summary = json.loads(js.stdout)
    assert summary["compute_saved"] == pytest.approx(0.5) and summary["out"] == "j"
    loud = run_cli("build", "--schedule", str(SEARCHED_50), "--out", "l", "--no-measure", cwd=tmp_path)
    lines = [ln for ln in loud.stderr.splitlines() if ln.strip()]
    assert lines and all("Warning" not in ln and "[W]" not in ln and "colored" not in ln for ln in lines), loud.stderr


def test_verify_from_another_directory_with_a_relative_model(tmp_path):
    """The manifest stores the model path resolved, so verify works from anywhere."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    rel_model = os.path.relpath(REFERENCE_MODEL, work)
    built = run_cli(
        "build", "--model", rel_model, "--schedule", str(SEARCHED_50), "--out", "b", "--no-measure", "--quiet", cwd=work
    )
    assert built.returncode == 0, built.stderr
    verified = run_cli("verify", str(work / "b"), cwd=elsewhere)
    assert verified.returncode == 0, verified.stderr


def test_schedule_gate_ships_the_smallest_loss_when_nothing_passes(monkeypatch):
    monkeypatch.setattr(stages, "GATE_NUM", 30)  # conditional-only at 4 steps loses at any size
    bad = GuidanceSchedule.conditional_only(4, family="dit", sampler="ddim", default_steps=25)
    worse = GuidanceSchedule.conditional_only(2, family="dit", sampler="ddim", default_steps=25)
    schedule, gate = stages.gate_schedule(load_model(), [worse, bad])
    assert gate.decision.startswith("no candidate is no worse") and gate.shipped is not None
    assert schedule == [worse, bad][gate.chosen] and statistics.fmean(gate.shipped.differences) == min(
        statistics.fmean(c.differences) for c in gate.comparisons
    )


def test_adapter_gate_reuses_the_schedule_gates_scores(monkeypatch, tmp_path):
    """The side without the adapter is the schedule gate's score of the shipped schedule: its first group is not
    scored again, and the group the schedule gate skipped is scored now."""
    from rstr.seeds import GATE_SEEDS

    monkeypatch.setattr(stages, "GATE_NUM", 30)
    family = load_model()
    bad = GuidanceSchedule.conditional_only(4, family="dit", sampler="ddim", default_steps=25)
    schedule, gate = stages.gate_schedule(family, [bad])
    assert gate.shipped.groups == 1  # worse on the first group: the schedule gate stopped there
    starts: list[int] = []
    real = stages.score
    monkeypatch.setattr(stages, "score", lambda *a, **kw: starts.append(kw["seed_start"]) or real(*a, **kw))
    tiny = Preset(pool=8, probe=4, probe_iterations=2, validation=4, batch_size=4, iterations=2, lr=1e-3, checkpoint_every=2)
    _, adapter_gate = stages.run_stage2(family, schedule, gate, tiny, 0, tmp_path)
    c = adapter_gate.comparisons[0]
    assert c.baseline.label == "without the adapter" and c.baseline.fd[0] == gate.shipped.candidate.fd[0]
    assert starts.count(GATE_SEEDS.start) == 1  # only the side with the adapter, on the first group
    assert len(c.candidate.fd) == c.groups and starts.count(GATE_SEEDS.start + 30) == 2 * (c.groups - 1)

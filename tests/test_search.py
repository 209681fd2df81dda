"""Stage-1 search: genome invariants, baselines, resumable determinism, CLI errors, executor parity.

Most tests drive the evolution with a synthetic objective (a closed-form score of the
schedule) on a tiny in-memory DiT, so they check the search logic in milliseconds; the
executor and CLI tests sample a tiny random DiT saved to disk, scored by teacher fidelity.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_dit

from rstr.errors import RstrError
from rstr.executor import LocalExecutor
from rstr.schedule import GuidanceSchedule
from rstr.search.config import SearchConfig, preset_config
from rstr.search.genome import QUANTUM, Genome, SearchSpace, crossover, mutate, random_genome, remap, repair
from rstr.search.objectives import Objective, TeacherFidelity, objective_for
from rstr.search.runner import EvalTask, SearchInterrupted, SearchResult, run_search
from rstr.search.state import SearchState

SPACE = SearchSpace.for_budget(
    0.3, 25, range(6, 26), w_max=4.0, init_scales=(1.0, 2.0), sigma=1.0, own_timesteps=True
)  # 15 passes, 6..15 steps, warp genes on


@dataclass
class Synthetic(Objective):
    """Closed-form stand-in for a sample metric: likes scale ~2 early, little guidance late, more steps,
    and a first timestep near 900 (the stock grid's is 875 at 8 steps, 857 at 7)."""

    name = "synthetic"
    metric = "loss"

    def measure(self, family, schedule, *, seed_start, num, groups):
        n = schedule.num_steps
        first = schedule.timesteps[0] if schedule.timesteps is not None else family.scheduler_for(schedule).timesteps[0]
        loss = 4.0 / n + abs(int(first) - 900) / 1000
        for i, (g, w) in enumerate(zip(schedule.guided, schedule.scales)):
            early = (i + 0.5) / n < 0.5
            loss += ((w - 2.0) ** 2 / n if early else 0.3 * abs(w - 1.0) / n) if g else (0.5 / n if early else 0.0)
        return {"loss": [loss + 0.001 * ((seed_start + g) % 5) for g in range(groups)]}


def small_config(**kw) -> SearchConfig:
    base = preset_config("fast", budget=0.5, steps=8, seed=0)
    small = dict(
        step_counts=(3, 4, 5, 6, 7),
        population=6,
        generations=3,
        search_num=4,
        held_out_num=4,
        held_out_groups=3,
        baseline_scales=(0.75, 1.25),
        constant_counts=0,
    )
    return replace(base, **{**small, **kw})


def save_tiny(path: Path) -> Path:
    """A tiny random class-conditional DiT on disk (8 default steps), loadable by workers and the CLI."""
    family = tiny_dit(learned_sigma=False, num_classes=10)
    family.transformer.save_pretrained(path / "transformer")
    family.scheduler.save_pretrained(path / "scheduler")
    (path / "rstr.json").write_text(json.dumps({"default_steps": 8, "default_scale": 2.0}))
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared two-core machine, more threads only wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- genome
def test_operators_keep_invariants():
    rng = np.random.default_rng(0)
    pop = [random_genome(SPACE, rng) for _ in range(20)] + [Genome.span(4, 0, 4, 2.0)]  # 4 steps: a baseline off the grid
    for _ in range(300):
        a, b = pop[rng.integers(len(pop))], pop[rng.integers(len(pop))]
        child = mutate(crossover(a, b, rng), SPACE, rng, p_steps=0.5, p_scale=0.5, p_warp=0.5)
        assert child.passes <= SPACE.max_passes
        assert all(0.0 <= w <= SPACE.w_max and abs(w / QUANTUM - round(w / QUANTUM)) < 1e-9 for w in child.scales)
        assert child.num_steps in SPACE.step_counts or child.num_steps == 4
        assert Genome.from_key(child.key).key == child.key
        if child.warp is not None:
            start, rho = child.warp
            assert SPACE.start_range[0] <= start <= SPACE.start_range[1] and SPACE.rho_range[0] <= rho <= SPACE.rho_range[1]
            child.schedule("dit", "ddim", 25)  # GuidanceSchedule validates the timesteps
        pop.append(child)
    assert len({g.num_steps for g in pop[21:]}) > 3  # step-count mutation explores
    warps = {g.warp for g in pop[21:]}
    assert None in warps and len(warps) > 10  # warp genes are switched on and explored


def test_warp_genes_place_the_steps():
    g = Genome.span(8, 0, 2, 2.0).with_warp((0.9, 1.5))
    ts = g.timesteps(1000)
    assert ts[0] == 900 and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))
    assert ts[1] == round(900 * (6 / 7) ** 1.5)
    assert remap(g, 5).warp == g.warp and repair(g, SPACE).warp == g.warp
    assert g.key.endswith("@0.90^1.50") and Genome.from_key(g.key).warp == g.warp
    dense = Genome.span(60, 0, 0, 1.0).with_warp((0.8, 2.0)).timesteps(1000)  # rounds 0.2, 0.9, 2.1 -> 0, 1, 2
    assert dense[-4:] == (3, 2, 1, 0) and all(a > b for a, b in zip(dense, dense[1:]))  # ties at low noise separated
    assert Genome.span(8, 0, 2, 2.0).timesteps(1000) is None  # baselines keep the stock spacing


def test_flow_matching_grids_end_above_zero_and_mutate_from_the_stock_spacing():
    """Flow-matching Euler steps to sigma 0 after its last step: a warped grid has n points above 0 and may start at
    sigma 1; the space fits its stock spacing (sigma 1, shifted towards high noise: rho < 1) for mutation to start from."""
    from tiny import tiny_flux

    from rstr.search.config import space

    g = Genome.span(4, 0, 1, 2.0).with_warp((1.0, 1.0))
    assert g.timesteps(1000, last_at_zero=False) == (1000, 750, 500, 250)
    assert g.schedule("flux", "flow_euler", 8, 1000, last_at_zero=False).timesteps == (1000, 750, 500, 250)
    dense = Genome.span(60, 0, 0, 1.0).with_warp((0.8, 2.0)).timesteps(1000, last_at_zero=False)
    assert dense[-1] == 1 and all(a > b for a, b in zip(dense, dense[1:]))
    family = tiny_flux()
    stock = GuidanceSchedule.conditional_only(8, family=family.name, sampler=family.sampler)
    flow = space(small_config(), 1.0, family.scheduler_for(stock))
    assert flow.own_timesteps and not flow.last_at_zero and flow.start_range[1] == 1.0
    assert flow.stock_warp is not None and flow.stock_warp[0] == 1.0 and 0.3 < flow.stock_warp[1] < 1.0
    rng = np.random.default_rng(0)
    warped = [mutate(Genome.span(6, 0, 1, 2.0), flow, rng, p_steps=0.0, p_scale=0.0, p_warp=1.0) for _ in range(50)]
    starts = [m.warp[0] for m in warped if m.warp is not None]
    assert len(starts) == 50 and statistics.median(starts) > 0.97  # around the stock start, sigma 1
    for m in warped:
        m.schedule("flux", "flow_euler", 8, flow.num_train, flow.last_at_zero)  # GuidanceSchedule validates the timesteps
    ddim = space(
        small_config(), 1.0, tiny_dit().scheduler_for(GuidanceSchedule.conditional_only(8, family="dit", sampler="ddim"))
    )
    assert ddim.own_timesteps and ddim.last_at_zero and ddim.stock_warp is None


def test_repair_unguides_steps_nearest_scale_one():
    g = Genome((True,) * 10, (3.0, 1.1, 2.0, 0.9, 1.0, 2.5, 1.5, 3.5, 1.2, 4.0))
    fixed = repair(g, SPACE)  # 10 steps + 10 guided = 20 passes; budget 15 -> drop 5 guided steps
    assert fixed.passes == 15
    assert [i for i, x in enumerate(fixed.guided) if not x] == [1, 3, 4, 6, 8]
    assert fixed.scales == g.scales  # latent genes are kept


def test_constant_baselines_at_the_largest_counts_only():
    from rstr.search.baselines import baseline_grid
    from rstr.search.config import space

    config = preset_config("fast", budget=0.5, steps=25, seed=0)
    counts = sorted(
        {b.genome.num_steps for b in baseline_grid(space(config, 1.0), config, 1.0) if b.kind == "constant" and b.in_budget}
    )
    assert config.constant_counts == 2 and counts == [11, 12]  # 2n <= 25 passes
    every = replace(config, constant_counts=0)
    assert sorted(
        {b.genome.num_steps for b in baseline_grid(space(every, 1.0), every, 1.0) if b.kind == "constant" and b.in_budget}
    ) == list(range(2, 13))


def test_remap_keeps_relative_position():
    g = Genome.span(10, 0, 5, 2.0)  # first half guided
    assert remap(g, 6).guided == (True, True, True, False, False, False)
    assert Genome.from_key(g.key).key == g.key


def test_budget_and_steps_are_checked():
    with pytest.raises(RstrError, match="budget 0.02 allows 1"):
        SearchSpace.for_budget(0.02, 25, range(2, 26))
    with pytest.raises(RstrError, match=r"must be in \(0, 1\]"):
        preset_config("fast", budget=1.5, steps=25, seed=0)
    with pytest.raises(RstrError, match="fewer than the 2 steps"):
        preset_config("fast", budget=0.5, steps=1, seed=0)


# ------------------------------------------------------------------------ the search
def run(tmp: Path, config: SearchConfig, **kw) -> SearchResult:
    return run_search(tiny_dit(learned_sigma=False, num_classes=10), config, tmp, objective=Synthetic(), progress=False, **kw)


def test_baselines_seed_the_population_and_result_beats_them(tmp_path):
    seen: list[list[Genome]] = []
    result = run(
        tmp_path / "ck", small_config(), on_checkpoint=lambda st: seen.append(list(st.population)) if st.generation == 0 else None
    )
    first = seen[0]
    kinds = {b["kind"] for b in result.report["baselines"] if b["in_budget"] and b["schedule"] in {g.key for g in first}}
    assert kinds == {"constant", "first-k", "interval", "conditional-only"}
    assert len(first) == 6 and len({g.key for g in first}) == 6
    r = result.report
    assert result.schedule.compute_fraction <= 0.5
    assert r["result"]["search"]["mean"]["loss"] <= min(b["search"]["mean"]["loss"] for b in r["baselines"] if b["in_budget"])
    assert len(r["result"]["held_out"]["groups"]["loss"]) == 3
    assert r["result"]["schedule"] == r["finalists"][0]["schedule"]
    evolved = [e for e in r["finalists"] if e["label"] == "evolved"]
    from_baselines = {e["label"] for e in r["finalists"] if e["label"].startswith("baseline: ")}
    assert len(evolved) <= 2 and len(r["finalists"]) == len(evolved) + len(from_baselines)
    assert len(from_baselines) >= 3  # the best of each in-budget kind competes (one may also be an evolved finalist)
    front = [(e["compute_fraction"], e["search"]["mean"]["loss"]) for e in r["pareto_front"]]
    assert front == sorted(front) and all(a[1] > b[1] for a, b in zip(front, front[1:]))
    steps_const = sorted(b["passes_per_image"] // 2 for b in r["baselines"] if b["kind"] == "constant" and b["in_budget"])
    assert steps_const == [2, 3, 4]  # constant CFG at every step count that fits 8 passes
    assert all(b["timesteps"] is None for b in r["baselines"])  # baselines run on the stock spacing


def test_own_timesteps_are_searched_and_ablated(tmp_path):
    result = run(tmp_path / "own", small_config(generations=6))
    assert result.schedule.timesteps is not None  # the synthetic objective rewards moving the first timestep
    labels = [e["label"] for e in result.report["ablations"]]
    assert labels[0] == "search result on the stock timesteps"
    assert all(label.endswith("on the result's timesteps") for label in labels[1:])
    r = result.report
    kinds = {b["kind"] for b in r["baselines"] if b["in_budget"]}
    assert len(labels) == 1 + len(kinds)  # the best baseline of every kind, moved onto the result's grid
    assert [e["baseline"] for e in r["ablations"]] == [False] + [True] * len(kinds)
    moved = [e for e in r["ablations"] if e["baseline"]]
    warp = r["result"]["schedule"].partition("@")[2]
    assert warp and all(e["schedule"].partition("@")[2] == warp for e in moved)
    assert r["beats_every_baseline_on_its_timesteps"] == all(e["result_better_on_all_groups"] for e in moved)
    assert all(len(e["held_out"]["groups"]["loss"]) == 3 for e in r["ablations"])
    # the best baseline of each kind also competed on the best evolved schedule's timesteps, and lost
    # (or is the result, and says so) on the search pool
    regridded = [e for e in r["finalists"] if e["label"].endswith("on the searched timesteps")]
    assert len(regridded) == len(kinds) and all(e["schedule"].partition("@")[2] for e in regridded)
    pooled = {e["schedule"]: e["search"]["mean"]["loss"] + e["validation"]["mean"]["loss"] for e in r["finalists"]}
    assert pooled[r["result"]["schedule"]] == min(pooled.values())
    assert ("simple" in r["result"]) == r["finalists"][0]["label"].startswith("baseline: ")
    stock = run(tmp_path / "stock", small_config(generations=6, own_timesteps=False))
    assert stock.schedule.timesteps is None and stock.report["ablations"] == []


def test_interrupted_search_resumes_to_identical_result(tmp_path):
    config = small_config()
    straight = run(tmp_path / "a", config)

    def stop_after_generation_1(state: SearchState) -> None:
        if state.generation == 1:
            raise KeyboardInterrupt

    with pytest.raises(SearchInterrupted) as info:
        run(tmp_path / "b", config, on_checkpoint=stop_after_generation_1)
    assert info.value.generation == 1
    resumed = run(tmp_path / "b", config, resume=True)
    assert resumed.schedule == straight.schedule
    for k in ("history", "pareto_front", "baselines", "result"):
        assert resumed.report[k] == straight.report[k]
    with pytest.raises(RstrError, match="seed=0, this run has seed=1"):
        run(tmp_path / "b", replace(config, seed=1), resume=True)


# --------------------------------------------------------------------------- the CLI
def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run `rstr search ARGS` in-process through the real entry point; return (exit code, stderr)."""
    from rstr.cli import main

    monkeypatch.setattr("sys.argv", ["rstr", "search", *args])
    with pytest.raises(SystemExit) as info:
        main()
    return int(info.value.code), capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "0"], "--budget 0.0 must be in (0, 1]"),
        (["--budget", "1.5"], "--budget 1.5 must be in (0, 1]"),
        (["--steps", "1"], "--steps 1 is fewer than the 2 steps the sampler supports"),
        (["--workers", "999"], "workers 999 is more than the"),
        (["--preset", "huge"], "--preset 'huge' is unknown"),
        (["--images", "1"], "--images 1 is too few to score a schedule"),
        (["--device", "tpu"], "--device tpu: torch sees no such device here; use --device cpu or cuda"),
        (["--device", "cuda:0", "--executor", "ray"], "--device cuda:0 applies to local workers"),
    ],
)
def test_cli_bad_input_is_one_line_exit_1(monkeypatch, capsys, tmp_path, tiny_dir, args, message):
    code, err = cli(monkeypatch, capsys, "--model", str(tiny_dir), "--out", str(tmp_path / "s.json"), *args)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("rstr: error: ") and message in err


def test_cli_resume_refuses_other_model_or_seed(monkeypatch, capsys, tmp_path, tiny_dir):
    other = save_tiny(tmp_path / "other")
    code, err = cli(monkeypatch, capsys, "--model", str(tiny_dir), "--resume", str(tmp_path / "missing"))
    assert code == 1 and "no checkpoint.json there" in err

    def stop(state):
        raise KeyboardInterrupt

    from rstr.families import load_model

    config = preset_config("fast", budget=0.5, steps=8, seed=0)
    family = load_model(tiny_dir)
    with pytest.raises(SearchInterrupted):
        run_search(family, config, tmp_path / "ck", objective=objective_for(family, config), progress=False, on_checkpoint=stop)
    code, err = cli(monkeypatch, capsys, "--model", str(other), "--resume", str(tmp_path / "ck"))
    assert code == 1 and err.count("\n") == 1 and "was made for model" in err
    code, err = cli(monkeypatch, capsys, "--seed", "3", "--resume", str(tmp_path / "ck"))
    assert code == 1 and err.count("\n") == 1 and "seed=0, this run has seed=3" in err


def test_cli_fast_search_writes_schedule_report_and_plots(monkeypatch, capsys, tmp_path, tiny_dir):
    out = tmp_path / "res" / "schedule.json"
    code, _ = cli(monkeypatch, capsys, "--model", str(tiny_dir), "--preset", "fast", "--steps", "6", "--out", str(out))
    assert code == 0
    schedule = GuidanceSchedule.load(out)
    assert schedule.compute_fraction <= 0.5 and schedule.default_steps == 6
    report = json.loads((out.parent / "search-report.json").read_text())
    assert report["objective"]["name"] == "teacher-fidelity"
    assert report["result"]["held_out"]["groups"]["teacher_mse"] and report["pareto_front"]
    assert "## Held-out comparison" in (out.parent / "search-report.md").read_text()
    for png in ("search-schedule.png", "search-pareto.png"):
        assert (out.parent / png).read_bytes()[:4] == b"\x89PNG"
    assert (out.parent / "schedule.search" / "checkpoint.json").is_file()


# ------------------------------------------------------------------------- executors
def _items(family_name: str) -> list:
    schedules = [
        GuidanceSchedule.first_k(w, n, k, family=family_name, sampler="ddim", default_steps=8)
        for w, n, k in ((2.0, 4, 2), (1.5, 6, 1), (3.0, 3, 3))
    ]
    return [(sch, 0, 6, 2) for sch in schedules]


def test_local_executor_workers_match_inline(tiny_dir):
    task = EvalTask(str(tiny_dir), TeacherFidelity(scale=2.0, steps=8, batch_size=4))
    with LocalExecutor(task, workers=1) as ex:
        inline = list(ex.map(_items("dit")))
    task = EvalTask(str(tiny_dir), TeacherFidelity(scale=2.0, steps=8, batch_size=4))
    with LocalExecutor(task, workers=2) as ex:
        pooled = list(ex.map(_items("dit")))
    assert pooled == inline
    assert all(statistics.fmean(m["teacher_mse"]) > 0 for m in inline)


@pytest.mark.ray
def test_ray_executor_matches_inline(tiny_dir):
    import ray

    from rstr.executor import RayExecutor

    task = EvalTask(str(tiny_dir), TeacherFidelity(scale=2.0, steps=8, batch_size=4))
    with LocalExecutor(task, workers=1) as ex:
        inline = list(ex.map(_items("dit")))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with RayExecutor(EvalTask(str(tiny_dir), TeacherFidelity(scale=2.0, steps=8, batch_size=4)), workers=2) as ex:
            assert list(ex.map(_items("dit"))) == inline
    finally:
        ray.shutdown()

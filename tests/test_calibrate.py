"""Stage-2 calibration on a tiny random DiT: allocation, peft round trip, merge, resume, bad input."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import tiny_dit

from rstr.calibrate import runner, sensitivity
from rstr.calibrate.adapter import ADAPTER_FILES, load_adapter, merge_adapter
from rstr.calibrate.allocation import TargetModule, allocate, gain
from rstr.calibrate.checkpoint import CHECKPOINT_FORMAT, checkpoint_path
from rstr.calibrate.modules import target_modules
from rstr.calibrate.runner import calibrate
from rstr.calibrate.sensitivity import FISHER_IMAGES, gradient_spectra, measure_sensitivity, probe_drops
from rstr.calibrate.train import Preset, endpoint_loss, seed_conditioning, teacher_data, teacher_schedule
from rstr.errors import RstrError
from rstr.schedule import GuidanceSchedule

TINY = Preset(pool=32, probe=16, probe_iterations=4, validation=16, batch_size=8, iterations=12, lr=3e-3, checkpoint_every=4)


def family(**kwargs):
    f = tiny_dit(learned_sigma=False, num_classes=10, **kwargs)
    f.meta["default_scale"] = 3.0
    return f


def sparse(f) -> GuidanceSchedule:
    return GuidanceSchedule.first_k(3.0, 2, 1, family="dit", sampler=f.sampler, default_steps=f.default_steps)


def save_model(f, path):
    f.transformer.save_pretrained(path / "transformer")
    f.scheduler.save_pretrained(path / "scheduler")
    (path / "rstr.json").write_text(json.dumps({"default_steps": f.default_steps, "default_scale": 3.0}))
    return path


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "adapter"
    result = calibrate(family(), sparse(family()), out, preset=TINY, budget=0.05, progress=False)
    return out, result


def run_cli(argv, capsys, monkeypatch) -> tuple[int, str]:
    from rstr.cli import main

    monkeypatch.setattr(sys, "argv", ["rstr", *map(str, argv)])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


# --------------------------------------------------------------------------- allocation
def synthetic_modules() -> list[TargetModule]:
    return [TargetModule(f"b{b}.{k}", f"b{b}", k, 32, 32) for b in range(3) for k in ("attn.q", "ff")]


def test_module_kinds():
    kinds = {m.name.split(".", 2)[2]: m.kind for m in target_modules(family()) if m.block == "transformer_blocks.0"}
    assert kinds == {
        "norm1.emb.timestep_embedder.linear_1": "emb",
        "norm1.emb.timestep_embedder.linear_2": "emb",
        "norm1.linear": "adanorm",
        "attn1.to_q": "attn.q",
        "attn1.to_k": "attn.k",
        "attn1.to_v": "attn.v",
        "attn1.to_out.0": "attn.out",
        "ff.net.0.proj": "ff",
        "ff.net.2": "ff",
    }


def test_allocation_respects_budget_and_rank_set():
    modules = synthetic_modules()
    spectra = {m.name: [100.0 if m.block == "b1" else 1.0] * 32 for m in modules}
    budget = 24 * 64
    adaptive = allocate(modules, budget, "adaptive", spectra)
    uniform = allocate(modules, budget, "uniform")
    for ranks in (adaptive, uniform):
        assert sum(m.cost(ranks[m.name]) for m in modules) <= budget
        assert all(ranks[m.name] in m.ranks() for m in modules)
    assert adaptive != uniform
    assert sum(adaptive[n] for n in adaptive if n.startswith("b1.")) > sum(adaptive[n] for n in adaptive if n.startswith("b0."))
    assert sorted(set(uniform.values())) == [4]  # 24 ranks over 6 layers: rank 4 everywhere


def test_rank_capped_at_layer_dimensions():
    m = TargetModule("x", "b", "ff", 6, 40)
    assert allocate([m], 10**6, "adaptive", {"x": [1.0] * 6})["x"] == 4  # 8 > min(6, 40)


def test_budget_too_small():
    with pytest.raises(RstrError, match="cannot hold even a rank-1"):
        allocate(synthetic_modules(), 10, "uniform")


# --------------------------------------------------------------------------- sensitivity
def probe_setup():
    f = family()
    teacher = teacher_schedule(f)
    noise, cond = seed_conditioning(f, range(TINY.probe))
    return f, teacher_data(f, teacher, noise, cond), target_modules(f)


def test_fisher_spectrum_is_that_of_the_stacked_group_gradients():
    f, data, modules = probe_setup()
    grad_flags = [q.requires_grad for q in f.transformer.parameters()]
    spectra = gradient_spectra(f, sparse(f), data, modules)
    assert [q.requires_grad for q in f.transformer.parameters()] == grad_flags
    wide = next(m for m in modules if m.out_features < m.in_features)  # sum G G^T: the output side is the smaller
    tall = next(m for m in modules if m.out_features > m.in_features)  # sum G^T G: the input side is the smaller
    weights = [f.transformer.get_submodule(m.name).weight for m in (wide, tall)]
    for w in weights:
        w.requires_grad_(True)
    groups = [
        torch.autograd.grad(endpoint_loss(f, sparse(f), data.take(slice(lo, lo + FISHER_IMAGES))), weights)
        for lo in range(0, len(data), FISHER_IMAGES)
    ]
    assert len(groups) == TINY.probe // FISHER_IMAGES
    for i, m in enumerate((wide, tall)):
        side_by_side = torch.cat([g[i].double() for g in groups], dim=1 if m is wide else 0)  # [G_1 G_2 ..] or [G_1; G_2; ..]
        expected = torch.linalg.svdvals(side_by_side) ** 2
        got = torch.tensor(spectra[m.name], dtype=torch.float64)
        assert len(got) == m.max_rank
        assert torch.allclose(got[:4], expected[:4], rtol=1e-6)
        assert float(got.sum()) == pytest.approx(sum(float((g[i].double() ** 2).sum()) for g in groups), rel=1e-9)
        assert all(x >= y for x, y in zip(got, got[1:]))


def test_probe_drops_measure_what_the_trained_probe_adapter_is_worth():
    f, data, modules = probe_setup()
    before = {k: v.clone() for k, v in f.transformer.state_dict().items()}
    untrained = probe_drops(f, sparse(f), data, modules, Preset(**{**TINY.__dict__, "probe_iterations": 0}), seed=0)
    assert set(untrained) == {m.name for m in modules}
    assert all(d == 0.0 for d in untrained.values())  # LoRA starts at B = 0: switching it off changes nothing
    trained = probe_drops(f, sparse(f), data, modules, Preset(**{**TINY.__dict__, "probe_iterations": 8}), seed=0)
    assert all(d >= 0.0 for d in trained.values()) and sum(trained.values()) > 0
    assert len(set(trained.values())) > len(modules) // 2  # a ranking, not a constant
    assert {k for k in f.transformer.state_dict()} == set(before)  # no LoRA left in the family ...
    assert all(torch.equal(v, before[k]) for k, v in f.transformer.state_dict().items())  # ... and its weights untouched


def test_sensitivity_is_the_probe_drop_spread_like_the_fisher_eigenvalues(monkeypatch):
    modules = synthetic_modules()[:2]
    a, b = (m.name for m in modules)
    monkeypatch.setattr(sensitivity, "probe_drops", lambda *args: {a: 2.0, b: 0.0})
    monkeypatch.setattr(sensitivity, "gradient_spectra", lambda *args: {a: [4.0, 1.0, 0.0], b: [3.0, 3.0, 0.0]})
    spectra = measure_sensitivity(None, None, None, modules, TINY, 0)
    assert spectra == {a: [2.0, 0.5, 0.0], b: [0.0, 0.0, 0.0]}
    assert gain(spectra[a], 2) == 2.5


# ---------------------------------------------------------------------------- training
def test_calibration_lowers_the_loss(calibrated):
    out, result = calibrated
    assert result.validation_after < result.validation_before
    assert result.params <= int(0.05 * sum(p.numel() for p in family().transformer.parameters()))
    record = json.loads((out / "allocation.json").read_text())
    assert record["budget"]["used"] == result.params
    assert {p.name for p in out.iterdir()} >= {
        *ADAPTER_FILES,
        "allocation.json",
        "calibration.json",
        "report.md",
        "calibration.png",
    }


def test_adapter_loads_and_merges(calibrated):
    from peft import PeftModel

    out, _ = calibrated
    f = family()
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.full((3,), 500.0)
    cond = {"class_labels": torch.tensor([1, 2, 10])}
    base = f.denoise(x, t, cond)
    peft_model = load_adapter(f, out)
    assert isinstance(peft_model, PeftModel)
    with_adapter = f.denoise(x, t, cond)
    f.transformer = merge_adapter(peft_model)
    merged = f.denoise(x, t, cond)
    assert (with_adapter - base).abs().max() > 1e-4  # the adapter does something
    assert float((merged - with_adapter).abs().max() / with_adapter.abs().max()) < 1e-5

    direct = PeftModel.from_pretrained(family().transformer, str(out))
    assert torch.allclose(direct(x, timestep=t, class_labels=cond["class_labels"]).sample, with_adapter, atol=1e-6)


def test_resume_matches_uninterrupted(calibrated, tmp_path, monkeypatch):
    out, result = calibrated
    save = runner.save_checkpoint

    def save_then_crash(path, state):
        save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "save_checkpoint", save_then_crash)
    target = tmp_path / "adapter"
    with pytest.raises(KeyboardInterrupt):
        calibrate(family(), sparse(family()), target, preset=TINY, budget=0.05, progress=False)
    assert not target.exists() and checkpoint_path(target).is_file()
    monkeypatch.setattr(runner, "save_checkpoint", save)
    resumed = calibrate(family(), sparse(family()), target, preset=TINY, budget=0.05, progress=False, resume=True)
    assert resumed.losses == result.losses
    a, b = load_file(out / "adapter_model.safetensors"), load_file(target / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not checkpoint_path(target).exists()


class _Payload:
    """Unpickling this creates ``marker``: what a planted checkpoint could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("case", ["old-pickle", "pickle", "garbage", "shape", "deep"])
def test_resume_never_unpickles_a_planted_checkpoint(case, tmp_path, capsys, monkeypatch):
    """A pickle where the old ``.pt`` checkpoint lived is refused unread; a pickle, garbage, a header document
    of the wrong shape or nested 10^5 deep where the checkpoint lives is one error line.  Nothing runs."""
    model = save_model(family(), tmp_path / "model")
    out, marker = tmp_path / "ad", tmp_path / "payload-ran"
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload works when unpickled ...
    assert marker.is_file()
    marker.unlink()
    ckpt = checkpoint_path(out)
    if case == "old-pickle":
        torch.save({"settings": {}, "payload": _Payload(marker)}, tmp_path / ".ad.checkpoint.pt")
        expect = "pickle format of an older rstr"
    elif case == "pickle":
        ckpt.write_bytes(pickle.dumps({"settings": {}, "payload": _Payload(marker)}))
        expect = "not a readable rstr calibration checkpoint"
    elif case == "garbage":
        ckpt.write_bytes(bytes(range(256)) * 8)
        expect = "not a readable rstr calibration checkpoint"
    elif case == "shape":
        save_file(
            {"pool.noise": torch.zeros(1)},
            str(ckpt),
            metadata={"rstr": json.dumps({"format": CHECKPOINT_FORMAT, "settings": []})},
        )
        expect = "'settings' must be an object"
    else:
        save_file({"pool.noise": torch.zeros(1)}, str(ckpt), metadata={"rstr": "[" * 100_000 + "]" * 100_000})
        expect = "not a readable rstr calibration checkpoint"
    code, err = run_cli(
        ["calibrate", "--model", model, "--preset", "fast", "--steps", "2", "--out", out, "--resume"], capsys, monkeypatch
    )
    assert code == 1 and expect in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists() and not out.exists()  # ... but nothing was unpickled, and nothing written


# ----------------------------------------------------------------------------- the CLI
def test_cli_calibrate_then_sample(tmp_path, capsys, monkeypatch):
    model = save_model(family(), tmp_path / "model")
    code, err = run_cli(
        ["calibrate", "--model", model, "--preset", "fast", "--steps", "2", "--out", tmp_path / "ad"], capsys, monkeypatch
    )
    assert code == 0, err
    code, err = run_cli(
        ["sample", "--model", model, "--adapter", tmp_path / "ad", "--steps", "2", "--out", tmp_path / "x.npy"],
        capsys,
        monkeypatch,
    )
    assert code == 0, err


def test_cli_adapter_for_another_model(calibrated, tmp_path, capsys, monkeypatch):
    from diffusers import DiTTransformer2DModel

    other = family()
    other.transformer = DiTTransformer2DModel(  # same layer names, hidden 8 instead of 16
        num_attention_heads=2,
        attention_head_dim=4,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_type="ada_norm_zero",
    )
    model = save_model(other, tmp_path / "other")
    code, err = run_cli(
        ["sample", "--model", model, "--adapter", calibrated[0], "--out", tmp_path / "x.npy"], capsys, monkeypatch
    )
    assert code == 1 and "does not fit this model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("case", ["budget", "family", "rank"])
def test_cli_bad_input(case, tmp_path, capsys, monkeypatch):
    model = save_model(family(), tmp_path / "model")
    args = ["calibrate", "--model", model, "--out", tmp_path / "ad"]
    if case == "budget":
        args += ["--budget", "0.0001"]
        expect = "cannot hold even"
    elif case == "family":
        s = GuidanceSchedule.first_k(3.0, 2, 1, family="pixart", sampler="ddim", default_steps=4)
        s.save(tmp_path / "s.json")
        args += ["--schedule", tmp_path / "s.json"]
        expect = "schedule is for family 'pixart'"
    else:
        (tmp_path / "alloc.json").write_text(json.dumps({"modules": [{"name": "transformer_blocks.0.attn1.to_q", "rank": 32}]}))
        args += ["--allocation", tmp_path / "alloc.json", "--budget", "0.5"]
        expect = "exceeds the layer's dimensions"
    code, err = run_cli(args, capsys, monkeypatch)
    assert code == 1 and expect in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "model") == (
        ["s.json"] if case == "family" else ["alloc.json"] if case == "rank" else []
    )


@pytest.mark.parametrize("method", ["uniform", "adaptive"])
def test_layers_that_do_not_reach_the_output_get_no_adapter(method, tmp_path):
    """Qwen-Image's last block still computes its text stream's output projections, which nothing reads: they get
    no gradient, so the sensitivity measurement failed; now they get an empty spectrum and rank 0 under both methods."""
    from rstr.families import load_model

    f = load_model("digits-qwenimage")
    schedule = GuidanceSchedule.first_k(f.default_scale, 3, 1, family=f.name, sampler=f.sampler, default_steps=3)
    teacher = GuidanceSchedule.first_k(f.default_scale, 3, 3, family=f.name, sampler=f.sampler, default_steps=3)
    result = calibrate(f, schedule, tmp_path / "a", preset=TINY, budget=0.05, allocation=method, teacher=teacher, progress=False)
    rows = {r["name"]: r for r in json.loads((tmp_path / "a" / "allocation.json").read_text())["modules"]}
    last = max(int(name.split(".")[1]) for name in rows)
    dead = {f"transformer_blocks.{last}.attn.to_add_out", f"transformer_blocks.{last}.txt_mlp.net.2"}
    assert all(rows[name]["rank"] == 0 and rows[name]["sensitivity"] == 0 for name in dead)
    assert all(result.ranks[name] == 0 for name in dead) and result.params > 0
    assert result.validation_after < result.validation_before

"""--device, --dtype and --json on the commands that run a model or produce a result.

Bad devices and dtypes are refused in one line before any work; fp16/bf16 load the transformer
in that dtype and sample close to fp32; a dtype a model cannot run is refused in one line; with
--json, stdout holds exactly one JSON object.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from rstr.engines.bundle import Bundle
from test_search import save_tiny

MODEL_COMMANDS = ["sample", "evaluate", "calibrate", "search"]
OUT = {"sample": "x.npy", "calibrate": "adapter", "search": "s.json"}  # evaluate writes nothing


def outputs(command: str, tmp_path) -> list:
    return ["--out", tmp_path / OUT[command]] if command in OUT else []


def cli(monkeypatch, capsys, *args, export: bool = False) -> tuple[int, str, str]:
    """Run `rstr ARGS` (or `rstr-export ARGS`) in-process; return (exit code, stdout, stderr)."""
    from rstr.export.cli import main as export_main

    from rstr.cli import main as rstr_main

    monkeypatch.setattr(sys, "argv", ["prog", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        (export_main if export else rstr_main)()
    captured = capsys.readouterr()
    return int(info.value.code), captured.out, captured.err


def one_line_error(code: int, err: str, prog: str = "rstr") -> str:
    assert code == 1 and err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    return err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


# ------------------------------------------------------------------------- --device
BAD_DEVICES = {
    "tpu": "--device tpu: torch sees no such device here; use --device cpu or cuda",
    "cuda:x": "--device cuda:x: torch sees no such device here; use --device cpu or cuda",
}
if not torch.cuda.is_available():
    BAD_DEVICES["cuda"] = "--device cuda: torch sees no such device here; use --device cpu"
    BAD_DEVICES["cuda:1"] = "--device cuda:1: torch sees no such device here; use --device cpu"
else:
    BAD_DEVICES["cuda:99"] = "--device cuda:99: this machine has"


@pytest.mark.parametrize("command", MODEL_COMMANDS)
@pytest.mark.parametrize("device", sorted(BAD_DEVICES))
def test_bad_device_is_one_line(monkeypatch, capsys, tmp_path, tiny_dir, command, device):
    code, out, err = cli(monkeypatch, capsys, command, "--model", tiny_dir, "--device", device, *outputs(command, tmp_path))
    assert BAD_DEVICES[device] in one_line_error(code, err) and out == ""
    assert list(tmp_path.iterdir()) == []


def test_build_refuses_a_bad_device_before_any_work(monkeypatch, capsys, tmp_path):
    code, _, err = cli(monkeypatch, capsys, "build", "--device", "tpu", "--out", tmp_path / "b", export=True)
    assert BAD_DEVICES["tpu"] in one_line_error(code, err, "rstr-export")
    assert not (tmp_path / "b").exists()


# -------------------------------------------------------------------------- --dtype
@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_unknown_dtype_is_one_line(monkeypatch, capsys, tmp_path, tiny_dir, command):
    code, _, err = cli(monkeypatch, capsys, command, "--model", tiny_dir, "--dtype", "fp8", *outputs(command, tmp_path))
    assert "--dtype 'fp8' is not one of fp32, fp16, bf16" in one_line_error(code, err)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_dtypes_load_and_sample_close_to_fp32(monkeypatch, capsys, tmp_path, dtype):
    """The reference model in bf16/fp16 on the CPU: its weights are that dtype and its samples near fp32's."""
    from rstr._options import load_family

    assert load_family(None, dtype=dtype).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    outs = {}
    for d in ("fp32", dtype):
        outs[d] = tmp_path / f"{d}.npy"
        code, _, err = cli(monkeypatch, capsys, "sample", "--scale", "1.5", "--steps", "4", "--dtype", d, "--out", outs[d])
        assert code == 0, err
    full, half = np.load(outs["fp32"]), np.load(outs[dtype])
    assert half.dtype == np.float32 and np.isfinite(half).all() and not np.array_equal(half, full)
    assert np.abs(half - full).max() <= 0.1 * np.abs(full).max()


def test_a_dtype_the_model_cannot_run_is_one_line(monkeypatch, capsys, tmp_path):
    """An op without a half kernel on this device fails the load-time probe, not a run minutes later."""
    from rstr.families.dit import DiTFamily

    real = DiTFamily.denoise

    def no_half_kernels(self, sample, timestep, cond):
        if sample.dtype == torch.float16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
        return real(self, sample, timestep, cond)

    monkeypatch.setattr(DiTFamily, "denoise", no_half_kernels)
    code, _, err = cli(monkeypatch, capsys, "sample", "--dtype", "fp16", "--out", tmp_path / "x.npy")
    one_line_error(code, err)
    assert "--dtype fp16 on cpu: this model cannot run there (\"addmm_impl_cpu_\" not implemented for 'Half')" in err
    assert "use --dtype fp32" in err and not (tmp_path / "x.npy").exists()


def test_search_workers_load_the_dtype_of_the_model(tiny_dir):
    from rstr.search.objectives import TeacherFidelity
    from rstr.search.runner import EvalTask

    task = EvalTask(str(tiny_dir), TeacherFidelity(scale=2.0, steps=8, batch_size=4), dtype="bf16")
    task.setup("cpu")
    assert task.family.dtype == torch.bfloat16


# --------------------------------------------------------------------------- --json
def json_result(monkeypatch, capsys, *args, export: bool = False) -> dict:
    """Run a command with --json: it succeeds and stdout is exactly one JSON object."""
    code, out, err = cli(monkeypatch, capsys, *args, "--json", export=export)
    assert code == 0, err
    assert out.count("\n") == 1, out
    return json.loads(out)


def test_search_json(monkeypatch, capsys, tmp_path, tiny_dir):
    out = tmp_path / "s.json"
    record = json_result(monkeypatch, capsys, "search", "--model", tiny_dir, "--preset", "fast", "--steps", "6", "--out", out)
    assert record["out"] == str(out) and record["metric"] == "teacher_mse" and len(record["held_out_groups"]) >= 1
    assert record["schedule"] == json.loads(out.read_text())
    assert isinstance(record["beats_every_in_budget_baseline"], bool)


def test_calibrate_json(monkeypatch, capsys, tmp_path, tiny_dir):
    out = tmp_path / "ad"
    record = json_result(monkeypatch, capsys, "calibrate", "--model", tiny_dir, "--preset", "fast", "--steps", "2", "--out", out)
    assert record["out"] == str(out) and (out / "allocation.json").is_file()
    assert record["params"] > 0 and record["ranks"] and record["validation_after"] >= 0


def test_verify_json(monkeypatch, capsys, pixel_dit_bundle):
    record = json_result(monkeypatch, capsys, "verify", pixel_dit_bundle, "--seed", "3", export=True)
    assert record["passed"] is True and record["seed"] == 3 and record["max_rel_error"] <= record["tolerance"]
    assert len(record["per_step_rel_error"]) == Bundle.open(pixel_dit_bundle).plan.num_steps

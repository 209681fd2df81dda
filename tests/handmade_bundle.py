"""A bundle made by hand (docs/bundle.md) for the TensorRT backend's tests (tests/test_tensorrt_plan.py, tests/test_tensorrt_runner.py).

Three tiny ONNX graphs written with ``onnx.helper`` and a manifest with sha256s, so these tests
need neither the exporter nor torch models.  Its denoiser is a toy (tanh of an affine map of
sample, timestep and class label) and its step graphs implement the contract exactly, which
:func:`reference_walk` (a numpy walk of the plan) checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rstr.engines.bundle import Bundle, sha256_file

C, H, W = 1, 4, 4
NUM_CLASSES = 10
MIXED = (True, False, True, True, False, False)


# ----------------------------------------------------------------------------- a bundle by hand
def desc(name, dtype, shape):
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def make_manifest(batch: int = 1, guided=MIXED, symbolic_steps: bool = True) -> dict:
    """A manifest per docs/bundle.md; step-graph shapes symbolic ("batch") or concrete."""
    b = batch

    def step_shape(rows):
        return ["batch", C, H, W] if symbolic_steps else [rows, C, H, W]

    one = [1]
    steps = []
    for i, g in enumerate(guided):
        t = 900.0 - 150.0 * i
        steps.append(
            {
                "index": i,
                "timestep": t,
                "model_timestep": t,
                "guided": g,
                "scale": 1.5 + 0.25 * i if g else None,
                "batch": 2 * b if g else b,
                "coef_sample": 1.0 + 0.01 * i,
                "coef_eps": -0.2 - 0.03 * i,
            }
        )
    return {
        "format": "rstr.bundle",
        "version": 1,
        "family": "dit",
        "batch": b,
        "dtype": "fp32",
        "sample": desc("sample", "float32", [b, C, H, W]),
        "graphs": {
            "denoiser": {
                "file": "denoiser.onnx",
                "inputs": [
                    desc("sample", "float32", ["batch", C, H, W]),
                    desc("timestep", "float32", ["batch"]),
                    desc("class_labels", "int64", ["batch"]),
                ],
                "outputs": [desc("model_output", "float32", ["batch", C, H, W])],
            },
            "step_guided": {
                "file": "step_guided.onnx",
                "inputs": [
                    desc("sample", "float32", step_shape(b)),
                    desc("model_output", "float32", step_shape(2 * b)),
                    desc("scale", "float32", one),
                    desc("coef_sample", "float32", one),
                    desc("coef_eps", "float32", one),
                ],
                "outputs": [
                    desc("next_sample", "float32", step_shape(b)),
                    desc("next_sample_pair", "float32", step_shape(2 * b)),
                ],
            },
            "step_single": {
                "file": "step_single.onnx",
                "inputs": [
                    desc("sample", "float32", step_shape(b)),
                    desc("model_output", "float32", step_shape(b)),
                    desc("coef_sample", "float32", one),
                    desc("coef_eps", "float32", one),
                ],
                "outputs": [
                    desc("next_sample", "float32", step_shape(b)),
                    desc("next_sample_pair", "float32", step_shape(2 * b)),
                ],
            },
        },
        "conditioning": {
            "inputs": [desc("class_labels", "int64", ["batch"])],
            "unconditional": {"class_labels": {"fill": NUM_CLASSES}},
            "num_classes": NUM_CLASSES,
        },
        "plan": {
            "init_noise_sigma": 1.0,
            "num_steps": len(steps),
            "default_steps": len(steps),
            "passes_per_image": len(steps) + sum(guided),
            "compute_fraction": (len(steps) + sum(guided)) / (2 * len(steps)),
            "sampler": "ddim",
            "steps": steps,
        },
        "decoder": None,
        "provenance": {"model": "hand-made", "schedule_sha256": "0" * 64},
        "files": {f"{g}.onnx": {"sha256": "0" * 64} for g in ("denoiser", "step_guided", "step_single")},
        "engines": [],
    }


def _write_graphs(root: Path, batch: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value, dtype=np.float32):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, dtype), name))

    def save(graph, name):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, str(root / name))

    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [
        const("k_s", 0.9),
        const("k_t", 0.001),
        const("k_l", 0.01),
        const("col", [-1, 1, 1, 1], np.int64),
        helper.make_node("Reshape", ["timestep", "col"], ["t4"]),
        helper.make_node("Cast", ["class_labels"], ["lf"], to=f),
        helper.make_node("Reshape", ["lf", "col"], ["l4"]),
        helper.make_node("Mul", ["sample", "k_s"], ["a"]),
        helper.make_node("Mul", ["t4", "k_t"], ["bt"]),
        helper.make_node("Mul", ["l4", "k_l"], ["bl"]),
        helper.make_node("Add", ["a", "bt"], ["ab"]),
        helper.make_node("Add", ["ab", "bl"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["model_output"]),
    ]
    save(
        helper.make_graph(
            nodes,
            "denoiser",
            [
                helper.make_tensor_value_info("sample", f, ["batch", C, H, W]),
                helper.make_tensor_value_info("timestep", f, ["batch"]),
                helper.make_tensor_value_info("class_labels", i64, ["batch"]),
            ],
            [helper.make_tensor_value_info("model_output", f, ["batch", C, H, W])],
        ),
        "denoiser.onnx",
    )

    b = batch
    tail = [
        helper.make_node("Mul", ["sample", "coef_sample"], ["xs"]),
        helper.make_node("Mul", ["eps", "coef_eps"], ["es"]),
        helper.make_node("Add", ["xs", "es"], ["next_sample"]),
        helper.make_node("Concat", ["next_sample", "next_sample"], ["next_sample_pair"], axis=0),
    ]
    outs = [
        helper.make_tensor_value_info("next_sample", f, [b, C, H, W]),
        helper.make_tensor_value_info("next_sample_pair", f, [2 * b, C, H, W]),
    ]
    scalars = [helper.make_tensor_value_info(n, f, [1]) for n in ("coef_sample", "coef_eps")]
    guided_nodes = [
        const("halves", [b, b], np.int64),
        helper.make_node("Split", ["model_output", "halves"], ["c", "u"], axis=0),
        helper.make_node("Sub", ["c", "u"], ["d"]),
        helper.make_node("Mul", ["d", "scale"], ["sd"]),
        helper.make_node("Add", ["u", "sd"], ["eps"]),
    ] + tail
    save(
        helper.make_graph(
            guided_nodes,
            "step_guided",
            [
                helper.make_tensor_value_info("sample", f, [b, C, H, W]),
                helper.make_tensor_value_info("model_output", f, [2 * b, C, H, W]),
                helper.make_tensor_value_info("scale", f, [1]),
            ]
            + scalars,
            outs,
        ),
        "step_guided.onnx",
    )
    single_nodes = [helper.make_node("Identity", ["model_output"], ["eps"])] + tail
    save(
        helper.make_graph(
            single_nodes,
            "step_single",
            [
                helper.make_tensor_value_info("sample", f, [b, C, H, W]),
                helper.make_tensor_value_info("model_output", f, [b, C, H, W]),
            ]
            + scalars,
            outs,
        ),
        "step_single.onnx",
    )


def write_manifest(root: Path, manifest: dict) -> None:
    names = [g["file"] for g in manifest["graphs"].values()] + [e["file"] for e in manifest.get("engines", [])]
    manifest["files"] = {n: {"sha256": sha256_file(root / n), "bytes": (root / n).stat().st_size} for n in names}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))


def make_bundle(root: Path, batch: int = 1, guided=MIXED) -> Bundle:
    root.mkdir(parents=True, exist_ok=True)
    _write_graphs(root, batch)
    write_manifest(root, make_manifest(batch, guided))
    return Bundle.open(root)


def reference_walk(manifest: dict, noise: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """docs/bundle.md's walk in numpy, with the toy denoiser."""

    def denoiser(x, t, lab):
        return np.tanh(0.9 * x + 0.001 * t[:, None, None, None] + 0.01 * lab.astype(np.float32)[:, None, None, None])

    manifest = manifest.to_json()
    b = manifest["batch"]
    uncond = np.full_like(labels, manifest["conditioning"]["unconditional"]["class_labels"]["fill"])
    x = noise.astype(np.float64) * manifest["plan"]["init_noise_sigma"]
    for s in manifest["plan"]["steps"]:
        if s["guided"]:
            out = denoiser(np.concatenate([x, x]), np.full(2 * b, s["model_timestep"]), np.concatenate([labels, uncond]))
            c, u = out[:b], out[b:]
            eps = u + s["scale"] * (c - u)
        else:
            eps = denoiser(x, np.full(b, s["model_timestep"]), labels)
        x = s["coef_sample"] * x + s["coef_eps"] * eps
    return x

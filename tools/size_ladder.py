#!/usr/bin/env python
"""The size ladder: export DiT-shaped pipelines of growing size and record what the build costs.

For each size (DiT-S/2, DiT-B/2, DiT-L/2, DiT-XL/2 shapes, random weights, with a real-shaped
``AutoencoderKL``) and each dtype, ``rstr-export build`` runs alone in a child process under
``/usr/bin/time -v`` (its peak RSS, not the parent's), then ``rstr-export run`` writes an image
from the bundle.  The table records peak RSS, export seconds and bundle bytes against the weight
bytes in the export dtype; a least-squares line ``peak = a * weights + b`` per dtype predicts
the build's memory for FLUX.1 (12 B parameters) and Qwen-Image (20 B)::

    python tools/size_ladder.py --sizes S,B --dtypes fp32,fp16 --work /tmp/ladder      # a check
    python tools/size_ladder.py --sizes S,B,XL --dtypes fp32,fp16 --markdown ladder.md  # the ladder

Run it on a quiet machine: every build is timed and measured alone.  The memory target of the
export (docs/benchmarks.md) is ``1.5 x weights + 2 GiB``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

SIZES = {  # DiT paper, Table 1: layers, heads, head dim (hidden = heads x head dim)
    "S": (12, 6, 64),
    "B": (12, 12, 64),
    "L": (24, 16, 64),
    "XL": (28, 16, 72),
}
SD_VAE = dict(  # the AutoencoderKL of DiT and Stable Diffusion (sd-vae-ft-ema), random weights
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.18215,
)
PREDICT = {"FLUX.1 (12 B)": 12e9, "Qwen-Image (20 B)": 20e9}
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
GIB = 1 << 30


def make_pipeline(out: Path, size: str, seed: int = 0) -> Path:
    """A DiTPipeline directory (transformer, AutoencoderKL, DDIM scheduler) of DiT-``size``/2 shape, random weights."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from rstr._io import atomic_dir

    if (out / "model_index.json").is_file():
        return out
    layers, heads, head_dim = SIZES[size]
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
    )
    pipe = DiTPipeline(transformer=transformer, vae=AutoencoderKL(**SD_VAE), scheduler=DDIMScheduler(clip_sample=False))
    with atomic_dir(out, force=True) as tmp:
        pipe.save_pretrained(tmp)
    return out


def write_schedule(path: Path, steps: int = 4) -> Path:
    """``steps`` DDIM steps, the first guided at scale 4: a few passes at batch 1 (the ladder measures export, not sampling)."""
    from rstr.schedule import GuidanceSchedule

    guided = (True,) + (False,) * (steps - 1)
    GuidanceSchedule(
        family="dit", sampler="ddim", guided=guided, scales=(4.0,) + (None,) * (steps - 1), default_steps=steps
    ).save(path)
    return path


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v``: its peak RSS (bytes), wall seconds and exit status."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return {"peak_rss": int(found.group(1)) * 1024, "seconds": seconds}


def rung(model: Path, schedule: Path, dtype: str, work: Path) -> dict:
    """One build and one image: peak RSS, seconds and bundle bytes of the build, and the image run's too."""
    bundle = work / f"bundle-{model.name}-{dtype}"
    exe = [sys.executable, "-m", "rstr.export.cli"]
    build = timed(
        [*exe, "build", "--model", str(model), "--schedule", str(schedule), "--dtype", dtype, "--out", str(bundle), "--force"]
    )
    image = work / f"{model.name}-{dtype}.png"
    run = timed([*exe, "run", str(bundle), "--class", "207", "--backend", "onnxruntime-cpu", "--out", str(image)])
    manifest = json.loads((bundle / "manifest.json").read_text())
    params = json.loads((model / "transformer" / "config.json").read_text())
    return {
        "model": model.name,
        "dtype": dtype,
        "weight_bytes": _transformer_bytes(model, dtype),
        "build": build,
        "run": run,
        "bundle_bytes": sum(f["bytes"] for f in manifest["files"].values()),
        "max_rel_error": manifest["verification"]["max_rel_error"],
        "layers": params["num_layers"],
        "image": str(image),
    }


def _transformer_bytes(model: Path, dtype: str) -> int:
    """Parameters of the transformer (from its safetensors header) times the bytes of ``dtype``."""
    from safetensors import safe_open

    from rstr.families.weights import weight_files

    files = weight_files(model / "transformer", "diffusion_pytorch_model")
    n = 0
    for name, path in files.items():
        with safe_open(path, "pt") as fh:
            shape = fh.get_slice(name).get_shape()
        count = 1
        for d in shape:
            count *= d
        n += count
    return n * BYTES[dtype]


def fit(rows: list[dict]) -> dict[str, dict]:
    """Per dtype, the least-squares line peak RSS = a * weight bytes + b, and its predictions."""
    import numpy as np

    out = {}
    for dtype in sorted({r["dtype"] for r in rows}):
        pts = [(r["weight_bytes"], r["build"]["peak_rss"]) for r in rows if r["dtype"] == dtype]
        if len(pts) < 2:
            continue
        x, y = np.array(pts, dtype=float).T
        a, b = np.polyfit(x, y, 1)
        out[dtype] = {
            "slope": float(a),
            "intercept_bytes": float(b),
            "predict": {name: float(a * n * BYTES[dtype] + b) for name, n in PREDICT.items()},
            "target": {name: 1.5 * n * BYTES[dtype] + 2 * GIB for name, n in PREDICT.items()},
        }
    return out


def markdown(rows: list[dict], lines: dict[str, dict]) -> str:
    """The ladder as a markdown table, the fitted lines and their predictions."""
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    out = [
        "| model | dtype | weights GiB | build peak RSS GiB | target GiB (1.5 x weights + 2) | build s | bundle GiB "
        "| image run peak RSS GiB | image run s | max rel. error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = 1.5 * r["weight_bytes"] + 2 * GIB
        out.append(
            f"| {r['model']} | {r['dtype']} | {gib(r['weight_bytes'])} | {gib(r['build']['peak_rss'])} | {gib(target)} "
            f"| {r['build']['seconds']:.0f} | {gib(r['bundle_bytes'])} | {gib(r['run']['peak_rss'])} "
            f"| {r['run']['seconds']:.0f} | {r['max_rel_error']:.1e} |"
        )
    for dtype, line in lines.items():
        out += ["", f"**{dtype}**: peak RSS = {line['slope']:.2f} x weights + {gib(line['intercept_bytes'])} GiB; predicts"]
        for name, pred in line["predict"].items():
            out.append(f"- {name}: {gib(pred)} GiB (target {gib(line['target'][name])} GiB)")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="S,B", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--dtypes", default="fp32,fp16", help="comma-separated, of fp32, fp16, bf16")
    parser.add_argument("--work", type=Path, default=Path("ladder-work"), help="model directories and bundles go here")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of the bundle (the first guided)")
    parser.add_argument("--json", type=Path, default=None, help="write the records and fits as JSON")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table and fits as markdown")
    args = parser.parse_args()
    sizes, dtypes = args.sizes.split(","), args.dtypes.split(",")
    bad = [s for s in sizes if s not in SIZES] + [d for d in dtypes if d not in BYTES]
    if bad:
        parser.error(f"unknown size or dtype {bad[0]!r}")
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    schedule = write_schedule(args.work / "schedule.json", args.steps)
    rows = []
    for size in sizes:
        model = make_pipeline(args.work / f"dit-{size}", size)
        for dtype in dtypes:
            print(f"building DiT-{size}/2 in {dtype} ...", flush=True)
            rows.append(rung(model, schedule, dtype, args.work))
            r = rows[-1]
            print(
                f"  peak RSS {r['build']['peak_rss'] / GIB:.2f} GiB for {r['weight_bytes'] / GIB:.2f} GiB of weights, "
                f"{r['build']['seconds']:.0f} s, bundle {r['bundle_bytes'] / GIB:.2f} GiB, image {r['image']}",
                flush=True,
            )
    lines = fit(rows)
    text = markdown(rows, lines)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "fits": lines}, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The size ladder: export DiT-shaped pipelines of growing size and record what the build costs.

For each size (DiT-S/2, DiT-B/2, DiT-L/2, DiT-XL/2 shapes, random weights, with a real-shaped
``AutoencoderKL``) and each dtype, ``rstr-export build`` runs alone in a child process under
``/usr/bin/time -v`` (its peak RSS, not the parent's), then ``rstr-export run`` writes an image
from the bundle.  The table records peak RSS, export seconds and bundle bytes against the weight
bytes (transformer and VAE) in the export dtype; a least-squares line ``peak = a * weights + b`` per dtype predicts
the build's memory for the named models (their transformer, text encoders and VAE)::

    python tools/size_ladder.py --sizes S,B --dtypes fp32,fp16 --work /tmp/ladder      # a check
    python tools/size_ladder.py --sizes S,B,XL --dtypes fp32,fp16 --markdown ladder.md  # the ladder

Run it on a quiet machine: every build is timed and measured alone.  The memory target of the
export (docs/benchmarks.md) is ``1.5 x weights + 2 GB``.
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
PREDICT = {  # parameters a build loads (README, "Memory"): transformer + text encoders + VAE
    "DiT-XL/2 + SD VAE": 0.68e9 + 0.08e9,
    "PixArt-alpha XL/2 + T5-XXL + SD VAE": 0.61e9 + 4.8e9 + 0.08e9,
    "FLUX.1 + T5-XXL + CLIP-L + VAE": 11.9e9 + 4.8e9 + 0.12e9 + 0.08e9,
    "Qwen-Image + VAE": 20.4e9 + 0.13e9,
}
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
GB = 10**9  # decimal, as the README's memory table


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
    """Run ``cmd`` under ``/usr/bin/time -v``: its peak RSS (bytes), wall seconds, exit status and, if it failed, why.

    A failed command (killed for memory, say) is a result of the ladder, not an end to it: its peak
    RSS is still what ``time`` saw.
    """
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    status = re.search(r"Exit status: (\d+)", proc.stderr)
    signal = re.search(r"Command terminated by signal (\d+)", proc.stderr)
    record = {"peak_rss": int(found.group(1)) * 1024 if found else 0, "seconds": seconds, "returncode": proc.returncode}
    if proc.returncode != 0 or status is None:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("\t", "Command "))]
        record["error"] = f"signal {signal.group(1)}" if signal else (lines[-1] if lines else f"exit {proc.returncode}")
        print(f"  {' '.join(cmd[:4])} ... failed: {record['error']}", flush=True)
    return record


def rung(model: Path, schedule: Path, dtype: str, work: Path) -> dict:
    """One build and one image: peak RSS, seconds and bundle bytes of the build, and the image run's too."""
    bundle = work / f"bundle-{model.name}-{dtype}"
    exe = [sys.executable, "-m", "rstr.export.cli"]
    build = timed(
        [*exe, "build", "--model", str(model), "--schedule", str(schedule), "--dtype", dtype, "--out", str(bundle), "--force"]
    )
    params = json.loads((model / "transformer" / "config.json").read_text())
    row = {"model": model.name, "dtype": dtype, "weight_bytes": _weight_bytes(model, dtype), "build": build}
    row["layers"] = params["num_layers"]
    if "error" in build:
        return row
    image = work / f"{model.name}-{dtype}.png"
    row["run"] = timed([*exe, "run", str(bundle), "--class", "207", "--backend", "onnxruntime-cpu", "--out", str(image)])
    manifest = json.loads((bundle / "manifest.json").read_text())
    row["bundle_bytes"] = sum(f["bytes"] for f in manifest["files"].values())
    row["max_rel_error"] = manifest["verification"]["max_rel_error"]
    row["image"] = str(image)
    return row


def _weight_bytes(model: Path, dtype: str) -> int:
    """Parameters of every weight file the build loads (transformer and VAE, from their safetensors
    headers) times the bytes of ``dtype``: the memory target counts all the weights, not the transformer's alone."""
    from safetensors import safe_open

    n = 0
    for path in sorted(model.glob("*/*.safetensors")):
        with safe_open(path, "pt") as fh:
            for name in fh.keys():
                count = 1
                for d in fh.get_slice(name).get_shape():
                    count *= d
                n += count
    return n * BYTES[dtype]


def fit(rows: list[dict]) -> dict[str, dict]:
    """Per dtype, the least-squares line peak RSS = a * weight bytes + b, and its predictions."""
    import numpy as np

    out = {}
    for dtype in sorted({r["dtype"] for r in rows}):
        pts = [(r["weight_bytes"], r["build"]["peak_rss"]) for r in rows if r["dtype"] == dtype and "error" not in r["build"]]
        if len(pts) < 2:
            continue
        x, y = np.array(pts, dtype=float).T
        a, b = np.polyfit(x, y, 1)
        out[dtype] = {
            "slope": float(a),
            "intercept_bytes": float(b),
            "predict": {name: float(a * n * BYTES[dtype] + b) for name, n in PREDICT.items()},
            "target": {name: 1.5 * n * BYTES[dtype] + 2 * GB for name, n in PREDICT.items()},
        }
    return out


def markdown(rows: list[dict], lines: dict[str, dict]) -> str:
    """The ladder as a markdown table, the fitted lines and their predictions."""
    gb = lambda b: f"{b / GB:.2f}"  # noqa: E731
    out = [
        "| model | dtype | weights GB | build peak RSS GB | target GB (1.5 x weights + 2) | build s | bundle GB "
        "| image run peak RSS GB | image run s | max rel. error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = 1.5 * r["weight_bytes"] + 2 * GB
        if "error" in r["build"]:
            out.append(
                f"| {r['model']} | {r['dtype']} | {gb(r['weight_bytes'])} | {gb(r['build']['peak_rss'])} (failed: "
                f"{r['build']['error']}) | {gb(target)} | {r['build']['seconds']:.0f} | — | — | — | — |"
            )
            continue
        run = r["run"]
        run_rss = gb(run["peak_rss"]) + (f" (failed: {run['error']})" if "error" in run else "")
        out.append(
            f"| {r['model']} | {r['dtype']} | {gb(r['weight_bytes'])} | {gb(r['build']['peak_rss'])} | {gb(target)} "
            f"| {r['build']['seconds']:.0f} | {gb(r['bundle_bytes'])} | {run_rss} "
            f"| {run['seconds']:.0f} | {r['max_rel_error']:.1e} |"
        )
    for dtype, line in lines.items():
        out += ["", f"**{dtype}**: peak RSS = {line['slope']:.2f} x weights + {gb(line['intercept_bytes'])} GB; predicts"]
        for name, pred in line["predict"].items():
            out.append(f"- {name}: {gb(pred)} GB (target {gb(line['target'][name])} GB)")
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
            if args.json:  # after every rung: a later one killed for memory loses nothing
                args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
            if "error" in r["build"]:
                continue
            print(
                f"  peak RSS {r['build']['peak_rss'] / GB:.2f} GB for {r['weight_bytes'] / GB:.2f} GB of weights, "
                f"{r['build']['seconds']:.0f} s, bundle {r['bundle_bytes'] / GB:.2f} GB, image {r.get('image')}",
                flush=True,
            )
    lines = fit(rows)
    text = markdown(rows, lines)
    text = (
        f"Written by `python tools/size_ladder.py {' '.join(sys.argv[1:])}` on {time.strftime('%Y-%m-%d %H:%M')} "
        f"({os.cpu_count()} CPUs); each build alone in a child process under `/usr/bin/time -v`.\n\n" + text
    )
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "fits": lines}, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()

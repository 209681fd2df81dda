"""The human side of a bundle: ``report.md``, ``samples.png`` and ``schedule.png``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rstr.engines.bundle import Bundle
from rstr.engines.onnxruntime import OnnxRuntimeRunner
from rstr.families.base import Family
from rstr.schedule import GuidanceSchedule


def write_samples(root: Path, family: Family, per_class: int = 8) -> str | None:
    """A grid of bundle outputs, one row per class, when the model has classes and its latents are images."""
    if family.image is None or family.num_classes is None:
        return None
    from rstr.evaluate import sample_grid

    bundle = Bundle.open(root, verify_checksums=False)
    b = bundle.batch
    labels = np.repeat(np.arange(family.num_classes), per_class)
    to_np = lambda c: None if c is None else {k: v.cpu().numpy() for k, v in c.items()}  # noqa: E731
    latents = []
    with OnnxRuntimeRunner(bundle) as runner:
        for lo in range(0, len(labels), b):
            chunk = torch.from_numpy(np.resize(labels[lo:lo + b], b))
            cond, uncond = family.conditioning_for(chunk)
            noise = np.random.default_rng(10_000 + lo).standard_normal(bundle.sample.concrete(b), dtype=np.float32)
            latents.append(runner.infer(noise, to_np(cond), to_np(uncond))[: len(labels[lo:lo + b])])
    images = family.to_images(torch.from_numpy(np.concatenate(latents)))
    sample_grid(images, torch.from_numpy(labels), root / "samples.png", per_class=per_class)
    return "samples.png"


def write_report(root: Path, manifest: dict, family: Family, schedule: GuidanceSchedule) -> None:
    """Write report.md (summary, plan, verification) with the schedule plot and sample grid."""
    from rstr.plots import plot_schedule

    plot_schedule(schedule, root / "schedule.png")
    samples = write_samples(root, family)
    s = manifest["summary"]
    lines = [
        f"# rstr bundle: {family.name}",
        "",
        f"- schedule: {s['schedule']}",
        f"- compute saved against constant CFG at {schedule.default_steps} steps: **{s['compute_saved']:.0%}**",
        f"- verification ({manifest['verification']['backend']}): max relative error {s['max_rel_error']:.2e} "
        f"(tolerance {manifest['verification']['tolerance']:.0e})",
        f"- precision: {manifest['dtype']}, batch {manifest['batch']}, engines: "
        f"{', '.join(e['graph'] for e in manifest['engines']) or 'none (ONNX Runtime)'}",
    ]
    if s.get("stage2", {}).get("check"):
        from rstr.calibrate import describe_check

        lines.append(f"- Stage-2 adapter {'merged' if s['stage2']['used'] else '**not used**'}: {describe_check(s['stage2']['check'])}")
    if s.get("quality"):
        q = s["quality"]
        lines += ["", "## Quality (held-out seeds, %d groups of %d images)" % (q["rstr"]["groups"], q["images_per_group"]), "",
                  "| | passes/image | FD | accuracy |", "|---|---|---|---|"]
        for name in ("constant_cfg", "rstr"):
            r = q[name]
            lines.append(f"| {name} | {r['passes_per_image']} | {r['fd_mean']:.3f} ± {r['fd_std']:.3f} | {r['accuracy']:.3f} |")
    if s.get("speed"):
        sp = s["speed"]
        lines += ["", f"## Speed (end to end, batch {manifest['batch']}, median of {sp['reps']} interleaved runs, this machine)", "",
                  f"- PyTorch eager, {sp['baseline']}: {sp['seconds']['pytorch_constant_cfg'] * 1e3:.1f} ms",
                  f"- this bundle on ONNX Runtime CPU: {sp['seconds']['bundle'] * 1e3:.1f} ms",
                  f"- speedup: **{sp['speedup']:.2f}x**"]
    lines += ["", "## Plan", "", "| step | timestep | guided | scale | batch |", "|---|---|---|---|---|"]
    for st in manifest["plan"]["steps"]:
        scale = "" if st["scale"] is None else f"{st['scale']:.2f}"
        lines.append(f"| {st['index']} | {st['timestep']:.0f} | {'yes' if st['guided'] else 'no'} | {scale} | {st['batch']} |")
    lines += ["", "![schedule](schedule.png)"] + (["", f"![samples]({samples})"] if samples else [])
    (root / "report.md").write_text("\n".join(lines) + "\n")

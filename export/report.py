"""The human side of a bundle: ``report.md``, ``samples.png`` and ``schedule.png``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rstr.engines.bundle import Bundle
from rstr.engines.onnxruntime import OnnxRuntimeRunner
from rstr.export.verify import as_arrays

from rstr.compare import Comparison
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
    latents = []
    with OnnxRuntimeRunner(bundle) as runner:
        for lo in range(0, len(labels), b):
            chunk = torch.from_numpy(np.resize(labels[lo : lo + b], b))
            cond, uncond = family.conditioning_for(chunk)
            noise = np.random.default_rng(10_000 + lo).standard_normal(bundle.sample.concrete(b), dtype=np.float32)
            latents.append(runner.infer(noise, *as_arrays(cond, uncond))[: len(labels[lo : lo + b])])
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
        f"- precision: {manifest.get('precision', 'fp32')} (export dtype {manifest['dtype']}), batch {manifest['batch']}, engines: "
        f"{', '.join(e['graph'] for e in manifest['engines']) or 'none (ONNX Runtime)'}",
    ]
    for gate in s.get("gates", {}).values():
        lines.append(f"- {gate['name']} gate: {gate['decision']}")
    if s.get("quality"):
        lines += ["", *quality_section(Comparison.from_json(s["quality"]))]
    for gate in s.get("gates", {}).values():
        if gate["comparisons"]:
            lines += [
                "",
                f"### {gate['name'].capitalize()} gate ({gate['groups']} groups of {gate['num']} gate seeds "
                f"from {gate['seeds'][0]}, paired)",
                "",
                *comparison_table([Comparison.from_json(c) for c in gate["comparisons"]]),
            ]
            if any(c["groups"] < gate["groups"] for c in gate["comparisons"]):
                lines += ["", "A candidate worse on a group is not scored on the groups after it: it has failed the gate."]
    if s.get("speed"):
        sp = s["speed"]
        lines += [
            "",
            f"## Speed (end to end, batch {manifest['batch']}, median of {sp['reps']} interleaved runs, "
            f"{sp['threads']} thread{'s' * (sp['threads'] != 1)} each, this machine)",
            "",
            f"- {sp['baseline']}: {sp['seconds']['pytorch_constant_cfg'] * 1e3:.1f} ms",
            f"- this bundle on ONNX Runtime CPU: {sp['seconds']['bundle'] * 1e3:.1f} ms",
            f"- speedup: **{sp['speedup']:.2f}x**",
        ]
    lines += ["", "## Plan", "", "| step | timestep | guided | scale | batch |", "|---|---|---|---|---|"]
    for st in manifest["plan"]["steps"]:
        scale = "" if st["scale"] is None else f"{st['scale']:.2f}"
        lines.append(f"| {st['index']} | {st['timestep']:.0f} | {'yes' if st['guided'] else 'no'} | {scale} | {st['batch']} |")
    lines += ["", "![schedule](schedule.png)"] + (["", f"![samples]({samples})"] if samples else [])
    (root / "report.md").write_text("\n".join(lines) + "\n")


def comparison_table(comparisons: list[Comparison]) -> list[str]:
    """Markdown rows: each candidate against its baseline, FD per group, paired differences and the verdict."""
    fmt = lambda xs: " / ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    rows = [
        "| candidate | passes/image | FD per group | baseline FD per group | paired differences | accuracy | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        rows.append(
            f"| {c.candidate.label}: {c.candidate.schedule} | {c.candidate.passes_per_image} | {fmt(c.candidate.fd)} | "
            f"{fmt(c.baseline.fd)} ({c.baseline.label}) | {fmt(c.differences)} | {c.candidate.accuracy_mean:.3f} vs "
            f"{c.baseline.accuracy_mean:.3f} | **{c.verdict}** |"
        )
    return rows


def quality_section(q: Comparison) -> list[str]:
    """The report's quality section: the bundle against the stock model on held-out seeds, in a table and in words."""
    words = {
        "better": "better than the stock model on every held-out group",
        "worse": "worse than the stock model on every held-out group",
        "inside the noise": "neither better nor worse on every group: the difference is inside the noise",
    }[q.verdict]
    return [
        f"## Quality against the stock model ({q.groups} held-out groups of {q.num} seeds from {q.seed_start}, paired)",
        "",
        f"Baseline: the stock model, freshly loaded with no adapter, {q.baseline.schedule}. The bundle is **{words}** "
        f"(FD, lower is better; per-group differences bundle minus stock).",
        "",
        *comparison_table([q]),
    ]

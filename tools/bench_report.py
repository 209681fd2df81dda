"""Turn ``tools/bench.py`` results into ``benchmarks.md``, ``bench/results.json`` and PNG plots.

The numbers in the tables come from ``bench_numbers.py``, the plots from ``bench_plots.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench_numbers import (
    OVERHEAD_TARGET,
    TARGETS,
    _ips,
    _ms,
    _pct,
    _spread_ms,
    _x,
    best_bundle,
    e2e,
    fraction_of_peak,
    rel_error,
    speedup,
    step_ms,
)
from bench_plots import plots
from bench_setup import MODELS, ROW_ENGINE, ROW_LABELS, ROW_PRECISION, ROW_SCHEDULE, ROWS, is_cache_dit


# ------------------------------------------------------------------------------ markdown
def _model_table(model: dict, peak: float) -> list[str]:
    peak = model.get("peak_gflops", peak)
    big = model["batches"][-1] if len(model["batches"]) > 1 else None
    q = (model.get("quality") or {}).get("rows", {})
    head = [
        "row",
        "schedule",
        "precision",
        "passes / image",
        "GFLOP / image",
        "denoiser ms @B=1",
        "@2B=2",
        "ms / image, batch 1 [min–max]",
        "images/s, batch 1 [min–max]",
        "speedup, batch 1",
    ]
    if big:
        head += [f"images/s, batch {big} [min–max]", f"speedup, batch {big}"]
    head += (
        ["% of fp32 peak, batch 1"] + ([f"% of peak, batch {big}"] if big else []) + ["peak RSS MiB", "max rel. error vs PyTorch"]
    )
    if q:
        head += ["FD (held-out)", "accuracy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in ROWS:
        row = model["rows"].get(key)
        if row is None or row.get("skipped"):
            continue
        passes = row.get("passes_per_image")
        passes_s = "—" if passes is None else (f"{passes:.2f}" if is_cache_dit(key) else f"{passes:g}")
        sched = model["schedules"].get(ROW_SCHEDULE[key], {})
        cells = [
            f"**{key}**",
            f"{ROW_SCHEDULE[key]} ({sched.get('compute_fraction', float('nan')):.0%})",
            ROW_PRECISION[key],
            passes_s,
            _ms(row.get("gflop_per_image"), 2),
            _ms(step_ms(model, key, 1), 2),
            _ms(step_ms(model, key, 2), 2),
            _spread_ms(e2e(row, 1)),
            _ips(e2e(row, 1)),
            _x(speedup(model, key, 1)),
        ]
        if big:
            cells += [_ips(e2e(row, big)), _x(speedup(model, key, big))]
        mem = row.get("peak_rss_mb")
        cells += [_pct(fraction_of_peak(row, 1, peak), 2)] + ([_pct(fraction_of_peak(row, big, peak), 2)] if big else [])
        err = rel_error(model, key)
        cells += ["—" if not mem else f"{mem['peak_rss_mb']:,.0f}", "—" if err is None else f"{err:.1e}"]
        if q:
            r = q.get(key)
            cells += (
                ["—", "—"]
                if r is None
                else [
                    " / ".join(f"{v:.2f}" for v in r["fd"]) + (f" (mean {r['fd_mean']:.2f})" if len(r["fd"]) > 1 else ""),
                    " / ".join(f"{v:.3f}" for v in r["accuracy"]),
                ]
            )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict, plots: dict[str, str]) -> str:
    m = results["machine"]
    peak = results["peak_gflops"]
    L = ["# Benchmarks", ""]
    L += [
        f"Written by `{results['command']}` on {results['started']}, in {results['seconds'] / 60:.0f} min"
        + (" (**--quick smoke run: numbers not meaningful**)" if results["quick"] else "")
        + (" (**partial: the run has not finished**)" if results.get("partial") else "")
        + ".",
        "",
    ]
    if results.get("updated"):
        L += [
            f"Models {', '.join(results['updated'])} come from an earlier run (`--update`); each model's rows were "
            "measured together in one run, and each model below says when.",
            "",
        ]
    per_model = ", ".join(f"{k} {md['matmul']['gflops']:.1f}" for k, md in results["models"].items() if "matmul" in md)
    L += [
        f"**Machine:** {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_gb']:.0f} GB RAM, "
        f"{m.get('gpu') or 'no GPU'}; torch {m['torch']}, ONNX Runtime {m['onnxruntime']}, diffusers {m['diffusers']}, "
        f"cache-dit {m['cache_dit'] or 'not installed'}, Python {m['python']}. {results['threads']} intra-op thread(s) for "
        f"torch and ONNX Runtime.",
        "",
    ]
    L += [
        f"**fp32 peak:** torch.matmul on 1024² to 4096² matrices, fastest repetition, best size: "
        f"{results['matmul_start']['gflops']:.1f} GFLOP/s at the start, {results['matmul_end']['gflops']:.1f} at the end"
        + (f", before each model: {per_model}" if per_model else "")
        + f'. The highest, {peak:.1f} GFLOP/s, is the "peak" of the % columns.',
        "",
    ]
    c0, c1 = results.get("contention"), results.get("contention_end")
    if c0 and c1 and c0["threads"] > 1:
        busy = max(c0["ratio"], c1["ratio"]) > 2
        L += [
            f"**Contention probe** (a small-matmul loop on {c0['threads']} threads vs 1; ≤ 1× on an idle machine): "
            f"{c0['ratio']:.2f}× at the start (load average {c0['loadavg'][0]:.1f}), {c1['ratio']:.2f}× at the end "
            f"(load {c1['loadavg'][0]:.1f})"
            + (
                (
                    " — **the machine was busy**: multi-threaded times would be inflated"
                    + (", hence this run's single thread." if results["threads"] == 1 else ".")
                )
                if busy
                else "."
            ),
            "",
        ]
    elif c0:
        L += [f"**Load average** at start / end: {c0['loadavg'][0]:.1f} / {c1['loadavg'][0]:.1f} (single-threaded run).", ""]
    L += [
        f"**Repetitions:** {results['reps']} interleaved per row (median shown, [min–max] spread). "
        f"**rstr schedule** (reference model): {results['schedule_source']}; {results.get('schedule_describe', '')}. **TensorRT:** "
        + ("available" if results["tensorrt"] == "available" else f"skipped everywhere: {results['tensorrt']}."),
        "",
    ]

    # ---- summary
    L += ["## Summary", ""]
    models = results["models"]
    for key, target in TARGETS.items():
        md = models.get(key)
        if not md or "rows" not in md:
            continue
        s = speedup(md, "ort-rstr", 1)
        best = best_bundle(md)
        verdict = "—" if best is None else ("**met**" if best[1] >= target else "**missed**")
        L.append(
            f"- {md['title']}: rstr bundle on ONNX Runtime (rstr schedule, "
            f"{md['schedules']['rstr']['compute_fraction']:.0%} of constant-CFG compute) vs the stock diffusers pipeline, "
            f"end to end at batch 1: fp32 **{_x(s)}**"
            + (
                ""
                if best is None
                else f"; fastest at a precision not worse than fp32 in held-out FD: `{best[0]}` **{_x(best[1])}**"
            )
            + f" (target ≥ {target:g}×) {verdict}."
        )
    worst = None
    for md in models.values():
        for key in [k for k in ROWS if ROW_ENGINE[k] == "ort"]:
            for b, o in (md.get("rows", {}).get(key, {}).get("overhead") or {}).items():
                if worst is None or o["host_fraction"] > worst[0]:
                    worst = (o["host_fraction"], o["outside_denoiser_fraction"], md["key"], key, b)
    if worst:
        L.append(
            f"- ONNX Runtime plan executor, host work outside every session call (binding, Python walk, input checks): "
            f"at most **{_pct(worst[0], 2)}** of `infer` ({worst[2]} {worst[3]}, batch {worst[4]}; target < "
            f"{OVERHEAD_TARGET:.0%}) {'**met**' if worst[0] < OVERHEAD_TARGET else '**missed**'}; counting the step graphs "
            f"too, everything outside the denoiser is at most {_pct(max(_outside(models)), 2)}."
        )
    L.append("")
    L += [
        "Speedup of the rstr bundle over the stock pipeline, split into the compute it skips and the runtime it runs on "
        "(batch 1): *compute ratio* = FLOPs/image of the baseline over the row's; *runtime factor* = speedup / compute ratio "
        "(> 1: faster per FLOP than diffusers eager).",
        "",
    ]
    L += ["| model | row | speedup | compute ratio | runtime factor |", "|---|---|---|---|---|"]
    for md in models.values():
        if "rows" not in md:
            continue
        base = md["rows"]["diffusers"].get("gflop_per_image")
        for key in [k for k in ROWS if k != "diffusers"]:
            row = md["rows"].get(key, {})
            s = speedup(md, key, 1)
            if s is None or not base or not row.get("gflop_per_image"):
                continue
            ratio = base / row["gflop_per_image"]
            L.append(f"| {md['key']} | {key} | {_x(s)} | {ratio:.2f} | {s / ratio:.2f} |")
    L.append("")
    for name, title in (
        ("e2e", "End-to-end time per image"),
        ("quality", "Quality vs speed (reference model)"),
        ("overhead", "ONNX Runtime infer time outside the denoiser"),
    ):
        if name in plots:
            L += [f"![{title}]({plots[name]})", ""]

    # ---- per model
    L += ["## Per model", ""]
    for md in models.values():
        L += [f"### {md['key']}: {md['title']}", ""]
        if "error" in md:
            L += [f"Failed: `{md['error']}`", ""]
            continue
        L += [
            f"Measured {md.get('started', '?')}, {md.get('reps', '?')} reps, {md.get('threads', '?')} thread(s), "
            f"matmul peak {md.get('peak_gflops', float('nan')):.1f} GFLOP/s in that run.",
            "",
        ]
        L += [
            f"{md['shape']}; {md['parameters'] / 1e6:.1f} M parameters; {md['family']} family; "
            f"{md['steps']} nominal steps, constant CFG scale {md['scale']:g}; one transformer pass at batch 1 = "
            f"{md['pass_gflop']:.2f} GFLOP.",
            "",
        ]
        L += [f"- constant CFG (cfg): {md['schedules']['cfg']['describe']}"]
        for kind in (k for k in md["schedules"] if k != "cfg"):
            L += [
                f"- {kind}: {md['schedules'][kind]['describe']}",
                f"  (`{_schedule_str(md['schedules'][kind]['schedule'])}`)",
            ]
        if md.get("bundle_rel_error"):
            errs = ", ".join(f"{k} {v:.1e}" for k, v in md["bundle_rel_error"].items())
            L.append(
                "- bundles verified against the PyTorch sampler (max relative error of the final latents, "
                f"schedule@batch): {errs}"
            )
        if md.get("bundle_files_mb"):
            L.append("- bundle size: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in md["bundle_files_mb"].items()))
        for key in (k for k in ROWS if is_cache_dit(k)):
            cd, cfg = md["rows"].get(key, {}).get("cache_dit_stats"), md["rows"].get(key, {}).get("cache_dit_config")
            if cd is not None:
                L.append(
                    f"- {key} cached {cd.get('cached_steps', 0)} of {md['steps']} steps in the FLOP-counted batch-1 run "
                    f"(CFG-branch cached steps: {cd.get('cfg_cached_steps', 0)}; DBCache {cfg})"
                )
        for name, g in (md.get("precision_gates") or {}).items():
            L.append(f"- {name} (build record): {g['decision']}")
        la = md.get("loadavg", {})
        if la:
            L.append(f"- load average (1 min) at start / end of this model's timing: {la['start'][0]:.1f} / {la['end'][0]:.1f}")
        L.append("")
        L += _model_table(md, peak)
        L.append("")
        skipped = [(k, md["rows"][k]["skipped"]) for k in ROWS if md["rows"].get(k, {}).get("skipped")]
        if skipped:
            L += ["Not run:"] + [f"- **{k}**: {why}" for k, why in skipped] + [""]
        big = md["batches"][-1] if len(md["batches"]) > 1 else None
        if big:
            den = md.get("denoiser_ms", {})
            cells = [
                f"{eng} @{n}: {_ms(den[f'{eng}@{n}']['median'], 2)} ms"
                for eng in ("torch", "ort", "ort-int8-dynamic", "ort-int8")
                for n in (big, 2 * big)
                if f"{eng}@{n}" in den
            ]
            if cells:
                L += [f"Denoiser calls at batch {big}: " + "; ".join(cells) + ".", ""]

    # ---- overhead
    L += [
        "## ONNX Runtime runtime overhead",
        "",
        "The timed end-to-end calls above, split: `infer` timed whole, and inside it every `run_with_iobinding` of the "
        "denoiser session and of the step graphs (the bench wraps the runner's sessions; the library is unchanged; the "
        "wrapper's own ~1 µs per call counts as host time). Medians over the repetitions. *host* = infer − all session "
        "calls: the Python plan walk, I/O binding, input checks, numpy conversion. *outside denoiser* = host + step graphs.",
        "",
        "| model | row | batch | steps | infer ms | denoiser ms | step graphs ms | host ms | outside denoiser | host only |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for md in models.values():
        for key in [k for k in ROWS if ROW_ENGINE[k] == "ort"]:
            for b, o in (md.get("rows", {}).get(key, {}).get("overhead") or {}).items():
                L.append(
                    f"| {md['key']} | {key} | {b} | {o['steps']} | {_ms(o['infer_ms'], 2)} | {_ms(o['denoiser_ms'], 2)} | "
                    f"{_ms(o['step_graphs_ms'], 3)} | {_ms(o['host_ms'], 3)} | {_pct(o['outside_denoiser_fraction'], 2)} | "
                    f"{_pct(o['host_fraction'], 2)} |"
                )
    L.append("")

    # ---- quality
    ref = models.get("ref", {})
    if ref.get("quality"):
        q = ref["quality"]
        L += [
            "## Quality (reference model, held-out seeds)",
            "",
            f"{q['groups']} seed group(s) of {q['num']} images from seed {q['seeds'][0]} (`rstr.evaluate.HELD_OUT_SEEDS`), "
            f"labels `i % 10`; every row starts image i from the same noise. FD = Frechet distance in the digits "
            f"classifier's features against the real digits (lower is better); accuracy = the classifier's agreement with "
            f"the label.",
            "",
            "| row | FD per group | accuracy per group | seconds to generate + score |",
            "|---|---|---|---|",
        ]
        for key, r in q["rows"].items():
            L.append(
                f"| {key} | {' / '.join(f'{v:.3f}' for v in r['fd'])} | {' / '.join(f'{v:.3f}' for v in r['accuracy'])} | "
                f"{r['seconds']:.0f} |"
            )
        L.append("")

    # ---- method
    L += [
        "## How it is measured",
        "",
        "- **Rows.** " + "; ".join(f"`{k}`: {v}" for k, v in ROW_LABELS.items()) + ". All rows of a model use the same "
        "per-image noise (`rstr.evaluate.noise_for_seeds`, seeds 0..B-1; DiTPipeline gets one generator per image seeded "
        "the same way, since it draws its own noise), the same conditioning (`rstr.export.verify.example_inputs`: labels "
        "`i % classes`, or fixed random text embeddings with full masks) and the same nominal step count.",
        "- **Stock pipelines.** DiTPipeline always decodes through its VAE: it gets an identity VAE "
        "(`decode(z) = z`), so the time is the denoising loop plus a clamp. DiTPipeline hard-codes the null class as "
        "1000: for the reference model (null class 10) a forward pre-hook maps 1000 to 10 and changes nothing else. "
        'PixArt/FLUX/Qwen-Image pipelines run from embeddings (`output_type="latent"`, no text encoders, no VAE), '
        "`latents=` the shared noise. FLUX and Qwen-Image pipelines run true CFG as two batch-B transformer calls per step; "
        "DiT and PixArt run one 2B call. Scheduler: DDIM (DiT, PixArt) and flow-matching Euler (FLUX, Qwen-Image) for every "
        "row, since bundles bake an affine scheduler update.",
        "- **cache-dit** (`cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(...))`: its defaults -- 8 front "
        "compute blocks, 8 warm-up steps -- refuse models under 8 blocks and cached 0 of 20 steps on DiT-S/2, so each "
        "model gets a quarter of its blocks (1..8) computed in front, none behind, a fifth of the steps as warm-up, and "
        "the residual threshold swept over the `cache-dit@T` rows) runs on its own copy of the transformer, because it "
        "patches the module it is given. Its passes/image are counted FLOPs divided by one batch-1 pass (cached steps "
        "skip the non-computed blocks).",
        "- **diffusers-compile**: the stock pipeline with `torch.compile(transformer)` (inductor, default mode), "
        "compiled during its warm-up call, which is not timed; FLOPs are the diffusers row's (same arithmetic).",
        "- **Precision** (`rstr-export build --precision`, docs/bundle.md): fp32, int8-dynamic (ONNX Runtime dynamic "
        "quantization of the transformer blocks' Linear layers), int8 (static, calibrated Q/DQ), bf16 (casts, for GPU "
        "backends: ONNX Runtime CPU has no bf16 kernels). Each bundle's max relative error against the fp32 PyTorch "
        "sampler is in the table; on the reference model its held-out FD is measured like every row's.",
        "- **rstr schedule.** The reference model's searched schedule (or the hand-made stand-in named above); for the other "
        "models the same shape moved to their nominal step count (relative step positions kept with `rstr.search.remap`, "
        "compute fraction kept with `rstr.search.repair`). Their weights are random, so only speed is meaningful there.",
        "- **Bundles** are exported once at batch 1 by `rstr.export.build` (cached under `build/bench/`) and walked at the "
        "larger batch with the same graphs (batch-dynamic) and a re-planned manifest (only the batch fields change; checked "
        "equal to `build_plan`); every walk used is verified against the PyTorch sampler on the same noise.",
        "- **End to end** = one call that turns noise + conditioning into final latents/images: `pipe(...)`, "
        "`rstr.sampler.sample(...)` or `OnnxRuntimeRunner.infer(...)`, after one warm-up call per row; "
        "ms/image = call time / batch. Interleaved: repetition r runs every row once, the order rotated by r, with one "
        "garbage collection between repetitions and none inside.",
        "- **Denoiser ms @N**: one transformer call at N rows (N = B for an unguided step, 2B for a guided one): "
        "`family.denoise` in PyTorch eager (what every PyTorch row calls; the FLUX and Qwen-Image stock pipelines make two "
        "@B calls per guided step instead of one @2B), or the ONNX Runtime denoiser session bound the way the runner binds "
        "a step; interleaved, median of max(reps, 5).",
        "- **FLOPs**: `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention; the CPU flash-attention "
        "kernel counted with the SDPA formula) over one batch-1 pass, times the passes per image; PyTorch rows are also "
        "counted over a whole batch-1 generation (cache-dit always is). ONNX rows run the same arithmetic as the PyTorch "
        "sampler (verified), so they take its count. **% of fp32 peak** = GFLOP/image ÷ s/image ÷ peak.",
        "- **Peak RSS** = `VmHWM` (peak resident set in /proc/self/status) of a fresh process that runs only that row: "
        "load, one generation at batch 1, one at the larger batch. It includes the interpreter and imports. (Not "
        "`ru_maxrss`: Linux carries the parent's high-water mark into the child's across exec.) ONNX Runtime rows run "
        "without importing torch, as a deployment would; PyTorch rows import torch + diffusers; cache-dit runs on the "
        "model itself there, not on a copy.",
        "- **Speedup** = median time of the diffusers row / median time of the row, at the same batch.",
        "- **Caveats.** cache-dit decides per step whether to reuse cached block outputs from how much the first blocks' "
        "residual changed; on the random-weight models that test behaves unlike on trained ones, so its speed there says "
        "little about trained models, and only the reference model gives it an FD. DiT-XL/2 runs few steps at batch 1 only (a "
        "2-row pass takes seconds here) and has no bundle rows (see its notes). The load average per model is printed "
        "above: on a shared machine, interleaving spreads the noise over all rows rather than one row absorbing it.",
        "",
    ]
    return "\n".join(L)


def _outside(models: dict) -> list[float]:
    out = [0.0]
    for md in models.values():
        for key in [k for k in ROWS if ROW_ENGINE[k] == "ort"]:
            for o in (md.get("rows", {}).get(key, {}).get("overhead") or {}).values():
                out.append(o["outside_denoiser_fraction"])
    return out


def _schedule_str(d: dict) -> str:
    return " ".join(f"{s['scale']:g}" if s["guided"] else "·" for s in d["steps"])


def with_ladder(text: str, ladder: Path) -> str:
    """The report with the size ladder (``tools/size_ladder.py --markdown docs/bench/ladder.md``, its own run) before
    "How it is measured", when it has been run."""
    if not ladder.is_file():
        return text
    section = "## Size ladder: what a build costs (export memory)\n\n" + ladder.read_text().strip() + "\n\n"
    head, sep, tail = text.partition("## How it is measured")
    return head + section + sep + tail


def write_report(results: dict, out: Path) -> list[Path]:
    order = list(MODELS)
    results = dict(
        results,
        models=dict(sorted(results["models"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))),
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    directory = out.parent / "bench"
    rel = os.path.relpath(directory, out.parent)
    made = plots(results, directory, rel)
    json_path = directory / "results.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(json_path)
    text = with_ladder(markdown(results, made), directory / "ladder.md")
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return [out, json_path, *(directory / Path(p).name for p in made.values())]

"""`rstr-export`: build, inspect, verify and run deployment bundles.

`rstr-export build` with no arguments does the whole job on the reference model:
Stage-1 search, Stage-2 calibration, LoRA merge, ONNX export with a baked step plan,
engines for the best backend present, verification and a report.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from rstr._cli import run_app
from rstr._options import JsonOpt
from rstr.errors import RstrError

app = typer.Typer(
    name="rstr-export",
    rich_markup_mode="markdown",
    help=__doc__.split("\n\n")[0].split(": ", 1)[1],
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
BundleArg = Annotated[Path, typer.Argument(help="Bundle directory written by `rstr-export build`.")]


@app.command()
def build(
    model: Annotated[
        Path | None,
        typer.Option(
            help="Local diffusers directory or a reference model name (digits-dit, ...). Default: the reference digits DiT."
        ),
    ] = None,
    schedule: Annotated[
        Path | None, typer.Option(help="Schedule JSON from `rstr search`; skips Stage-1 (and Stage-2 unless --adapter).")
    ] = None,
    adapter: Annotated[Path | None, typer.Option(help="Adapter directory from `rstr calibrate`; skips Stage-2.")] = None,
    teacher: Annotated[
        Path | None,
        typer.Option(
            help="Schedule JSON Stage-2 calibrates toward (default: constant CFG at full steps). Where the searched "
            "schedule already beats constant CFG, Stage-2 is skipped unless a better teacher is given here, e.g. a "
            "`rstr search` result at a larger --budget."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Bundle directory to write (refused if it exists, unless --force).")] = Path(
        "rstr-bundle"
    ),
    backend: Annotated[
        str, typer.Option(help="auto (TensorRT when usable, else ONNX Runtime) | tensorrt | onnxruntime.")
    ] = "auto",
    dtype: Annotated[str, typer.Option(help="Precision inside the denoiser graph: fp32 | fp16 | bf16.")] = "fp32",
    precision: Annotated[
        str,
        typer.Option(
            help="The denoiser's transformer-block layers after export: auto (try int8-dynamic on ONNX Runtime CPU, bf16 "
            "where TensorRT engines are built; keep it only if the precision gate finds it no worse and faster) | fp32 | "
            "bf16 (GPU backends) | int8 (static, calibrated; ONNX Runtime CPU and TensorRT) | int8-dynamic (ONNX Runtime). "
            "An explicit value ships whatever the gate finds, and the report says what it cost."
        ),
    ] = "auto",
    device: Annotated[
        str,
        typer.Option(
            help="cpu | cuda | cuda:N: where the PyTorch stages run (search, calibration, gates, quality); merge, export and verification run on the CPU."
        ),
    ] = "cpu",
    batch: Annotated[int, typer.Option(help="Images per call (B); guided steps run 2B rows, unguided B.")] = 1,
    height: Annotated[
        int | None,
        typer.Option(
            help="Image height in pixels, with --width (equal: square images). Default: the model's (FLUX and Qwen-Image: "
            "rstr.json latent_size x 8). A multiple of the VAE factor times the latent patch (16 for FLUX and Qwen-Image); "
            "DiT and PixArt-alpha transformers make their own size only."
        ),
    ] = None,
    width: Annotated[int | None, typer.Option(help="Image width in pixels; see --height.")] = None,
    max_text_len: Annotated[
        int | None,
        typer.Option(
            help="Prompt tokens of text models (T5's sequence length; prompts are padded and truncated to it). "
            "Default: the model's (rstr.json text_len, else PixArt-alpha 120, FLUX and Qwen-Image 16)."
        ),
    ] = None,
    preset: Annotated[
        str,
        typer.Option(
            help="Stage-1/Stage-2 effort when they run: fast (the default build, minutes on a CPU) | full (the searches the docs quote; use a GPU)."
        ),
    ] = "fast",
    budget: Annotated[float, typer.Option(help="Stage-1 compute budget, fraction of constant CFG at full steps.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the stages (search and calibration draws).")] = 0,
    force: Annotated[bool, typer.Option(help="Replace an existing --out (only once the new bundle is complete).")] = False,
    measure: Annotated[
        bool, typer.Option(help="Measure quality against the stock model (held-out seeds) and speed for the report.")
    ] = True,
    require_better: Annotated[
        bool,
        typer.Option(
            help="Exit 1 (writing nothing) unless the bundle beats the stock model's constant CFG on every held-out group; for CI."
        ),
    ] = False,
    threads: Annotated[int | None, typer.Option(help="Torch threads (default: the cores not busy with other work).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show every step's detail and third-party messages.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="Print only the final table.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Build a verified bundle. With no arguments: the whole job on the reference model.

    Stage-1 searches a schedule within --budget; a schedule gate checks it against the stock model's
    constant CFG on gate seeds (falling back to the search's best baselines if it loses); Stage-2
    calibrates a LoRA only where that can help (adapter gate); then export, reduced precision where
    the precision gate keeps it (--precision), verification against PyTorch, and a report comparing
    the bundle with the stock model on held-out seeds (paired per group) and its speed.

    Examples:

    * `rstr-export build`: the whole job on the reference model
    * `rstr-export build --model digits-flux --out flux-bundle`: another model
    * `rstr-export build --schedule s.json --adapter calib/ --out b/`: your own Stage-1/Stage-2 results
    * `rstr-export build --budget 0.3 --teacher budget-50/schedule.json`: calibrate toward a better teacher
    * `rstr-export build --require-better --quiet`: for CI, exit 1 unless the bundle beats the stock model
    """
    from rstr._cli import set_threads, setup_output
    from rstr._options import check_device

    setup_output(verbose=verbose, quiet=quiet or json_out)
    check_device(device)
    if backend not in ("auto", "tensorrt", "onnxruntime"):
        raise RstrError(f"--backend {backend!r} is not one of auto, tensorrt, onnxruntime")
    if preset not in ("fast", "full"):
        raise RstrError(f"--preset {preset!r} is not one of fast, full")
    from rstr.export.build import BuildOptions
    from rstr.export.build import build as run_build

    set_threads(threads)
    result = run_build(
        BuildOptions(
            model,
            schedule,
            adapter,
            out,
            backend,
            dtype,
            batch,
            force,
            preset,
            budget,
            seed,
            measure,
            require_better,
            precision=precision,
            device=device,
            height=height,
            width=width,
            max_text_len=max_text_len,
            teacher=teacher,
        )
    )
    s = result.summary
    if json_out:
        print(json.dumps({"out": str(result.out), **s}))
        return
    table = Table(title=f"bundle {result.out}")
    table.add_column("measure")
    table.add_column("value")
    table.add_row("schedule", s["schedule"])
    table.add_row("compute saved vs constant CFG", f"{s['compute_saved']:.0%}")
    table.add_row("bundle vs PyTorch (max rel. error)", f"{s['max_rel_error']:.1e}")
    table.add_row("precision", result.manifest.precision)
    for gate in s["gates"].values():
        table.add_row(f"{gate['name']} gate", gate["decision"])
    q = s.get("quality")
    if q:
        fmt = lambda xs: " / ".join(f"{x:.3f}" for x in xs)  # noqa: E731
        table.add_row(
            "held-out FD per group: rstr vs stock constant CFG", f"{fmt(q['candidate']['fd'])} vs {fmt(q['baseline']['fd'])}"
        )
        table.add_row("paired difference per group", f"{fmt(q['differences'])}: [bold]{q['verdict']}[/bold]")
        table.add_row(
            "accuracy: rstr / stock",
            f"{sum(q['candidate']['accuracy']) / q['groups']:.3f} / {sum(q['baseline']['accuracy']) / q['groups']:.3f}",
        )
    if s.get("speed"):
        sp = s["speed"]
        table.add_row(
            "speedup vs PyTorch constant CFG",
            f"{sp['speedup']:.2f}x (end to end, {sp['threads']} thread{'s' * (sp['threads'] != 1)}, this machine)",
        )
    console.print(table)
    console.print(f"report: {result.out / 'report.md'}")


@app.command()
def inspect(bundle: BundleArg, json_out: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False) -> None:
    """Show a bundle's step plan: timestep, guided or not, scale and batch of every step."""
    from rstr.engines.bundle import Bundle

    b = Bundle.open(bundle)
    plan = b.plan
    if json_out:
        print(json.dumps(plan.to_json(), indent=2))
        return
    table = Table(
        title=f"{bundle}: {b.family}, batch {plan.batch}, {plan.num_steps} steps, "
        f"{plan.passes_per_image} passes/image ({plan.compute_fraction:.0%} of constant CFG)"
    )
    for col in ("step", "timestep", "model t", "guided", "scale", "batch", "coef_sample", "coef_eps"):
        table.add_column(col, justify="right")
    for s in plan.steps:
        table.add_row(
            str(s.index),
            f"{s.timestep:.1f}",
            f"{s.model_timestep:.4g}",
            "yes" if s.guided else "no",
            "" if s.scale is None else f"{s.scale:.3f}",
            str(plan.rows(s.guided)),
            ", ".join(f"{c:.5f}" for c in (s.coef_sample, *s.past_sample)),  # [current, previous, ...] when multistep
            ", ".join(f"{c:.5f}" for c in (s.coef_eps, *s.past_eps)),
        )
    console.print(table)


@app.command()
def verify(
    bundle: BundleArg,
    seed: Annotated[int, typer.Option(help="Seed of the noise (rstr's seeded generator, as `rstr-export run --seed`).")] = 0,
    model: Annotated[
        Path | None,
        typer.Option(
            help="The model the bundle was built from. Default: the path the bundle records, used only when it exists "
            "and its files still hash to the recorded model_sha256."
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Run the bundle (ONNX Runtime, CPU) and the PyTorch sampler from the same noise and compare.

    The schedule and the merged adapter are the bundle's own copies (listed and hashed in its
    manifest; the adapter is checked against provenance.adapter_sha256); the model is --model or
    the recorded one when it still matches its recorded hash.
    """
    from rstr.engines.bundle import Bundle
    from rstr.export.verify import bundled_adapter, recorded_model
    from rstr.export.verify import verify as run_verify

    from rstr.families import load_model
    from rstr.schedule import GuidanceSchedule

    b = Bundle.open(bundle)
    schedule = GuidanceSchedule.load(b.member("schedule.json"))
    adapter = bundled_adapter(b)
    size = b.manifest.provenance.size  # the build's --height/--width/--max-text-len
    family = load_model(
        recorded_model(b, model), height=size.get("height"), width=size.get("width"), max_text_len=size.get("max_text_len")
    )
    if family.name != b.family:
        raise RstrError(
            f"--model is a {family.name} model but bundle {bundle} holds a {b.family} model; pass the model it was built from"
        )
    if adapter is not None:
        from rstr.calibrate import apply_adapter

        apply_adapter(family, adapter)
    result = run_verify(b, family, schedule, seed=seed)
    if json_out:
        print(json.dumps({"bundle": str(bundle), "seed": seed, "passed": result.passed, **result.to_json()}))
        return
    console.print(
        f"[green]verified[/green]: max relative error {result.max_rel_error:.2e} <= {result.tolerance:.0e} "
        f"over {len(result.per_step)} steps ({result.backend})"
    )


@app.command()
def run(
    bundle: BundleArg,
    classes: Annotated[
        str,
        typer.Option(
            "--class", help="Class label(s), comma-separated, one per batch row (DiT bundles and bundles with a class table)."
        ),
    ] = "0",
    cond: Annotated[Path | None, typer.Option(help=".npz of conditioning arrays (and uncond_<name> for negatives).")] = None,
    seed: Annotated[
        int,
        typer.Option(
            help="Seed of the noise: rstr's seeded generator, as rstr-run and `rstr sample` (docs/seeding.md); ignored with --noise."
        ),
    ] = 0,
    noise: Annotated[Path | None, typer.Option(help=".npy noise of the bundle's sample shape.")] = None,
    backend: Annotated[str, typer.Option(help="auto | tensorrt | onnxruntime | onnxruntime-cpu | onnxruntime-cuda.")] = "auto",
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            help="Prompt (bundles with text encoders): once for every row, or once per batch row; replaces --class. "
            "Inputs no text encoder fills (FLUX's guidance) come in --cond."
        ),
    ] = None,
    negative_prompt: Annotated[
        str | None, typer.Option(help="Negative prompt of the guided steps (default: the bundle's, empty).")
    ] = None,
    out: Annotated[Path, typer.Option(help=".png (bundles with a decoder: pixels or a VAE graph) or .npy latents.")] = Path(
        "out.png"
    ),
    trust_engine_host_code: Annotated[
        bool,
        typer.Option(
            "--trust-engine-host-code",
            help="Let version-compatible TensorRT engines run the host code they embed (TensorRT's lean runtime) when "
            "they load. Only for bundles whose author you trust as you would trust a program from them.",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Generate with a bundle and save the image grid or the latents."""
    from rstr.engines.pipeline import Pipeline

    from rstr._io import atomic_path

    if out.suffix not in (".png", ".npy"):
        raise RstrError(f"--out {out}: use a .npy (latents) or .png (image) file name")
    with Pipeline.load(bundle, backend=backend, trust_engine_host_code=trust_engine_host_code) as pipe:
        decoder = pipe.bundle.decoder
        if out.suffix == ".png" and (decoder is None or decoder.kind not in ("pixels", "vae")):
            raise RstrError(f"--out {out}: this bundle returns latents, not images; use a .npy file name")
        conditioning: dict = {}
        uncond = None
        if cond is not None:  # with --prompt: the inputs no text encoder fills (FLUX's guidance)
            arrays = _load_arrays(cond, "--cond")
            conditioning = {k: v for k, v in arrays.items() if not k.startswith("uncond_")}
            uncond = {k.removeprefix("uncond_"): v for k, v in arrays.items() if k.startswith("uncond_")} or None
        elif not prompt:
            try:
                conditioning = {"class_labels": np.array([int(c) for c in classes.split(",")], np.int64)}
            except (ValueError, OverflowError):
                raise RstrError(f"--class {classes!r} must be comma-separated integers") from None
        if negative_prompt is not None and not prompt:
            raise RstrError("--negative-prompt needs --prompt")
        noise_arr = None if noise is None else _load_arrays(noise, "--noise")
        texts = None if not prompt else prompt[0] if len(prompt) == 1 else prompt
        result = pipe(
            conditioning,
            prompt=texts,
            negative_prompt=negative_prompt,
            uncond=uncond,
            seed=None if noise_arr is not None else seed,
            noise=noise_arr,
        )
        with atomic_path(out) as tmp:
            if out.suffix == ".npy":
                with open(tmp, "wb") as fh:
                    np.save(fh, result.latents)
            else:
                assert result.images is not None  # a decoder was checked above
                _write_png(tmp, result.images)
    if json_out:
        noise_from = {"seed": seed} if noise is None else {"noise": str(noise)}
        print(json.dumps({"out": str(out), "backend": pipe.backend, "shape": list(result.latents.shape), **noise_from}))
        return
    console.print(f"wrote {out} ({pipe.backend})")


def _load_arrays(path: Path, flag: str):
    """``--noise`` (a .npy array) or ``--cond`` (a .npz of named arrays), read without pickle; one error line otherwise."""
    want = ".npz archive of named arrays" if flag == "--cond" else ".npy array"
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                loaded = {k: loaded[k] for k in loaded.files}
    except OSError as err:
        raise RstrError(f"{flag} {path}: cannot read it ({err.strerror or err})") from None
    except (ValueError, EOFError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RstrError(f"{flag} {path} is not a {want} numpy can read without pickle ({first}); save it with numpy") from None
    if isinstance(loaded, dict) != (flag == "--cond"):
        raise RstrError(f"{flag} {path}: give a {want}")
    return loaded


def _write_png(path: Path, images: np.ndarray) -> None:
    """Write ``[B, H, W, C]`` images in [0, 1] side by side as one 8-bit PNG (grey for C = 1).

    Pillow, not matplotlib: ``rstr-export run`` is part of the runtime install, which has no plotting stack.
    """
    from PIL import Image

    row = np.round(np.concatenate(list(images), axis=1) * 255).astype(np.uint8)
    Image.fromarray(row[..., 0] if row.shape[-1] == 1 else row).save(path, format="PNG")


def main() -> None:
    run_app(app, "rstr-export")


if __name__ == "__main__":
    main()

"""What every rstr command line shares: one-line user errors, quiet terminals, thread defaults.

* A :class:`RstrError` prints ``prog: error: message`` and exits 1; anything else is a bug
  and keeps its traceback.  A runtime-only install (``pip install 'rstr[runtime,cpu]'``) has
  the command lines but not the training stack; a command that needs it says which extra to
  install instead of showing an import traceback.
* Library code logs to ``logging.getLogger("rstr")``; :func:`setup_output` shows those lines
  (``--quiet``: warnings only) and keeps third-party chatter (deprecation notes, exporter and
  polygraphy logs) off the terminal unless ``--verbose``.
* :func:`set_threads` gives torch the cores that are free: torch's default (every core)
  oversubscribes a machine whose other cores are busy, and its threads spin
  (docs/search/README.md, "Time").
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import typer

from rstr.errors import RstrError

_NOISY_LOGGERS = ("diffusers", "transformers", "torch", "onnx", "onnxscript", "onnx_ir", "polygraphy", "ray", "matplotlib", "PIL")
# Top-level modules of the `toolchain` extra in pyproject.toml (tests/test_runtime_install.py checks the two agree).
TOOLCHAIN_MODULES = frozenset(
    {
        "torch",
        "diffusers",
        "peft",
        "huggingface_hub",
        "safetensors",
        "sklearn",
        "scipy",
        "matplotlib",
        "tqdm",
        "onnx",
        "onnxscript",
        "onnx_graphsurgeon",
        "polygraphy",
        "transformers",
    }
)


def run_app(app: typer.Typer, prog: str) -> None:
    """Run a typer app; :class:`RstrError` prints ``prog: error: message`` and exits 1."""
    try:
        result = app(standalone_mode=False, prog_name=prog)
    except RstrError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(1)
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] not in TOOLCHAIN_MODULES:
            raise
        command = " ".join([prog, *sys.argv[1:2]])
        print(
            f"{prog}: error: `{command}` needs the toolchain ({err.name} is not installed): pip install 'rstr[toolchain,cpu]'",
            file=sys.stderr,
        )
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        # Usage errors (unknown option, bad value) come from typer's click with show()/exit_code.
        if hasattr(err, "show") and hasattr(err, "exit_code"):
            err.show()
            sys.exit(err.exit_code)
        raise
    sys.exit(result if isinstance(result, int) else 0)


def setup_output(verbose: bool = False, quiet: bool = False) -> None:
    """Route rstr's log lines to stderr through rich and silence third-party noise (unless ``verbose``)."""
    from rich.logging import RichHandler

    from rstr._progress import console

    if verbose and quiet:
        raise RstrError("--verbose and --quiet contradict each other; give one")
    log = logging.getLogger("rstr")
    log.handlers[:] = [
        RichHandler(console=console(), show_time=False, show_path=False, show_level=verbose, markup=True, rich_tracebacks=False)
    ]
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    if verbose:
        return
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings(
        "ignore", category=UserWarning, module=r"(torch|torchvision|diffusers|onnx|onnxscript|polygraphy|peft)"
    )
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def set_threads(threads: int | None = None) -> int:
    """Give torch ``threads`` threads, by default the cores not busy with other work (at least one)."""
    import torch

    if threads is not None and threads < 1:
        raise RstrError(f"--threads {threads} must be at least 1")
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        busy = int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0
        threads = max(1, cores - busy)
    torch.set_num_threads(threads)
    return threads

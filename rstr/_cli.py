"""What every rstr command line shares: user errors become one line and exit code 1.

A runtime-only install (``pip install 'rstr[runtime,cpu]'``) has the command lines but not the
training stack; a command that needs it (``rstr ...``, ``rstr-export build`` / ``verify``) says
which extra to install instead of showing an import traceback.
"""

from __future__ import annotations

import sys

import typer

from rstr.errors import RstrError

# Top-level modules of the `toolchain` extra in pyproject.toml (tests/test_runtime_install.py checks the two agree).
TOOLCHAIN_MODULES = frozenset({"torch", "diffusers", "peft", "safetensors", "sklearn", "scipy", "matplotlib", "tqdm", "onnx",
                               "onnxscript", "onnx_graphsurgeon", "polygraphy"})


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
        print(f"{prog}: error: `{command}` needs the toolchain ({err.name} is not installed): "
              "pip install 'rstr[toolchain,cpu]'", file=sys.stderr)
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

"""What every rstr command line shares: user errors become one line and exit code 1."""

from __future__ import annotations

import sys

import typer

from rstr.errors import RstrError


def run_app(app: typer.Typer, prog: str) -> None:
    """Run a typer app; :class:`RstrError` prints ``prog: error: message`` and exits 1."""
    try:
        result = app(standalone_mode=False, prog_name=prog)
    except RstrError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
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

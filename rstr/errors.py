"""One exception root for everything a user can fix.

The CLIs catch :class:`RstrError`, print its one-line message and exit 1 without a
traceback; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

# Characters that would break a message into lines (str.splitlines splits on all of them).
_LINE_BREAKING = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")


def one_line(text: str) -> str:
    """``text`` with every line-breaking or control character escaped (``\\x0a``, ``\\u2028``), as the C++ runtime does."""
    return _LINE_BREAKING.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x80 else f"\\u{ord(m[0]):04x}", text)


class RstrError(Exception):
    """A problem the user can fix: bad input, a missing file, an unsupported model.

    Its message is one line: control characters that user input brought into it are escaped.
    """

    def __str__(self) -> str:
        return one_line(super().__str__())


class ScheduleError(RstrError):
    """A guidance schedule that is malformed or does not fit the model."""


class ModelError(RstrError):
    """A model path that is missing or not a supported diffusers model."""


class BundleError(RstrError):
    """A deployment bundle that is missing, corrupt or incompatible."""


class BackendUnavailable(RstrError):
    """A requested runtime backend (TensorRT, CUDA) is not usable on this machine."""

"""One exception root for everything a user can fix.

The CLIs catch :class:`RstrError`, print its one-line message and exit 1 without a
traceback; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class RstrError(Exception):
    """A problem the user can fix: bad input, a missing file, an unsupported model."""


class ScheduleError(RstrError):
    """A guidance schedule that is malformed or does not fit the model."""


class ModelError(RstrError):
    """A model path that is missing or not a supported diffusers model."""


class BundleError(RstrError):
    """A deployment bundle that is missing, corrupt or incompatible."""


class BackendUnavailable(RstrError):
    """A requested runtime backend (TensorRT, CUDA) is not usable on this machine."""

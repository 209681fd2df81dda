"""Shared fixtures and environment-driven skips (markers: slow, gpu, tensorrt, cpp, ray)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def pytest_collection_modifyitems(config, items):
    skips = {
        "gpu": (not torch.cuda.is_available(), "no CUDA GPU on this machine"),
        "tensorrt": (not _has("tensorrt"), "TensorRT is not installed (it comes from NVIDIA's package index)"),
        "ray": (not _has("ray"), "ray is not installed (pip install 'rstr[ray]')"),
    }
    for item in items:
        for marker, (skip, reason) in skips.items():
            if skip and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))

"""The numbers ``tools/bench.py``'s report reads off its results: speedups, errors, peak fractions, cell formats.

Shared by the markdown of ``bench_report.py`` and the plots of ``bench_plots.py``.
"""

from __future__ import annotations

import math

from bench_setup import ROW_ENGINE, ROW_PRECISION, ROW_SCHEDULE, ROWS

TARGETS = {"ref": 8.0, "dit-s": 3.43}  # the best ort-rstr* row over diffusers, end to end at batch 1 (issue 19)
OVERHEAD_TARGET = 0.02


# ------------------------------------------------------------------------------ numbers
def e2e(row: dict, batch: int) -> dict | None:
    return (row.get("e2e") or {}).get(str(batch))


def speedup(model: dict, key: str, batch: int) -> float | None:
    base, row = e2e(model["rows"]["diffusers"], batch), e2e(model["rows"].get(key, {}), batch)
    if not base or not row:
        return None
    return base["median"] / row["median"]


def fraction_of_peak(row: dict, batch: int, peak_gflops: float) -> float | None:
    """Achieved GFLOP/s over ``peak_gflops`` (the model's own run's matmul peak when recorded)."""
    t = e2e(row, batch)
    if not t or "gflop_per_image" not in row:
        return None
    return row["gflop_per_image"] / t["median"] / peak_gflops


def _ms(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}" if x >= 1 else f"{x:.{max(digits, 2)}f}"


def _x(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def _pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def _spread_ms(t: dict | None) -> str:
    if not t:
        return "—"
    return f"{_ms(t['median'] * 1e3)} [{_ms(t['min'] * 1e3)}–{_ms(t['max'] * 1e3)}]"


def _ips(t: dict | None) -> str:
    if not t:
        return "—"
    return f"{1 / t['median']:.2f} [{1 / t['max']:.2f}–{1 / t['min']:.2f}]"


def step_ms(model: dict, key: str, n: int) -> float | None:
    """One denoiser call at ``n`` rows for this row's engine and precision (PyTorch eager rows: ``family.denoise``)."""
    if ROW_ENGINE[key] == "torch" and key in ("diffusers", "rstr-torch"):
        call = f"torch@{n}"
    elif ROW_ENGINE[key] == "ort":
        p = ROW_PRECISION[key]
        call = f"ort@{n}" if p == "fp32" else f"ort-{p}@{n}"
    else:
        return None
    d = model.get("denoiser_ms", {}).get(call)
    return None if d is None else d["median"]


def rel_error(model: dict, key: str) -> float | None:
    """The bundle row's verification error against the PyTorch sampler at batch 1."""
    if ROW_ENGINE[key] != "ort":
        return None
    return (model.get("bundle_rel_error") or {}).get(f"{ROW_SCHEDULE[key]}-{ROW_PRECISION[key]}@1")


def best_bundle(model: dict, batch: int = 1) -> tuple[str, float] | None:
    """The fastest ONNX Runtime row at the 50% schedule whose precision keeps quality, and its speedup over diffusers.

    Keeping quality: on a model with held-out FD, not worse than the fp32 bundle (``ort-rstr``) on
    every seed group (same noise, paired); elsewhere every bundle row qualifies, being verified
    against the PyTorch sampler to its precision's tolerance.
    """
    q = (model.get("quality") or {}).get("rows", {})
    fp32 = q.get("ort-rstr")

    def keeps_quality(key: str) -> bool:
        r = q.get(key)
        return fp32 is None or r is None or not all(a > b for a, b in zip(r["fd"], fp32["fd"]))

    found = [(k, speedup(model, k, batch)) for k in ROWS if ROW_ENGINE[k] == "ort" and ROW_SCHEDULE[k] == "rstr"]
    found = [(k, x) for k, x in found if x is not None and keeps_quality(k)]
    return max(found, key=lambda kx: kx[1]) if found else None

"""Build TensorRT engines from a bundle's ONNX graphs (polygraphy), for ``rstr-export build``.

.. warning::
   Written against the documented TensorRT 10/11 Python API and polygraphy 0.49+, **not
   executed where it was written** (no TensorRT there); tested only by the tests marked
   ``tensorrt`` and ``gpu``.

One engine per graph the plan uses, parsed from the bundle's ONNX with polygraphy's
``NetworkFromOnnxPath`` (strongly typed: precision lives in the ONNX, as TensorRT 11
requires), a timing cache file reused and extended across builds, the builder optimization
level and an optional workspace limit.  Engines go to ``engines/<graph>.plan``.

Profiles.  The denoiser gets **one fixed profile per batch the plan uses** (min = opt = max
= B for unguided steps, 2B for guided steps) rather than one [B, 2B] range with opt = 2B:
the bundle's batch is fixed at export, each CUDA graph needs a static shape anyway, a fixed
profile lets TensorRT pick tactics for exactly that shape (a range tuned at 2B runs B with
2B's tactics), and the weights are stored once per engine whatever the number of profiles.
The cost is one execution context per profile, whose activation memory the runner shares.
Step graphs have static shapes and one profile each.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rstr.engines.bundle import safe_member
from rstr.engines.manifest import Engine, Manifest
from rstr.engines.tensorrt.cuda import gpu, load_tensorrt
from rstr.engines.tensorrt.plan import ENGINE_DIR, graphs_needed, profiles_for, profiles_json

from rstr.errors import BackendUnavailable, RstrError


def _strongly_typed_kwargs(trt) -> dict:
    # TensorRT 10 needs the flag for precision to follow the ONNX; TensorRT 11 networks are
    # always strongly typed and accept (or no longer define) the flag.
    flags = getattr(trt, "NetworkDefinitionCreationFlag", None)
    return {"strongly_typed": True} if flags is not None and hasattr(flags, "STRONGLY_TYPED") else {}


def _precision_kwargs(precision: str, strongly_typed: bool) -> dict:
    """Builder flags for a reduced-precision bundle (rstr.export.precision; docs/bundle.md).

    A strongly typed network (TensorRT 10 with the flag, TensorRT 11 always) takes every type from
    the ONNX -- bf16 casts, int8 Q/DQ pairs -- and needs no flag.  A weakly typed one (an older
    TensorRT) must be allowed the bf16 tactics, and the int8 ones that explicit (Q/DQ)
    quantization uses.  Dynamic int8 (ONNX Runtime's MatMulInteger) has no TensorRT layer.
    """
    if precision == "int8-dynamic":
        raise BackendUnavailable(
            "TensorRT has no dynamic int8 ops (MatMulInteger); rebuild the bundle with --precision int8 (static, Q/DQ) or bf16"
        )
    if strongly_typed or precision == "fp32":
        return {}
    return {"bf16": True} if precision == "bf16" else {"int8": True}


def build_engines(
    bundle_root: Path,
    manifest: Manifest,
    *,
    timing_cache: Path | None = None,
    optimization_level: int = 3,
    workspace_bytes: int | None = None,
    version_compatible: bool = False,
    hardware_compatible: bool = False,
    device: int = 0,
) -> list[Engine]:
    """Build a TensorRT engine for each graph the plan uses; return their manifest entries.

    Engines are written to ``<bundle_root>/engines/<graph>.plan``; the caller adds each
    entry's ``file`` with its sha256 to the manifest's ``files`` and the entries to
    ``engines``.  ``timing_cache`` is read if present and extended after each build, so
    rebuilding (another schedule, the same model) skips tactic timing.  ``optimization_level``
    is TensorRT's builder optimization level (0..5, default 3); ``workspace_bytes`` caps the
    builder's workspace pool.  ``version_compatible`` builds engines later TensorRT releases
    can run (slower; they embed the lean runtime); ``hardware_compatible`` builds for any GPU
    of compute capability 8.0 or later (slower).

    Not executed where it was written (no TensorRT there).
    """
    if not 0 <= int(optimization_level) <= 5:
        raise RstrError(f"TensorRT optimization level {optimization_level} is out of range; use 0..5 (3 is TensorRT's default)")
    if workspace_bytes is not None and int(workspace_bytes) <= 0:
        raise RstrError(f"workspace_bytes {workspace_bytes} must be positive (or None for TensorRT's default)")
    trt = load_tensorrt()
    cuda, device_name, cc = gpu(device)
    cuda.set_device(device)
    try:
        from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
        from polygraphy.exception import PolygraphyException
    except ImportError:
        raise BackendUnavailable("polygraphy is not installed; pip install 'polygraphy>=0.49'") from None

    root = Path(bundle_root)
    batch = manifest.batch
    cache = str(timing_cache) if timing_cache is not None else None
    if timing_cache is not None:
        Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
    config_kwargs: dict[str, Any] = {"builder_optimization_level": int(optimization_level), "load_timing_cache": cache}
    if workspace_bytes is not None:
        config_kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(workspace_bytes)}
    if version_compatible:
        config_kwargs["version_compatible"] = True
    if hardware_compatible:
        config_kwargs["hardware_compatibility_level"] = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    typed = _strongly_typed_kwargs(trt)
    config_kwargs.update(_precision_kwargs(manifest.precision, bool(typed)))
    (root / ENGINE_DIR).mkdir(exist_ok=True)

    entries = []
    for graph in graphs_needed(manifest.plan):
        spec = manifest.graphs[graph]
        inputs = list(spec.inputs)
        rows = manifest.plan.denoiser_rows if graph == "denoiser" else [batch]
        profiles = profiles_for(inputs, batch, graph, rows=rows)
        trt_profiles = []
        for p in profiles:
            prof = Profile()
            for name, (lo, opt, hi) in p.items():
                prof.add(name, min=lo, opt=opt, max=hi)
            trt_profiles.append(prof)
        onnx_path = safe_member(root, spec.file)
        network = NetworkFromOnnxPath(str(onnx_path), **typed)
        config = CreateConfig(profiles=trt_profiles, **config_kwargs)
        try:
            plan = EngineBytesFromNetwork(network, config=config, save_timing_cache=cache)()
        except PolygraphyException as err:
            first = (str(err).strip().splitlines() or ["see the TensorRT log above"])[0]
            raise BackendUnavailable(f"TensorRT could not build the {graph} engine from {spec.file}: {first}") from None
        rel = f"{ENGINE_DIR}/{graph}.plan"
        dest = safe_member(root, rel)
        tmp = dest.with_suffix(".plan.tmp")
        with open(tmp, "wb") as fh:
            fh.write(memoryview(plan))  # IHostMemory supports the buffer protocol: no extra copy
        os.replace(tmp, dest)
        entries.append(
            Engine(
                graph=graph,
                file=rel,
                backend="tensorrt",
                tensorrt_version=trt.__version__,
                compute_capability=cc,
                device_name=device_name,
                version_compatible=bool(version_compatible),
                hardware_compatibility="ampere_plus" if hardware_compatible else "none",
                builder_optimization_level=int(optimization_level),
                profiles=tuple(profiles_json(profiles, rows)),
            )
        )
    return entries

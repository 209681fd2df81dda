"""rstr.engines: run a bundle with ONNX Runtime (CPU or CUDA) or TensorRT, from Python.

Nothing here imports torch or diffusers: a deployment needs numpy, the manifest and a
runtime.  Heavy backends are imported lazily inside their own modules.

    from rstr.engines import Pipeline
    pipe = Pipeline.load("bundle/")            # TensorRT when usable, else ONNX Runtime
    out = pipe({"class_labels": [3]}, seed=0)  # out.latents, out.images
"""

from rstr.engines.base import Runner
from rstr.engines.bundle import Bundle
from rstr.engines.pipeline import Pipeline, Result

__all__ = ["Bundle", "Pipeline", "Result", "Runner"]

"""TensorRT backend: build engines from a bundle's ONNX graphs, and walk the plan on them.

* :mod:`.plan` -- pure planning from the typed manifest: profiles, engine compatibility, the
  bindings of each step kind, step records and buffers (tested everywhere);
* :mod:`.cuda` -- TensorRT and the CUDA runtime calls (cuda-python), imported lazily;
* :mod:`.build` -- :func:`build_engines` (polygraphy), called by ``rstr-export build``;
* :mod:`.runner` -- :class:`TensorRTRunner`, the device-resident walk with CUDA graphs.

Importing this package imports neither TensorRT nor CUDA.  TensorRT cannot be installed on
the machines this was written on: ``build`` and ``runner`` follow the documented TensorRT
10/11, polygraphy and cuda-python APIs and are tested only where the tests marked
``tensorrt`` and ``gpu`` run.
"""

from rstr.engines.tensorrt.build import build_engines
from rstr.engines.tensorrt.runner import TensorRTRunner

__all__ = ["TensorRTRunner", "build_engines"]

"""rstr.export: from a model, a schedule and an adapter to one verified bundle.

The stages, in order, each in its own module:

* :mod:`rstr.export.plan`   -- the static step plan (timesteps, guidance, scheduler coefficients);
* :mod:`rstr.export.graphs` -- ONNX graphs: the denoiser (LoRA merged) and the two step graphs;
* :mod:`rstr.export.bundle` -- writing the bundle directory and its manifest, atomically;
* :mod:`rstr.export.verify` -- running the bundle against the PyTorch sampler;
* :mod:`rstr.export.build`  -- the whole job behind ``rstr-export build``.
"""

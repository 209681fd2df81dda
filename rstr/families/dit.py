"""DiT (Peebles & Xie): class-conditional, ``DiTTransformer2DModel``, driven by DDIM.

Null class = ``num_embeds_ada_norm`` (the label the model was trained to treat as "no
class"; 1000 for ImageNet DiT-XL/2).  With learned sigma the transformer outputs
``2C`` channels and guidance applies to the first ``C`` (eps) only, as in ``DiTPipeline``.
"""

from __future__ import annotations

import torch

from rstr.errors import RstrError
from rstr.families.base import Conditioning, SpatialFamily, TensorSpec


class DiTFamily(SpatialFamily):
    name = "dit"
    transformer_class = "DiTTransformer2DModel"
    pipeline_class = "DiTPipeline"
    default_steps_fallback = 50

    @property
    def num_classes(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    def cond_specs(self) -> list[TensorSpec]:
        return [TensorSpec("class_labels", torch.int64, ("batch",))]

    def labels(self, labels: list[int] | torch.Tensor) -> Conditioning:
        """Conditioning for a list of class labels, checked against ``num_classes``."""
        t = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        bad = [int(x) for x in t if not 0 <= int(x) < self.num_classes]
        if bad:
            raise RstrError(f"class label {bad[0]} is out of range; this model has classes 0..{self.num_classes - 1}")
        return {"class_labels": t.to(self.device)}

    def check_conditioning(self, cond: Conditioning, batch: int, what: str = "conditioning") -> Conditioning:
        out = super().check_conditioning(cond, batch, what)
        labels = out["class_labels"]
        if what == "conditioning" and ((labels < 0) | (labels >= self.num_classes)).any():
            bad = int(labels[(labels < 0) | (labels >= self.num_classes)][0])
            raise RstrError(f"class label {bad} is out of range; this model has classes 0..{self.num_classes - 1}")
        return out

    def unconditional(self, cond: Conditioning) -> Conditioning:
        return {"class_labels": torch.full_like(cond["class_labels"], self.num_classes)}

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.transformer(sample, timestep=timestep, class_labels=cond["class_labels"], return_dict=False)[0]

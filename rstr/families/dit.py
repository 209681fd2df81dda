"""DiT (Peebles & Xie): class-conditional, ``DiTTransformer2DModel``, driven by DDIM.

Null class = ``num_embeds_ada_norm`` (the label the model was trained to treat as "no
class"; 1000 for ImageNet DiT-XL/2).  With learned sigma the transformer outputs
``2C`` channels and guidance applies to the first ``C`` (eps) only, as in ``DiTPipeline``.
"""

from __future__ import annotations

import torch

from rstr.families.base import Conditioning, SpatialFamily, TensorSpec


class DiTFamily(SpatialFamily):
    name = "dit"
    transformer_class = "DiTTransformer2DModel"
    pipeline_classes = ("DiTPipeline",)
    conditioning = "class-labels"
    default_steps_fallback = 50
    default_scale_fallback = 4.0  # DiTPipeline's guidance_scale

    @property
    def num_classes(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    def cond_specs(self) -> list[TensorSpec]:
        return [TensorSpec("class_labels", torch.int64, ("batch",))]

    def labels(self, labels: list[int] | torch.Tensor) -> Conditioning:
        """Conditioning for a list of class labels, checked against ``num_classes``."""
        return {"class_labels": self._check_labels(labels).to(self.device)}

    def conditioning_for(self, labels: torch.Tensor) -> tuple[Conditioning, Conditioning | None]:
        return self.labels(labels), None

    def check_conditioning(self, cond: Conditioning, batch: int, what: str = "conditioning") -> Conditioning:
        out = super().check_conditioning(cond, batch, what)
        self._check_labels(out["class_labels"], allow_null=what != "conditioning")
        return out

    def unconditional(self, cond: Conditioning) -> Conditioning:
        return {"class_labels": torch.full_like(cond["class_labels"], self.num_classes)}

    def null_fill(self) -> dict[str, int | float]:
        return {"class_labels": self.num_classes}

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.transformer(sample, timestep=timestep, class_labels=cond["class_labels"], return_dict=False)[0]

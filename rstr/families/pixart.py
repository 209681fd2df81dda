"""PixArt-alpha: T5 prompt embeddings with an attention mask, ``PixArtTransformer2DModel``.

The unconditional input is the negative-prompt embedding (the pipeline encodes ``""``),
given by the user or by the pipeline's T5 encoder when the directory has one (a bundle then
takes prompts: the prompt is lower-cased and stripped, the stock pipeline's
``clean_caption=False``).  As in
``PixArtAlphaPipeline``, guidance is combined before learned sigma is dropped.  1024-px
checkpoints (``sample_size == 128``) take resolution and aspect-ratio conditioning, which is
constant for a fixed output size and therefore baked in rather than a graph input.
"""

from __future__ import annotations

import torch

from rstr.families.base import Conditioning, SpatialFamily, TensorSpec
from rstr.families.text import TextEncoderSpec


class PixArtFamily(SpatialFamily):
    name = "pixart"
    transformer_class = "PixArtTransformer2DModel"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    conditioning = "text-embeddings"
    default_steps_fallback = 20
    default_scale_fallback = 4.5  # PixArtAlphaPipeline's guidance_scale
    export_dynamo = False  # ONNX Runtime refuses the dynamo graph (a Squeeze shape-inference error)
    text_len = 120

    def __init__(self, *args, text_len: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.text_len = text_len or self.meta.get("text_len", self.text_len)

    def cond_specs(self) -> list[TensorSpec]:
        dim = int(self.transformer.config.caption_channels)
        return [
            TensorSpec("encoder_hidden_states", torch.float32, ("batch", self.text_len, dim)),
            TensorSpec("encoder_attention_mask", torch.float32, ("batch", self.text_len), example=1.0),
        ]

    def text_encoder_specs(self) -> list[TextEncoderSpec]:
        """T5 with its attention mask, on the lower-cased, stripped prompt (``clean_caption=False``)."""
        return [
            TextEncoderSpec(
                "text_encoder",
                "tokenizer",
                self.text_len,
                "last_hidden_state",
                "encoder_hidden_states",
                mask="encoder_attention_mask",
                preprocess="lower-strip",
            )
        ]

    def _added_cond(self, n: int) -> dict:
        if int(self.transformer.config.sample_size) != 128:
            return {"resolution": None, "aspect_ratio": None}
        px = 8 * int(self.transformer.config.sample_size)
        return {
            "resolution": torch.tensor([[px, px]], dtype=torch.float32, device=self.device).repeat(n, 1),
            "aspect_ratio": torch.tensor([[1.0]], dtype=torch.float32, device=self.device).repeat(n, 1),
        }

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.transformer(
            sample,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_attention_mask=cond["encoder_attention_mask"],
            timestep=timestep,
            added_cond_kwargs=self._added_cond(sample.shape[0]),
            return_dict=False,
        )[0]

"""Stage-2 targets: the ``nn.Linear`` layers inside a family's transformer blocks, with their layer kind."""

from __future__ import annotations

import re

from torch import nn

from rstr.calibrate.allocation import TargetModule
from rstr.errors import RstrError
from rstr.families.base import Family

# Layer kinds, first match wins (reported per kind; the allocation itself is per module).
_KINDS = (
    ("emb", r"(^|\.)(emb|timestep_embedder|time_text_embed|class_embedder)\."),
    ("adanorm", r"(^|\.)norm[^.]*\."),
    ("attn.q", r"(to_q|q_proj)$"),
    ("attn.k", r"(to_k|k_proj)$"),
    ("attn.v", r"(to_v|v_proj)$"),
    ("attn.out", r"(to_out|to_add_out|o_proj|out_proj)(\.\d+)?$"),
    ("ff", r"(^|\.)(ff|ff_context|mlp|proj_mlp)(\.|$)"),
)


def _module_kind(name: str) -> str:
    """The layer kind of a module name relative to its block (``attn.q``, ``ff``, ``adanorm``, ...)."""
    for kind, pattern in _KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def target_modules(family: Family) -> list[TargetModule]:
    """Every ``nn.Linear`` inside the family's transformer blocks, in depth order."""
    out = []
    for block_name, block in family.blocks():
        for sub, m in block.named_modules():
            if isinstance(m, nn.Linear):
                out.append(TargetModule(f"{block_name}.{sub}", block_name, _module_kind(sub), m.in_features, m.out_features))
    if not out:
        raise RstrError(f"the {family.name} transformer has no linear layers inside its blocks; nothing to calibrate")
    return out


def transformer_params(family: Family) -> int:
    return sum(p.numel() for p in family.transformer.parameters())

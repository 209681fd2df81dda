"""Helpers shared by the hardening tests (tests/test_hardening_bundles.py, tests/test_hardening_models_and_writes.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


def run_cli(main, argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """A command line's exit code and stderr, run in-process through its real entry point (``main``)."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


def zero_adapter(model: Path, out: Path) -> Path:
    """A peft LoRA adapter whose B matrices are zero (peft's initialisation): merging it changes nothing."""
    from peft import LoraConfig, get_peft_model

    from rstr.families import load_model

    family = load_model(model)
    get_peft_model(family.transformer, LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"])).save_pretrained(out)
    return out

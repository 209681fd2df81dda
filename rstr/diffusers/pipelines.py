"""Run a guidance schedule inside the classic diffusers pipelines, with no unconditional pass on unguided steps.

:func:`apply` changes a ``DiTPipeline``, ``PixArtAlphaPipeline``, ``FluxPipeline`` or
``QwenImagePipeline`` in place so that ``pipe(...)`` samples exactly as rstr's sampler
(:func:`rstr.sampler.sample`) does under the schedule; :func:`remove` (or leaving the ``with``
block) restores it.  Three changes, all undone by :func:`remove`:

1. **The call.**  The pipeline's class is swapped for a subclass of the same name whose
   ``__call__`` runs the schedule's step count, turns the pipeline's own CFG on at the fixed
   scale :data:`PIPELINE_SCALE` when the schedule has guided steps (off when it has none) and
   refuses arguments the schedule decides (the CFG scale, ``timesteps``, ``sigmas``).
2. **The transformer.**  A diffusers model hook (``diffusers.hooks``) knows the step.  On an
   unguided step it runs only the conditional rows (``B``, one pass) and hands the pipeline that
   prediction as both its conditional and unconditional one, so the pipeline's CFG arithmetic
   returns ``c``.  On a guided step at scale ``w`` it runs both and hands back
   ``u' = c + (w - 1) / (W - 1) * (u - c)`` for ``u``, so the pipeline's ``u' + W (c - u')``
   at ``W = PIPELINE_SCALE`` is ``u + w (c - u)``; family rules stay the pipeline's own (DiT and
   PixArt guide eps before dropping learned sigma, Qwen-Image rescales to the conditional norm,
   exactly as rstr's families do; the parity tests check it).  DiTPipeline's unconditional rows
   get the model's own null class instead of the hard-coded ImageNet 1000.
3. **The scheduler**, when the schedule carries its own timesteps (from Stage-1): the
   pipeline's scheduler pinned to them (:func:`pinned_scheduler`), since ``DiTPipeline`` cannot
   pass ``timesteps=`` and the flow-matching pipelines shift whatever sigmas they pass.  An adapter (``adapter=``) is attached as peft LoRA layers and unloaded
   again on :func:`remove`.

How each pipeline lays out CFG (which argument turns it on; whether conditional and
unconditional rows share one ``2B`` batch, in which order, or come as two named calls,
``cache_context("cond")`` / ``("uncond")``) is in :data:`LAYOUTS`, read from the pipelines'
code in diffusers 0.42.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager

from rstr.diffusers.guider import ScheduledGuidance
from rstr.errors import RstrError, ScheduleError
from rstr.families import Family, family_for_transformer
from rstr.families.ddim import DDIMAtTimesteps
from rstr.families.timesteps import FlowMatchAtTimesteps, at_timesteps
from rstr.schedule import GuidanceSchedule

PIPELINE_SCALE = 2.0  # the CFG scale the pipeline runs with; the hook turns it into each step's own
HOOK_NAME = "rstr_schedule"


@dataclass(frozen=True)
class CFGLayout:
    """How a classic pipeline runs classifier-free guidance."""

    scale_arg: str  # the call argument that turns the pipeline's CFG on (> 1)
    rows: Literal["cond_first", "uncond_first", "separate"]  # one 2B batch in this order, or two named calls
    own_null: bool = False  # the pipeline's unconditional rows are replaced by the family's own


LAYOUTS: dict[str, CFGLayout] = {
    "DiTPipeline": CFGLayout("guidance_scale", "cond_first", own_null=True),
    "PixArtAlphaPipeline": CFGLayout("guidance_scale", "uncond_first"),
    "FluxPipeline": CFGLayout("true_cfg_scale", "separate"),
    "QwenImagePipeline": CFGLayout("true_cfg_scale", "separate"),
}


class _Pinned:
    """``set_timesteps`` that sets the schedule's own timesteps, whatever step count, sigmas or timesteps a pipeline passes."""

    pinned: tuple[int, ...] = ()

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: object = None,
        mu: object = None,
        timesteps: object = None,
    ) -> None:
        super().set_timesteps(device=device, timesteps=self.pinned)  # type: ignore[misc]  # a mixin before the scheduler


class PinnedDDIM(_Pinned, DDIMAtTimesteps):  # type: ignore[misc]  # takes (and ignores) the sigmas DDIM lacks
    """DDIM pinned to a schedule's own timesteps (``DiTPipeline`` cannot pass ``timesteps=``)."""


class PinnedFlowMatch(_Pinned, FlowMatchAtTimesteps):
    """Flow-matching Euler pinned to a schedule's own timesteps (the pipelines shift any sigmas they pass)."""


def pinned_scheduler(scheduler: Any, schedule: GuidanceSchedule) -> Any:
    """A scheduler with ``scheduler``'s configuration that always runs ``schedule``'s own timesteps.

    For pipelines that cannot pass them: ``apply`` installs one, and a modular pipeline driven by
    :class:`ScheduledGuidance` takes one with ``pipe.update_components(scheduler=...)``.
    """
    if schedule.timesteps is None:
        raise ScheduleError("the schedule has no timesteps of its own; the pipeline's own scheduler runs it")
    own = at_timesteps(scheduler, schedule.timesteps)  # refuses a scheduler that cannot take them
    pinned = (PinnedDDIM if isinstance(own, DDIMAtTimesteps) else PinnedFlowMatch).from_config(own.config)
    pinned.pinned = schedule.timesteps
    return pinned


class _CallName(StateManager):
    """Receives the name a pipeline gives each transformer call (``cache_context("cond")``, ``("uncond")``)."""

    def __init__(self) -> None:
        super().__init__(BaseState)

    @property
    def name(self) -> str | None:
        return None if self._context is None else self._context.name


class ScheduleHook(ModelHook):
    """Runs the transformer as the schedule's step needs and shapes its outputs for the pipeline's CFG arithmetic."""

    _is_stateful = True  # so that the pipeline's cache_context names reach ``self.calls``

    def __init__(self, schedule: GuidanceSchedule, layout: CFGLayout, family: Family) -> None:
        super().__init__()
        self.schedule, self.layout, self.family = schedule, layout, family
        self.calls = _CallName()
        self.stop()

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        """diffusers' reset at the end of a pipeline call, which comes before :meth:`finish`: the call wrapper clears the state."""
        return module

    def start(self) -> None:
        """A pipeline call begins: count steps from the first (the hook is idle outside calls)."""
        self.stop()
        self.running = bool(self.schedule.num_guided)

    def finish(self) -> None:
        """A pipeline call ended normally: the last step had its unconditional call if it needed one."""
        self._check_uncond_seen()

    def stop(self) -> None:
        """Back to idle: the transformer runs as if unhooked until the next :meth:`start`."""
        self.running = False
        self.step = -1
        self.cond_output: Any = None
        self.uncond_seen = True

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self.running:
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.layout.rows == "separate":
            return self._named_call(args, kwargs)
        return self._paired_call(args, kwargs)

    # ------------------------------------------------------------------ steps
    def _next_step(self) -> int:
        self.step += 1
        if self.step >= self.schedule.num_steps:
            raise RuntimeError(f"the pipeline ran more than the schedule's {self.schedule.num_steps} steps")
        return self.step

    def _mixed_uncond(self, c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``u'`` such that the pipeline's ``u' + W (c - u')`` is ``u + w (c - u)`` for this step's ``w``."""
        k = (self.schedule.scale_at(self.step) - 1.0) / (PIPELINE_SCALE - 1.0)
        return (c.float() + k * (u.float() - c.float())).to(c.dtype)

    def _paired_call(self, args: tuple, kwargs: dict) -> Any:
        """DiT, PixArt-alpha: one call on ``2B`` rows, conditional and unconditional halves."""
        x = args[0] if args else kwargs["hidden_states"]
        n, b = x.shape[0], x.shape[0] // 2
        cond_first = self.layout.rows == "cond_first"
        cond_rows, uncond_rows = (slice(0, b), slice(b, n)) if cond_first else (slice(b, n), slice(0, b))
        i = self._next_step()
        if not self.schedule.guided[i]:
            out = self.fn_ref.original_forward(*_rows(args, n, cond_rows), **_rows(kwargs, n, cond_rows))
            return _map_prediction(out, lambda c: torch.cat([c, c]))
        if self.layout.own_null:
            names = [s.name for s in self.family.cond_specs()]
            null = self.family.unconditional({k: kwargs[k][cond_rows] for k in names})
            kwargs = {**kwargs, **{k: _replace_rows(kwargs[k], uncond_rows, null[k]) for k in names}}
        out = self.fn_ref.original_forward(*args, **kwargs)

        def mix(pred: torch.Tensor) -> torch.Tensor:
            c, u = pred[cond_rows], self._mixed_uncond(pred[cond_rows], pred[uncond_rows])
            return torch.cat([c, u] if cond_first else [u, c])

        return _map_prediction(out, mix)

    def _named_call(self, args: tuple, kwargs: dict) -> Any:
        """FLUX, Qwen-Image: a ``cond`` call, then (with true CFG) an ``uncond`` call, each on ``B`` rows."""
        name = self.calls.name
        if name == "cond":
            self._check_uncond_seen()
            self._next_step()
            self.uncond_seen = False
            self.cond_output = self.fn_ref.original_forward(*args, **kwargs)
            return self.cond_output
        if name != "uncond":
            raise RuntimeError(f"transformer call named {name!r}; the pipeline must name its calls 'cond' and 'uncond'")
        self.uncond_seen = True
        if not self.schedule.guided[self.step]:
            return self.cond_output  # no second pass: the pipeline's CFG of c with itself is c
        c = _prediction(self.cond_output)
        return _map_prediction(self.fn_ref.original_forward(*args, **kwargs), lambda u: self._mixed_uncond(c, u))

    def _check_uncond_seen(self) -> None:
        if self.running and not self.uncond_seen:
            raise RstrError(
                f"the schedule has guided steps but the pipeline made no unconditional pass at step {self.step}: give it a "
                "negative prompt (negative_prompt, or negative_prompt_embeds with their pooled embeddings or mask)"
            )


# --------------------------------------------------------------------- tensors
def _rows(value: Any, n: int, rows: slice) -> Any:
    """``value`` with every batch-first tensor of ``n`` rows cut to ``rows`` (through tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.ndim and value.shape[0] == n else value
    if isinstance(value, dict):
        return {k: _rows(v, n, rows) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, n, rows) for v in value)
    return value


def _replace_rows(t: torch.Tensor, rows: slice, new: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    out[rows] = new.to(out.device, out.dtype)
    return out


def _prediction(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def _map_prediction(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """The transformer output with its prediction replaced by ``fn(prediction)``, in the same form."""
    if isinstance(out, tuple):
        return (fn(out[0]), *out[1:])
    return dataclasses.replace(out, sample=fn(out.sample))


# ------------------------------------------------------------------ the pipeline
@dataclass
class Applied:
    """What :func:`apply` changed on a pipeline; a context manager whose exit calls :func:`remove`."""

    pipe: Any
    schedule: GuidanceSchedule
    layout: CFGLayout
    original_class: type
    hook: ScheduleHook
    scheduler: Any = None  # the pipeline's own scheduler, when a pinned one replaced it
    adapter: Any = None  # the peft model holding the adapter's LoRA layers

    def __enter__(self) -> Any:
        return self.pipe

    def __exit__(self, *exc: object) -> None:
        remove(self.pipe)

    def call_arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The user's call arguments, checked against the schedule, with the step count and CFG switch it decides."""
        sig = inspect.signature(self.original_class.__call__)
        try:
            bound = sig.bind(self.pipe, *args, **kwargs)
        except TypeError as err:
            raise RstrError(f"{self.original_class.__name__}: {err}") from None
        call: dict[str, Any] = {}
        for name, value in list(bound.arguments.items())[1:]:
            if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                call.update(value)
            else:
                call[name] = value
        n = self.schedule.num_steps
        if call.get("num_inference_steps", n) != n:
            raise ScheduleError(
                f"num_inference_steps {call['num_inference_steps']} differs from the schedule's {n} steps; drop it"
            )
        for decided in (self.layout.scale_arg, "timesteps", "sigmas"):
            if call.get(decided) is not None:
                raise RstrError(f"{decided}= is set by the rstr schedule applied to this pipeline (per step); drop it")
        call["num_inference_steps"] = n
        call[self.layout.scale_arg] = PIPELINE_SCALE if self.schedule.num_guided else 1.0
        return call


def _scheduled_call(self, *args: Any, **kwargs: Any) -> Any:
    """The pipeline's own ``__call__`` under the applied rstr schedule (see :mod:`rstr.diffusers.pipelines`)."""
    applied: Applied = self.__dict__["_rstr_applied"]
    call = applied.call_arguments(args, kwargs)
    applied.hook.start()
    try:
        result = applied.original_class.__call__(self, **call)
        applied.hook.finish()
    finally:
        applied.hook.stop()
    return result


@functools.cache
def _scheduled_class(cls: type) -> type:
    """A subclass of the pipeline class with the same name, whose ``__call__`` follows the applied schedule."""
    return type(cls.__name__, (cls,), {"__call__": _scheduled_call, "__module__": cls.__module__, "__doc__": cls.__doc__})


def apply(pipe: Any, schedule: GuidanceSchedule | ScheduledGuidance, adapter: str | os.PathLike[str] | None = None) -> Applied:
    """Make ``pipe(...)`` follow ``schedule``: per-step guidance and scale, the schedule's timesteps, one pass on unguided steps.

    ``pipe`` is a ``DiTPipeline``, ``PixArtAlphaPipeline``, ``FluxPipeline`` or ``QwenImagePipeline``;
    ``adapter`` an rstr Stage-2 adapter directory (``rstr calibrate --out``).  Call the pipeline as
    usual but without the CFG scale (``guidance_scale`` / ``true_cfg_scale``), ``timesteps`` or
    ``sigmas``, which the schedule decides; ``num_inference_steps`` may be left out.  Text
    pipelines need a negative prompt when the schedule has guided steps.  Returns a handle that
    undoes everything as a context manager: ``with rstr.diffusers.apply(pipe, s): pipe(...)``.
    """
    if isinstance(schedule, ScheduledGuidance):
        schedule = schedule.schedule
    name = type(pipe).__name__
    if "_rstr_applied" in pipe.__dict__:
        raise RstrError(f"this {name} already follows an rstr schedule; call rstr.diffusers.remove(pipe) first")
    if name not in LAYOUTS:
        raise RstrError(
            f"{name} is not supported; rstr.diffusers.apply runs {', '.join(LAYOUTS)} (modular pipelines: use ScheduledGuidance)"
        )
    family = family_for_transformer(pipe.transformer)(pipe.transformer, pipe.scheduler)
    schedule.check_fits(family.name, family.sampler)
    applied = Applied(pipe, schedule, LAYOUTS[name], type(pipe), ScheduleHook(schedule, LAYOUTS[name], family))
    pinned = None
    if schedule.timesteps is not None:
        pinned = pinned_scheduler(pipe.scheduler, schedule)
    if adapter is not None:  # the last check that can fail; nothing is changed before it
        from rstr.calibrate import load_adapter

        applied.adapter = load_adapter(family, adapter)  # LoRA layers injected into pipe.transformer in place
    if pinned is not None:
        applied.scheduler, pipe.scheduler = pipe.scheduler, pinned
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).register_hook(applied.hook, HOOK_NAME)
    pipe.__dict__["_rstr_applied"] = applied
    pipe.__class__ = _scheduled_class(type(pipe))  # type: ignore[arg-type]  # mypy: classes are Hashable
    return applied


def remove(pipe: Any) -> None:
    """Undo :func:`apply`: the pipeline's class, scheduler and transformer (adapter unloaded) as they were."""
    applied: Applied | None = pipe.__dict__.pop("_rstr_applied", None)
    if applied is None:
        raise RstrError(f"this {type(pipe).__name__} follows no rstr schedule; nothing to remove")
    pipe.__class__ = applied.original_class
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).remove_hook(HOOK_NAME, recurse=False)
    if applied.scheduler is not None:
        pipe.scheduler = applied.scheduler
    if applied.adapter is not None:
        applied.adapter.unload()

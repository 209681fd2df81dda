"""Evaluate many items in parallel: one interface, a local and a Ray backend.

A :class:`Task` says what each worker builds once (``setup``: load the model, prepare the
objective) and how it evaluates one item (``run``).  An :class:`Executor` ships the task to
its workers -- pickled *before* setup, so only its small description travels -- and maps
items over them, returning results in input order.  Swapping the backend never changes a
result: every item is evaluated by the same code on the same inputs.

* :class:`LocalExecutor` -- ``workers`` processes on this machine (``spawn`` context: no
  forked torch state), each with its own model; ``workers=1`` runs inline, in this process.
* :class:`RayExecutor` -- one Ray actor per worker, each holding its own model on its own
  device (a GPU when the cluster has them); ``ray`` is imported only here
  (``pip install 'rstr[ray]'``).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

from rstr.errors import RstrError

Item = TypeVar("Item")
Result = TypeVar("Result")


class Task(ABC, Generic[Item, Result]):
    """Work a worker sets up once and then runs on many items; must be picklable before ``setup``."""

    @abstractmethod
    def setup(self, device: str) -> None:
        """Build the worker's state (load the model onto ``device``)."""

    @abstractmethod
    def run(self, item: Item) -> Result:
        """Evaluate one item with the state built by :meth:`setup`."""


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Executor(ABC):
    """Maps a task over items; use as a context manager so workers are always shut down."""

    @abstractmethod
    def map(self, items: Sequence[Any]) -> Iterator[Any]:
        """Yield ``task.run(item)`` for each item, in input order, as results arrive."""

    def close(self) -> None:  # noqa: B027 -- optional hook: executors without workers have nothing to stop
        """Stop the workers (idempotent)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------- local
_WORKER_TASK: Task | None = None


def _init_worker(task: Task, device: str, threads: int) -> None:
    """Worker start: Ctrl-C is the parent's to handle; one model per worker, ``threads`` torch threads."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    task.setup(device)
    global _WORKER_TASK
    _WORKER_TASK = task


def _run_item(item: Any) -> Any:
    assert _WORKER_TASK is not None, "worker used before its task was set up"
    return _WORKER_TASK.run(item)


class LocalExecutor(Executor):
    """``workers`` processes on this machine, each holding its own model; ``workers=1`` runs inline.

    The workers share the threads torch would use here (``torch.get_num_threads()``, which
    ``OMP_NUM_THREADS`` sets): each gets an equal part, at least one, so they do not
    oversubscribe the cores.  ``setup`` runs in each worker when the pool starts (inline:
    here, once).
    """

    def __init__(self, task: Task, workers: int = 1, *, device: str = "cpu") -> None:
        cores = available_cores()
        if workers < 1:
            raise RstrError(f"workers {workers} must be at least 1")
        if workers > cores:
            raise RstrError(f"workers {workers} is more than the {cores} CPU cores here; use --workers {cores} or fewer")
        self.task, self.workers = task, workers
        self._pool = None
        if workers == 1:
            task.setup(device)
        else:
            import torch

            threads = max(1, torch.get_num_threads() // workers)
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(workers, initializer=_init_worker, initargs=(task, device, threads))

    def map(self, items: Sequence[Any]) -> Iterator[Any]:
        if self._pool is None:
            return (self.task.run(item) for item in items)
        return self._pool.imap(_run_item, items, chunksize=1)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


# --------------------------------------------------------------------------------- ray
def _actor_class():
    """The Ray actor class, defined on first use so that importing rstr never imports ray."""
    import ray

    @ray.remote
    class _Worker:
        def __init__(self, task: Task, threads: int) -> None:
            import torch

            torch.set_num_threads(threads)
            device = "cuda" if ray.get_gpu_ids() else "cpu"
            task.setup(device)
            self.task = task

        def run(self, item: Any) -> Any:
            return self.task.run(item)

    return _Worker


class RayExecutor(Executor):
    """One Ray actor per worker, each holding its own model on its own device.

    Connects to a running cluster (``RAY_ADDRESS``) or an already initialised local Ray,
    else starts a local instance (shut down again on :meth:`close`).  With GPUs in the
    cluster each actor reserves one and loads the model on it; otherwise actors use CPUs.
    """

    def __init__(self, task: Task, workers: int = 1, *, cpus_per_worker: int = 1) -> None:
        try:
            import ray
            from ray.util import ActorPool
        except ImportError:
            raise RstrError("the Ray executor needs ray; install it with `pip install 'rstr[ray]'`") from None
        if workers < 1:
            raise RstrError(f"workers {workers} must be at least 1")
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(log_to_driver=False)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= workers else 0
        actor = _actor_class().options(num_cpus=cpus_per_worker, num_gpus=gpus)
        self._actors = [actor.remote(task, cpus_per_worker) for _ in range(workers)]
        self._pool = ActorPool(self._actors)

    def map(self, items: Sequence[Any]) -> Iterator[Any]:
        return self._pool.map(lambda actor, item: actor.run.remote(item), list(items))

    def close(self) -> None:
        import ray

        for a in getattr(self, "_actors", []):
            ray.kill(a)
        self._actors = []
        if getattr(self, "_owns_ray", False) and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False


def make_executor(task: Task, workers: int = 1, backend: str = "local", device: str = "cpu") -> Executor:
    """The executor for ``backend`` (``local`` or ``ray``) with ``workers`` workers; local ones on ``device``."""
    if backend == "local":
        return LocalExecutor(task, workers, device=device)
    if backend == "ray":
        return RayExecutor(task, workers)
    raise RstrError(f"executor backend {backend!r} is unknown; use 'local' or 'ray'")

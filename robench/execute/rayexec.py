"""The Ray executor: one Ray task per model group, on any machine of a Ray cluster.

Ray schedules the tasks, requests their resources, retries the ones whose worker died and
streams each task's events back as they happen (a generator task); robench adds only
what Ray does not know:

* A task rebuilds the session from its picklable :class:`~robench.execute.session.Recipe`
  (the driver's registries, benchmark, folders and provenance) and runs
  :meth:`Session.work <robench.execute.session.Session.work>` on its group: the model is
  built once and attacked in the same task. It calls no plugin hook and writes no result;
  the driver calls the hooks and writes one atomic parquet file per cell, as locally.
* Models and transfer or corruption sets go to the shared cache folder under cache locks
  (:mod:`robench.execute.locks`): a task that needs a set (or a surrogate) another task is
  producing waits for it, then reads it. The cache folder must therefore be one folder for
  every task: this machine's, or a shared filesystem on a cluster. The run folder need only
  be the driver's.
* A task uses as many torch threads as it requests CPUs (``cpus_per_task``, by default the
  driver's own thread count), and the device its GPUs give it, so that its numbers are the
  local executor's.
* A task whose worker died ``max_retries + 1`` times, or any other Ray failure, leaves its
  unfinished cells as ``error`` rows; Ctrl-C cancels the running tasks and a rerun resumes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from robench.execute.events import Event, Group, Recipe, Worker
from robench.plan.execution import Execution
from robench.results.storage import CellResult


class RayExecutor:
    """Runs each model group as one Ray task (see the module docstring)."""

    name = "ray"

    def __init__(self, execution: Execution) -> None:
        self.execution = execution

    def map(self, session: Worker, groups: Sequence[Group]) -> Iterator[Event]:
        """Submit every group at once; yield the events of all tasks as they arrive."""
        import ray

        started_here = not ray.is_initialized()
        if started_here:
            address = self.execution.address or None
            session.progress.log(f"ray: {'joining ' + address if address else 'starting a local cluster'}")
            ray.init(address=address, include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
        device, gpus = _device_and_gpus(session.device, self.execution.gpus_per_task)
        threads = self.execution.cpus_per_task or torch.get_num_threads()
        task = ray.remote(_run_group).options(
            num_cpus=threads,
            num_gpus=gpus,
            max_retries=self.execution.max_retries,
            retry_exceptions=False,  # plugin exceptions are error rows already; only dead workers retry
        )
        recipe = ray.put(session.recipe())
        streams = {task.remote(recipe, group, device, threads): group for group in groups}
        session.progress.log(
            f"ray: {len(streams)} task(s), each {threads} CPU(s)" + (f" and {gpus:g} GPU(s)" if gpus else "")
        )
        try:
            yield from _events(session, streams)
        finally:  # Ctrl-C, or a consumer that stopped: no task may go on writing to the cache
            for stream in streams:
                ray.cancel(stream, force=True)
            if started_here:
                ray.shutdown()


def _events(session: Worker, streams: dict[Any, Group]) -> Iterator[Event]:
    """Every task's events, as each arrives; a failed task's unfinished cells as error rows."""
    import ray

    finished: set[str] = set()
    while streams:
        ready: list[Any] = ray.wait(list(streams), num_returns=1)[0]  # generators with an event waiting
        for stream in ready:
            group = streams[stream]
            try:
                event = ray.get(next(stream))
            except StopIteration:
                del streams[stream]
                continue
            except ray.exceptions.RayError as exc:  # retries spent (worker killed, node lost) or cancelled
                del streams[stream]
                for cell in group.cells:
                    if cell.key not in finished:
                        yield session.error(cell, "ray task", exc)
                continue
            if isinstance(event, CellResult):
                finished.add(event.row["cell_key"])
            yield event


def _device_and_gpus(driver: torch.device, gpus_per_task: float) -> tuple[str, float]:
    """The tasks' device and GPUs: CUDA when they request GPUs, or when the driver's device
    is CUDA (then one GPU each unless told otherwise)."""
    if gpus_per_task > 0:
        return "cuda", gpus_per_task
    if driver.type == "cuda":
        return "cuda", 1.0
    return "cpu", 0.0


def _run_group(recipe: Recipe, group: Group, device: str, threads: int) -> Iterator[Event]:
    """The Ray task: rebuild the session in this worker and stream the group's events."""
    from robench.execute.progress import TqdmProgress

    torch.set_num_threads(threads)
    # Ray sets CUDA_VISIBLE_DEVICES to the task's GPUs: "cuda" is the first of them
    session = recipe.open(torch.device(device), TqdmProgress(bars=False))
    yield from session.work(group)

"""The Ray executor: builds, shared sets and shards as a Ray task graph, on any machine of a cluster.

Ray schedules the tasks, requests their resources, passes results between them, retries the
ones whose worker died, and starts a task only when the tasks it depends on have finished
(their results are its arguments). robench adds only what Ray does not know:

* **The graph** (:mod:`robench.execute.taskgraph`): one task per model build (a target
  build also runs its cells' model checks and returns them); one task per shared set (a
  transfer set against its surrogates, whose build tasks it depends on, or a corruption
  set); one task per shard of a cell, depending on its build and on the sets it reads. A
  build that loads another defense's model (advft's start model, ProARD's teacher) depends
  on that build's task. So no task waits on a lock while it holds CPUs or a GPU: when it
  starts, what it needs is in the shared cache. The shard tasks of a cell are submitted
  when its build task returns (its checks may add masking versions, whose sets are then
  submitted too); Ray would not start them earlier anyway.
* **Shards anywhere**: a shard's numbers depend on its samples, its seed and the batch size,
  never on the worker (:mod:`robench.execute.shards`), so one model's evaluation spreads over
  every free device and the table equals the local executor's.
* **The driver alone** calls hooks and writes files: tasks return events (a prepared cell, a
  finished shard, an ``error`` row) and the driver stores each shard as a part at once.
* **Threads and devices**: a task uses as many torch threads as it requests CPUs
  (``cpus_per_task``, by default the driver's thread count, so its float sums are the local
  executor's) and CUDA when it requests GPUs (fractions put several tasks on one GPU).
* **Failures**: a task whose worker died is rerun by Ray (``max_retries``): a shard costs one
  shard, a build resumes from its last checkpoint (:func:`robench.train`). After that, or on
  any other Ray failure, the cells it concerns become ``error`` rows; Ctrl-C cancels every
  task, and a rerun computes only the shards not stored.

The cache folder must be one folder for every task (this machine's, or a shared filesystem):
tasks pass models and sets through it. The run folder need only be the driver's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch

from robench.cell import Cell, ModelKey
from robench.execute.events import CellPrepared, Event, Group, Prepared, Recipe, ShardDone, Worker
from robench.execute.taskgraph import Session, SetNeed, required_models, set_needs
from robench.plan.execution import Execution
from robench.protocol import Protocol
from robench.results.storage import CellResult


class RayExecutor:
    """Runs a session's groups as a Ray task graph (see the module docstring)."""

    name = "ray"

    def __init__(self, execution: Execution) -> None:
        self.execution = execution

    def map(self, worker: Worker, groups: Sequence[Group]) -> Iterator[Event]:
        """Submit the graph; yield every task's events as they arrive."""
        import ray

        session = cast(Session, worker)  # the graph plans with the driver's whole session

        started_here = not ray.is_initialized()
        if started_here:
            address = self.execution.address or None
            session.progress.log(f"ray: {'joining ' + address if address else 'starting a local cluster'}")
            ray.init(address=address, include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
        graph = _Graph(session, self.execution)
        try:
            yield from graph.run(groups)
        finally:  # Ctrl-C, or a consumer that stopped: no task may go on writing to the cache
            graph.cancel()
            if started_here:
                ray.shutdown()


class _Graph:
    """The task graph of one run, submitted as its dependencies become known."""

    def __init__(self, session: Session, execution: Execution) -> None:
        import ray

        self.session = session
        self.device, gpus = _device_and_gpus(session, execution.gpus_per_task)
        self.threads = execution.cpus_per_task or torch.get_num_threads()
        self.tasks: dict[str, Any] = {
            name: ray.remote(fn).options(
                num_cpus=self.threads,
                num_gpus=gpus,
                max_retries=execution.max_retries,
                retry_exceptions=False,  # plugin exceptions are error rows already; only dead workers retry
            )
            for name, fn in _TASKS.items()
        }
        self.recipe = ray.put(session.recipe())
        self.groups: dict[ModelKey, Group] = {}
        self.models: dict[ModelKey, Any] = {}
        self.sets: dict[str, Any] = {}
        self.waiting: dict[Any, tuple[str, Any]] = {}  # refs whose results the driver reads
        self.cell_shards: dict[str, list[Any]] = {}
        self.submitted: list[Any] = []
        session.progress.log(
            f"ray: task graph of builds, sets and shards, each task {self.threads} CPU(s)"
            + (f" and {gpus:g} GPU(s)" if gpus else "")
        )

    def run(self, groups: Sequence[Group]) -> Iterator[Event]:
        """Submit the builds and the sets known before any compute, then react to results."""
        import ray

        self.groups = {g.key: g for g in groups}
        for group in groups:
            self._model(group.key)
        for group in groups:
            for cell in group.cells:
                if group.todo.get(cell.key, [0]):  # a cell whose shards are all stored needs no set
                    self._sets(cell, cell.protocol)
        while self.waiting:
            ref = ray.wait(list(self.waiting), num_returns=1)[0][0]
            kind, what = self.waiting.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayError as exc:  # retries spent (worker killed, node lost), a failed dependency
                yield from self._failed(kind, what, exc)
                continue
            if kind == "group":
                yield from self._prepared(what, ref, value)
            else:
                yield value
                if isinstance(value, CellResult):  # the shard raised: the cell is an error row
                    self._cancel_cell(value.row["cell_key"])

    def cancel(self) -> None:
        """Cancel every task still running or waiting."""
        import ray

        for ref in self.submitted:
            ray.cancel(ref, force=True)

    def _submit(self, task: str, *args: Any) -> Any:
        ref = self.tasks[task].remote(self.recipe, self.device, self.threads, *args)
        self.submitted.append(ref)
        return ref

    def _model(self, key: ModelKey) -> Any:
        """The task that builds ``key`` (submitted once, after the builds it requires)."""
        if key not in self.models:
            deps = [self._model(k) for k in required_models(self.session, key)]
            group = self.groups.get(key)
            if group is not None:  # a target: the build task also prepares its cells
                ref = self._submit("prepare", group, *deps)
                self.waiting[ref] = ("group", group)
            else:
                ref = self._submit("build", key, *deps)
            self.models[key] = ref
        return self.models[key]

    def _sets(self, cell: Cell, protocol: Protocol) -> list[Any]:
        """The tasks of the sets ``cell`` reads under ``protocol`` (each submitted once)."""
        refs = []
        for need in set_needs(self.session, cell, protocol):
            if need.name not in self.sets:
                self.sets[need.name] = self._submit("set", cell, protocol, need, *map(self._model, need.surrogates))
            refs.append(self.sets[need.name])
        return refs

    def _prepared(self, group: Group, build: Any, events: list[Event]) -> Iterator[Event]:
        """A group's build task returned: pass its events on, submit its cells' shards."""
        cells = {c.key: c for c in group.cells}
        for event in events:
            yield event
            if not isinstance(event, CellPrepared):
                continue
            cell = cells[event.cell_key]
            deps = [build, *self._sets(cell, event.prepared.protocol)]  # masking sets are known only now
            todo = group.todo.get(cell.key, range(len(self.session.shards(cell))))
            refs = [self._submit("shard", cell, event.prepared, index, *deps) for index in todo]
            for ref in refs:
                self.waiting[ref] = ("shard", cell)
            self.cell_shards[cell.key] = refs

    def _failed(self, kind: str, what: Any, exc: Exception) -> Iterator[CellResult]:
        cells: list[Cell] = what.cells if kind == "group" else [what]
        for cell in cells:
            yield self.session.error(cell, "ray task", exc)
            self._cancel_cell(cell.key)

    def _cancel_cell(self, cell_key: str) -> None:
        """Stop the other shards of a cell that has become an error row."""
        import ray

        for ref in self.cell_shards.pop(cell_key, []):
            if self.waiting.pop(ref, None) is not None:
                ray.cancel(ref, force=True)


def _device_and_gpus(session: Session, gpus_per_task: float) -> tuple[str, float]:
    """The tasks' device and GPUs: CUDA when they request GPUs (unless the run asked for the
    CPU: GPUs then are Ray's logical resources only), or when the driver's device is CUDA
    (then one GPU each unless told otherwise)."""
    if gpus_per_task > 0:
        return ("cpu" if session.device_request == "cpu" else "cuda"), gpus_per_task
    if session.device.type == "cuda":
        return "cuda", 1.0
    return "cpu", 0.0


# -- the tasks: each rebuilds the session in its worker (kept for the worker's next task) -----

_OPEN: dict[tuple[str, str], Session] = {}


def _open(recipe: Recipe, device: str, threads: int) -> Session:
    from robench.execute.progress import TqdmProgress

    torch.set_num_threads(threads)
    key = (recipe.identity(), device)
    if key not in _OPEN:  # a worker reused for the same run keeps its loaded data and models
        _OPEN.clear()
        # Ray sets CUDA_VISIBLE_DEVICES to the task's GPUs: "cuda" is the first of them
        _OPEN[key] = cast(Session, recipe.open(torch.device(device), TqdmProgress(bars=False)))
    return _OPEN[key]


def _prepare_task(recipe: Recipe, device: str, threads: int, group: Group, *_deps: Any) -> list[Event]:
    """Build (or load) a target and run its cells' model checks."""
    return list(_open(recipe, device, threads).prepare_group(group))


def _build_task(recipe: Recipe, device: str, threads: int, key: ModelKey, *_deps: Any) -> dict[str, float]:
    """Build (or load) a model other tasks need (a surrogate, a start model)."""
    started = time.time()
    _open(recipe, device, threads).models(key)
    return {"started": started, "finished": time.time()}


def _set_task(
    recipe: Recipe, device: str, threads: int, cell: Cell, protocol: Protocol, need: SetNeed, *_deps: Any
) -> dict[str, float]:
    """Generate (or find) one shared set in the cache."""
    from robench.execute.transfersource import TransferSource
    from robench.execute.versions import expand

    started = time.time()
    session = _open(recipe, device, threads)
    data, indices = session.data(cell.model.dataset, "test"), session.eval_indices(cell.model.dataset)
    source = TransferSource(session, cell, protocol, session.setup(cell), data, indices)
    source(expand(protocol, session.registries, cell.norm)[need.version_index])
    return {"started": started, "finished": time.time()}


def _shard_task(
    recipe: Recipe, device: str, threads: int, cell: Cell, prepared: Prepared, index: int, *_deps: Any
) -> ShardDone | CellResult:
    """Evaluate one shard of a cell."""
    return _open(recipe, device, threads).run_shard(cell, prepared, index)


_TASKS: dict[str, Any] = {"prepare": _prepare_task, "build": _build_task, "set": _set_task, "shard": _shard_task}

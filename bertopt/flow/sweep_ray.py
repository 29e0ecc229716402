"""`bertopt sweep --ray [ADDRESS]`: the sweep's exports and shapes as Ray tasks, across a cluster's nodes.

The folder layout, result.json, summary.md and the resume rule are bertopt.flow.sweep's (its helpers run
here); rows also say which node ran each shape.

ADDRESS (decision for issue 15, on ray.init's own address forms, read in the docstring of
`ray.init` in ray 2.60 and https://docs.ray.io/en/latest/ray-core/api/doc/ray.init.html):

- nothing (`--ray` alone) or `local`: a new Ray instance on this machine, for this sweep only;
- `auto`: the cluster this machine belongs to ($RAY_ADDRESS, else the last one `ray start` began
  here); none is one line, exit 2;
- `ray://HOST:PORT`: Ray Client to a cluster's head (port 10001 unless changed; needs `ray[client]`);
- `HOST:PORT`: the GCS address `ray start --head` prints, from a machine that can reach it.

Scheduling: a shape's task asks for `--cpus-per-shape` CPUs (default 1; validation runs ONNX Runtime
on as many threads) and for the sweep's memory estimate, so Ray places shapes within each node's
`memory` resource. A shape larger than every node asks for the largest node's memory and so runs
there alone, as the local sweep runs it alone. An export task asks for 1 CPU and EXPORT_MEMORY.

Shared folder: the driver writes CHECK_NAME (a fresh token) into --output, then one task pinned to
each node with CPUs reads it; every export and shape task reads it again before writing (a node that
joined later). A node that does not see this sweep's token stops the sweep with one line (exit 2).

Faults: a task whose node or worker process dies is retried by Ray on another node, at most RETRIES
times (`max_retries`; `retry_exceptions` stays off: a Python error is the shape's own error row). A
retry empties the shape folder first; the model is written under a temporary name and renamed
(bertopt.files), result.json last, so a lost node leaves no model under its final name. A shape
whose retries run out is an error row and its folder is removed. Ctrl-C cancels every unfinished
task (force: Ray kills the workers), waits for the cancellations, then removes the shapes they had
not finished.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from bertopt.errors import BertoptError, first_line
from bertopt.files import write_text
from bertopt.flow.sweep import (GIB, ORIGINAL_NAME, PreparedSize, Progress, Shape, SweepConfig, SweepResult,
                                check_matrix, check_positions, claim_output, discard_unfinished, error_row,
                                export_and_measure, finish, make_shapes, resolve_sizes, run_shape, split_done)

CHECK_NAME = "ray-check"
RETRIES = 2
# Peak RSS of one export, measured with tools/bench_sweep.py (BENCHMARKS.md): bert-large 5687 MiB,
# bert-base 2105 MiB; rounded up. Asked of every export whatever its size: its weights are not known
# before it.
EXPORT_MEMORY = 6 * GIB
CHECK_TIMEOUT_SECONDS = 120.0
CONNECT_TIMEOUT_SECONDS = 10.0
CANCEL_WAIT_SECONDS = 30.0
POLL_SECONDS = 0.2
BOARD_TIMEOUT_SECONDS = 10.0


class OutputNotShared(BertoptError):
    """A node cannot see --output (or sees another folder under its path)."""


@dataclass(frozen=True)
class OutputCheck:
    """What every task reads before it writes: the token the driver put in --output for this sweep."""

    marker: Path
    token: str


def sweep_on_ray(config: SweepConfig, address: str | None = None,
                 progress: Progress = lambda message: None) -> SweepResult:
    """The sweep of `config` on the Ray cluster at `address` (None: a new local instance).

    When this process is already connected to Ray (ray.init was called), that connection is used
    and `address` is ignored; otherwise the sweep connects and disconnects itself.
    """
    if config.jobs is not None or config.memory_budget_gib is not None:
        raise BertoptError("--jobs and --memory-budget bound the local sweep; with --ray, each node's "
                           "CPUs and memory do (ray start --num-cpus/--memory)")
    config = dataclasses.replace(config, output=config.output.resolve(),
                                 threads=1 if config.threads is None else config.threads)
    check_matrix(config)
    sizes = resolve_sizes(config.sizes)
    connected_here = _connect(address)
    try:
        return _sweep(config, sizes, progress)
    finally:
        if connected_here:
            ray.shutdown()


def _connect(address: str | None) -> bool:
    """Connect to Ray unless already connected; whether this call did."""
    if ray.is_initialized():
        return False
    if address not in (None, "auto"):
        _check_answers(address)
    try:
        ray.init(address=address or "local", logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise BertoptError(f"--ray {address or 'local'}: cannot connect to Ray ({first_line(exc)})") from None
    return True


def _check_answers(address: str) -> None:
    """Something listens at HOST:PORT: ray.init waits minutes on an address where nothing does."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_SECONDS).close()
    except OSError as exc:
        raise BertoptError(f"--ray {address}: nothing answers at {host}:{port} "
                           f"({exc.strerror or type(exc).__name__})") from None


def _sweep(config: SweepConfig, sizes: dict[str, str], progress: Progress) -> SweepResult:
    claim_output(config.output, config)
    nodes = _nodes_with_cpus(config.threads)
    check = OutputCheck(config.output / CHECK_NAME, secrets.token_hex(16))
    write_text(check.marker, check.token)
    try:
        nodes = _check_every_node_sees(check, nodes, progress)
        prepared = _export_all(sizes, config, check, nodes, progress)
        shapes = make_shapes(config, prepared)
        done, todo = split_done(shapes)
        progress(f"{len(shapes)} shape(s): {len(done)} done before, {len(todo)} to run on {len(nodes)} node(s) "
                 f"({config.threads} CPU(s) per shape)")
        rows = _run_shapes(todo, check, _largest_memory(nodes), progress)
    finally:
        check.marker.unlink(missing_ok=True)
    return finish(config, prepared, done + rows)


# --------------------------------------------------------------------------- the cluster

def _nodes_with_cpus(cpus: int) -> list[dict]:
    """The live nodes a shape can run on (ray.nodes() entries); none is one line."""
    nodes = [node for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) >= cpus]
    if not nodes:
        raise BertoptError(f"--cpus-per-shape {cpus}: no Ray node has that many CPUs")
    return nodes


def _largest_memory(nodes: list[dict]) -> int:
    return int(max(node["Resources"].get("memory", 0) for node in nodes))


def task_memory(estimate: int, largest: int) -> int:
    """What a task asks of Ray's `memory` resource: its estimate, at most the largest node's (or it never runs)."""
    return min(estimate, largest) if largest else estimate


def node_name() -> str:
    """This task's node: Ray's node id (8 hex digits, unique) and its IP address (what a person knows)."""
    return f"{ray.get_runtime_context().get_node_id()[:8]} ({ray.util.get_node_ip_address()})"


def see_output(check: OutputCheck) -> str:
    """Task side: fail unless this node sees the driver's token in --output; the node's name."""
    node = node_name()
    try:
        token = check.marker.read_text().strip()
    except OSError:
        token = None
    if token != check.token:
        seen = "no such file" if token is None else "another sweep's token"
        raise OutputNotShared(f"--output {check.marker.parent}: node {node} cannot see this sweep's "
                              f"{check.marker.name} ({seen}); every node must share the --output folder "
                              "at the same path")
    return node


def _check_every_node_sees(check: OutputCheck, nodes: list[dict], progress: Progress) -> list[dict]:
    """One task pinned to each node reads the marker; the first node that cannot is one line.

    A node that left the cluster meanwhile (Ray lists a lost node as alive until its health checks
    fail) is skipped; the nodes that answered are returned.
    """
    probe = ray.remote(see_output)
    refs = [probe.options(num_cpus=0, max_retries=0,
                          scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                          ).remote(check) for node in nodes]
    deadline = time.monotonic() + CHECK_TIMEOUT_SECONDS
    answered, seen = [], []
    for node, ref in zip(nodes, refs):
        try:
            seen.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            answered.append(node)
        except GetTimeoutError:
            raise BertoptError(f"Ray node {node['NodeID'][:8]} ({node['NodeManagerAddress']}) did not answer the "
                               f"shared-folder check within {CHECK_TIMEOUT_SECONDS:.0f} s") from None
        except RayTaskError as exc:
            raise BertoptError(first_line(_cause(exc))) from None
        except RayError as exc:
            progress(f"node {node['NodeID'][:8]} left the cluster during the shared-folder check "
                     f"({type(exc).__name__}); going on without it")
    if not answered:
        raise BertoptError("no Ray node answered the shared-folder check")
    progress(f"{len(seen)} node(s) see {check.marker.parent}: {', '.join(seen)}")
    return answered


def _cause(exc: RayTaskError) -> BaseException:
    """What the task raised (a RayTaskError's str is the whole remote traceback)."""
    return getattr(exc, "cause", None) or exc


# --------------------------------------------------------------------------- exports

def export_task(name: str, path: Path, check: OutputCheck) -> PreparedSize:
    see_output(check)
    return export_and_measure(name, path)


def _export_all(sizes: dict[str, str], config: SweepConfig, check: OutputCheck, nodes: list[dict],
                progress: Progress) -> dict[str, PreparedSize]:
    """Every size's export at once, one task each; a failed export is one line, as in the local sweep."""
    task = ray.remote(export_task).options(num_cpus=1, memory=task_memory(EXPORT_MEMORY, _largest_memory(nodes)),
                                           max_retries=RETRIES)
    refs = {}
    for size, name in sizes.items():
        progress(f"{size}: exporting {name} (cached by content on the node that exports it)")
        refs[size] = task.remote(name, config.output / size / ORIGINAL_NAME, check)
    try:
        prepared = dict(zip(refs, ray.get(list(refs.values()))))
    except BaseException as exc:  # a failed export, or Ctrl-C: the other exports are not waited for
        _cancel(_unfinished(list(refs.values())))
        if isinstance(exc, RayTaskError):
            raise BertoptError(first_line(_cause(exc))) from None
        if isinstance(exc, RayError):
            raise BertoptError(f"an export was lost ({type(exc).__name__}) after {RETRIES} Ray retries; "
                               "rerun the sweep") from None
        raise
    for size, info in prepared.items():
        check_positions(size, info, config.seqs)
    return prepared


# --------------------------------------------------------------------------- shapes

@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Board:
    """Where tasks say they started: (node, pid) per attempt; the driver polls it for its progress lines."""

    def __init__(self) -> None:
        self.starts: dict[str, list[tuple[str, int]]] = {}

    def started(self, key: str, node: str, pid: int) -> None:
        self.starts.setdefault(key, []).append((node, pid))

    def snapshot(self) -> dict[str, list[tuple[str, int]]]:
        return self.starts


def shape_key(shape: Shape) -> str:
    return f"{shape.size} seq {shape.seq} batch {shape.batch}"


def shape_task(shape: Shape, check: OutputCheck, board: Any) -> dict:
    node = see_output(check)
    # Not awaited: a task blocked in ray.get lends its CPU to another task, which would then run beside it.
    board.started.remote(shape_key(shape), node, os.getpid())
    return run_shape(shape, node)


def _run_shapes(shapes: list[Shape], check: OutputCheck, largest: int, progress: Progress) -> list[dict]:
    """Submit every shape, then collect rows as tasks finish; whatever ends this early cancels the rest."""
    if not shapes:
        return []
    # On the driver's node, which lives as long as the sweep (with a soft affinity, Ray placed it on another
    # node while the driver's was busy, and lost it with that node).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board = Board.options(scheduling_strategy=here).remote()
    task = ray.remote(shape_task)
    tracker = Tracker(shapes, progress)
    refs = {task.options(num_cpus=shape.threads, memory=task_memory(shape.estimate, largest), max_retries=RETRIES,
                         retry_exceptions=False).remote(shape, check, board): shape for shape in shapes}
    rows = []
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=POLL_SECONDS, fetch_local=False)
            tracker.update(_snapshot(board))
            for ref in ready:
                shape = refs[ref]
                row = _collect(ref, shape, tracker)
                del refs[ref]  # only now: a Ctrl-C while collecting still finds it unfinished
                tracker.finished(shape, row)
                rows.append(row)
    finally:
        _cancel(list(refs))
        for shape in refs.values():
            discard_unfinished(shape)
    return rows


def _snapshot(board: Any) -> dict[str, list[tuple[str, int]]]:
    try:
        return ray.get(board.snapshot.remote(), timeout=BOARD_TIMEOUT_SECONDS)
    except RayError:  # restarting on another node: this round has no news
        return {}


def _collect(ref: ray.ObjectRef, shape: Shape, tracker: Tracker) -> dict:
    """The task's row; an error row when Ray gave up on it (its node lost RETRIES + 1 times)."""
    try:
        return ray.get(ref)
    except RayTaskError as exc:
        if isinstance(_cause(exc), OutputNotShared):
            raise BertoptError(first_line(_cause(exc))) from None
        note = first_line(_cause(exc))
    except RayError as exc:
        note = (f"lost by Ray ({type(exc).__name__}) after {tracker.attempts(shape)} attempt(s); "
                "rerun the sweep to retry")
    discard_unfinished(shape)
    return error_row(shape, note, tracker.node_of(shape))


def _unfinished(refs: list[ray.ObjectRef]) -> list[ray.ObjectRef]:
    return ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[1] if refs else []


def _cancel(refs: list[ray.ObjectRef]) -> None:
    """Cancel unfinished tasks and wait until Ray reports them ended, so no worker still writes.

    Only unfinished ones: in testing, ray 2.60's core aborted the driver once ("Tried to complete task
    that was not pending") after tasks that had just returned were force-cancelled.
    """
    for ref in refs:
        ray.cancel(ref, force=True)
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_SECONDS, fetch_local=False)


class Tracker:
    """Which shape runs where, from the board's snapshots; one progress line per start and per end."""

    def __init__(self, shapes: list[Shape], progress: Progress) -> None:
        self.total = len(shapes)
        self.progress = progress
        self.starts: dict[str, list[tuple[str, int]]] = {}
        self.ended: set[str] = set()
        self.failed = 0

    def update(self, starts: dict[str, list[tuple[str, int]]]) -> None:
        """Add the starts not seen before (a board restarted after its node was lost knows fewer)."""
        for key, attempts in starts.items():
            seen = len(self.starts.get(key, []))
            for attempt, (node, pid) in enumerate(attempts[seen:], start=seen + 1):
                again = f", attempt {attempt}" if attempt > 1 else ""
                self.progress(f"{key}: started on {node} (pid {pid}{again})")
                self.starts.setdefault(key, []).append((node, pid))

    def finished(self, shape: Shape, row: dict) -> None:
        key = shape_key(shape)
        self.ended.add(key)
        self.failed += row["status"] != "passed"
        where = f" on {row['node']}" if row.get("node") else ""
        self.progress(f"{key}: {row['status']}{where} ({row['seconds']:.1f} s); {self.counts()}")

    def counts(self) -> str:
        running: dict[str, int] = {}
        for key, attempts in self.starts.items():
            if key not in self.ended:
                node = attempts[-1][0]
                running[node] = running.get(node, 0) + 1
        per_node = ", ".join(f"{node} {count}" for node, count in sorted(running.items())) or "none"
        waiting = self.total - len(self.ended) - sum(running.values())
        return (f"{len(self.ended)}/{self.total} done ({self.failed} failed), running: {per_node}, "
                f"{waiting} waiting")

    def attempts(self, shape: Shape) -> int:
        return len(self.starts.get(shape_key(shape), [])) or 1

    def node_of(self, shape: Shape) -> str | None:
        attempts = self.starts.get(shape_key(shape))
        return attempts[-1][0] if attempts else None


def parse_address(value: str | None) -> str | None:
    """--ray's value as ray.init takes it: None (start a local instance), auto, ray://host:port or host:port."""
    if value in (None, "", "local"):
        return None
    if value == "auto" or _is_host_port(value.removeprefix("ray://")):
        return value
    raise BertoptError(f"--ray {value!r}: expected nothing (a local Ray), auto, ray://HOST:PORT or HOST:PORT")


def _is_host_port(value: str) -> bool:
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit()

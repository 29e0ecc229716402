"""`bertopt sweep --ray` on a two-node Ray cluster on this machine (ray.cluster_utils.Cluster), bert-tiny:
the same summary as the local sweep, a node removed mid-shape, a rerun that finishes only what is missing,
a node that cannot see --output (started in a mount namespace of its own), Ctrl-C, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402
from test_cli import assert_one_line_error, bertopt  # noqa: E402
from test_plugins import FILE_PLUGIN, fresh_registry  # noqa: E402,F401 (a fixture)
from test_sweep import (SHAPES, live_processes_in_group, read_progress_until, temporary_files,  # noqa: E402
                        tiny_config, wait_until)

from bertopt.cli import with_bare_ray_flag  # noqa: E402
from bertopt.errors import BertoptError  # noqa: E402
from bertopt.flow.sweep import GIB, MIN_PARITY_ROWS, parity_batches, sweep  # noqa: E402
from bertopt.flow.sweep_ray import CHECK_NAME, parse_address, sweep_on_ray, task_memory  # noqa: E402

NODE_MEMORY = 3 * GIB
VERDICT = ("size", "seq", "batch", "status", "passes_changed", "conforming", "parity_passed", "atc",
           "parity_batches", "error")


@pytest.fixture(scope="module")
def cluster():
    """A head node with one CPU: one shape at a time, until a test adds a node."""
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, memory=NODE_MEMORY))
    yield cluster
    cluster.shutdown()


def ray_config(output: Path, **changes):
    return tiny_config(output, jobs=None, **changes)


def short_id(node) -> str:
    return node.node_id[:8]


@pytest.fixture(scope="module")
def swept_losing_a_node(cluster, tmp_path_factory):
    """A second node joins once the shapes are submitted, and is lost in the middle of a shape.

    Its first shape starts in a fresh worker process, so it runs for a second or more; the test
    freezes that process (SIGSTOP, as a hung machine) as soon as the progress line names it, and if
    the shape has not written its result.json by then, kills the node with its processes (SIGKILL):
    the machine is gone mid-shape. Otherwise (it was quicker) the test waits for the node's next shape.
    """
    output = tmp_path_factory.mktemp("ray") / "out"
    lines: list[str] = []
    joined: list = []

    def join_then_lose_the_second_node(message: str) -> None:
        lines.append(message)
        if " to run on " in message:
            joined.append(cluster.add_node(num_cpus=1, memory=NODE_MEMORY))
        elif joined and joined[0] in cluster.worker_nodes and f"started on {short_id(joined[0])}" in message:
            pid = int(re.search(r"pid (\d+)", message)[1])
            os.kill(pid, signal.SIGSTOP)
            if (shape_folder(output, message) / "result.json").exists():
                os.kill(pid, signal.SIGCONT)
                return
            cluster.remove_node(joined[0], allow_graceful=False)
            os.kill(pid, signal.SIGKILL)  # a frozen worker cannot notice that its raylet is gone

    result = sweep_on_ray(ray_config(output), cluster.address, join_then_lose_the_second_node)
    return output, result, lines, short_id(cluster.head_node), short_id(joined[0])


def shape_folder(output: Path, progress_line: str) -> Path:
    seq, batch = re.match(r"bert-tiny seq (\d+) batch (\d+):", progress_line).groups()
    return output / "bert-tiny" / f"seq{seq}_bs{batch}"


@pytest.fixture(scope="module")
def swept_locally(tmp_path_factory):
    return sweep(tiny_config(tmp_path_factory.mktemp("local") / "out"))


def test_the_summary_is_the_local_sweeps(swept_losing_a_node, swept_locally):
    output, result, _, head, _ = swept_losing_a_node
    assert result.passed and [(row["seq"], row["batch"]) for row in result.rows] == SHAPES
    assert ([{key: row[key] for key in VERDICT} for row in result.rows]
            == [{key: row[key] for key in VERDICT} for row in swept_locally.rows])
    for row in result.rows:
        assert row["parity_max_abs"] < 1e-4 and row["node"].startswith(head)
    summary = (output / "summary.md").read_text()
    assert "| node |" in summary and summary.count(f"| {head} (") == 4
    assert json.loads((output / "summary.json").read_text())["counts"] == {"shapes": 4, "passed": 4, "done_before": 0}
    assert not (output / CHECK_NAME).exists()


def test_a_shape_whose_node_is_lost_is_retried_elsewhere_and_written_whole(swept_losing_a_node):
    output, result, lines, head, lost_node = swept_losing_a_node
    [lost] = [line.split(":")[0] for line in lines if f"started on {lost_node}" in line][-1:]
    assert any(re.fullmatch(rf"{lost}: started on {head} \(.*\) \(pid \d+, attempt 2\)", line) for line in lines)
    assert f"{lost}: passed on {head}" in "\n".join(lines)
    for model in output.rglob("optimized.onnx"):
        onnx.checker.check_model(onnx.load(model))
    assert len(list(output.rglob("result.json"))) == 4 and not temporary_files(output)


def test_progress_counts_done_running_and_failed_per_node(swept_losing_a_node):
    _, _, lines, head, _ = swept_losing_a_node
    ends = [line for line in lines if ": passed on " in line]
    assert len(ends) == 4 and ends[-1].endswith("4/4 done (0 failed), running: none, 0 waiting")
    assert all(re.search(r"\d/4 done \(0 failed\), running: (none|\w{8} \(.*\) 1), \d waiting$", line)
               for line in ends)
    assert any(line.startswith(f"1 node(s) see ") and head in line for line in lines)


def test_rerun_on_the_cluster_finishes_only_what_is_missing(swept_losing_a_node, cluster):
    output, _, _, head, _ = swept_losing_a_node
    folder = output / "bert-tiny" / "seq32_bs1"
    kept = {path: path.stat().st_mtime_ns for path in output.rglob("optimized.onnx") if path.parent != folder}
    (folder / "result.json").unlink()
    (folder / "leftover.tmp").write_text("half-written")
    again = bertopt("sweep", "--ray", cluster.address, "--sizes", "bert-tiny", "--seq", "16,32", "--batch", "1,2",
                    "--samples", "1", "--output", str(output))
    assert again.returncode == 0, again.stderr
    assert "3 done before, 1 to run" in again.stderr
    started = [line.split(":")[0] for line in again.stderr.splitlines() if ": started on " in line]
    assert started == ["bert-tiny seq 32 batch 1"]
    assert not (folder / "leftover.tmp").exists() and (folder / "result.json").is_file()
    assert {path: path.stat().st_mtime_ns for path in kept} == kept
    summary = json.loads((output / "summary.json").read_text())
    assert summary["passed"] and summary["counts"] == {"shapes": 4, "passed": 4, "done_before": 3}
    assert again.stdout.count("| bert-tiny |") == 4 and again.stdout.count(f"| {head} (") == 4


def test_ray_workers_load_the_passes_from_file(cluster, tmp_path, fresh_registry):
    plugin = tmp_path / "my_passes.py"
    plugin.write_text(FILE_PLUGIN)
    config = ray_config(tmp_path / "out", seqs=(16,), batches=(2,), passes="div-to-mul-again,default",
                        passes_from=(str(plugin),))
    [row] = sweep_on_ray(config, cluster.address).rows
    assert row["status"] == "passed" and row["passes_changed"][0] == "div-to-mul-again", row


# --------------------------------------------------------------------------- a node without the shared folder

@pytest.fixture
def node_without(cluster, tmp_path):
    """A third node started by `ray start` in a mount namespace where tmp_path/shared is an empty tmpfs:
    the node runs on this machine but cannot see what the driver writes there, as a node without the
    cluster's shared filesystem."""
    hidden = tmp_path / "shared"
    hidden.mkdir()
    ray_cli = Path(sys.executable).parent / "ray"
    node = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             f'mount -t tmpfs tmpfs "{hidden}" && exec "$0" "$@"', str(ray_cli), "start",
                             "--address", cluster.address, "--num-cpus", "1", "--memory", str(NODE_MEMORY), "--block"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        nodes = len(cluster.list_all_nodes()) + 1
        wait_until(lambda: node.poll() is not None or len(cluster.global_state._live_node_ids()) == nodes)
        if node.poll() is not None:
            pytest.skip(f"cannot start a node in a mount namespace here: {node.stderr.read()[-300:]}")
        yield hidden
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=60)
        cluster.wait_for_nodes()


def test_a_node_that_cannot_see_the_output_stops_the_sweep_in_one_line(cluster, node_without):
    output = node_without / "out"
    with pytest.raises(BertoptError, match=r"node \w{8} \(.*\) cannot see this sweep's ray-check \(no such file\)"
                       ) as caught:
        sweep_on_ray(ray_config(output), cluster.address)
    assert "\n" not in str(caught.value) and "every node must share the --output folder" in str(caught.value)
    assert sorted(path.name for path in output.iterdir()) == ["sweep.json"]  # nothing exported, marker gone


# --------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_cancels_the_tasks_and_removes_unfinished_shapes(cluster, tmp_path):
    """SIGINT to the driver's process group, as the terminal sends it, once a shape's task writes its folder;
    the cluster's workers are not in that group: only the driver's cancellation stops them."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        pytest.skip("SIGINT is ignored here (a background job), so the sweep started from here would ignore it too")
    output = tmp_path / "s"
    driver = subprocess.Popen([sys.executable, "-m", "bertopt", "sweep", "--ray", cluster.address, "--sizes",
                               "bert-tiny", "--seq", "16", "--batch", "1,2,3,4", "--output", str(output)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    read_progress_until(driver, ": started on ")
    wait_until(lambda: any(output.glob("bert-tiny/seq16_bs*")))
    os.killpg(driver.pid, signal.SIGINT)
    rest = driver.stderr.read()
    assert driver.wait(timeout=60) == 130
    assert rest.splitlines()[-1] == "bertopt: interrupted" and "Traceback" not in rest, rest
    finished = {path.parent for path in output.rglob("result.json")}
    assert {path for path in (output / "bert-tiny").iterdir() if path.is_dir()} == finished
    assert len(finished) < 4 and not temporary_files(output)


# --------------------------------------------------------------------------- a local Ray

def test_ray_alone_starts_a_local_ray_for_this_sweep_only(tmp_path):
    """`--ray` with no address: a Ray instance of the sweep's own, gone with it (nothing left in its group)."""
    output = tmp_path / "s"
    driver = subprocess.Popen([sys.executable, "-m", "bertopt", "sweep", "--ray", "--sizes", "bert-tiny", "--seq", "16",
                               "--batch", "1,2", "--output", str(output)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True, env=dict(os.environ, COLUMNS="200"))
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, stderr
    assert "1 node(s) see " in stderr and "2/2 done (0 failed), running: none, 0 waiting" in stderr
    assert stdout.count("| bert-tiny |") == 2 and "| node |" in stdout
    wait_until(lambda: not live_processes_in_group(driver.pid), timeout=30)


# --------------------------------------------------------------------------- small parts

def test_parity_runs_no_more_batches_than_reach_the_minimum_rows():
    assert MIN_PARITY_ROWS == 16
    assert [parity_batches(batch, 2) for batch in (1, 4, 8, 9, 16, 64)] == [2, 2, 2, 2, 1, 1]
    assert parity_batches(1, 5) == 5 and parity_batches(4, 5) == 4 and parity_batches(64, 5) == 1
    assert parity_batches(1, 1) == 1


def test_address_forms():
    assert parse_address(None) is None and parse_address("local") is None
    assert parse_address("auto") == "auto" and parse_address("ray://head:10001") == "ray://head:10001"
    assert parse_address("10.0.0.5:6379") == "10.0.0.5:6379"
    for wrong in ("head", "ray://head"):
        with pytest.raises(BertoptError, match="expected nothing"):
            parse_address(wrong)
    assert with_bare_ray_flag(["sweep", "--ray"]) == ["sweep", "--ray=local"]
    assert with_bare_ray_flag(["sweep", "--ray", "--seq", "16"]) == ["sweep", "--ray=local", "--seq", "16"]
    assert with_bare_ray_flag(["sweep", "--ray", "auto"]) == ["sweep", "--ray", "auto"]


def test_a_task_asks_for_its_estimate_within_the_largest_node():
    assert task_memory(2 * GIB, 8 * GIB) == 2 * GIB
    assert task_memory(12 * GIB, 8 * GIB) == 8 * GIB  # larger than every node: runs there alone
    assert task_memory(2 * GIB, 0) == 2 * GIB


def test_ray_refuses_local_only_options_and_bad_addresses(tmp_path):
    assert_one_line_error(bertopt("sweep", "--ray", "--jobs", "2", "--output", str(tmp_path / "a")), 2,
                          "--jobs and --memory-budget bound the local sweep")
    assert_one_line_error(bertopt("sweep", "--ray", "nowhere", "--output", str(tmp_path / "b")), 2,
                          "--ray 'nowhere': expected nothing")
    assert_one_line_error(bertopt("sweep", "--ray", "--cpus-per-shape", "0", "--output", str(tmp_path / "c")), 2,
                          "--cpus-per-shape 0")
    assert_one_line_error(bertopt("sweep", "--ray", "127.0.0.1:1", "--output", str(tmp_path / "d")), 2,
                          "--ray 127.0.0.1:1: nothing answers at 127.0.0.1:1 (Connection refused)")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

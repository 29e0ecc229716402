"""Cost of `bertopt diff` (original export vs bertopt's `default` output) beside networkx graph matching.

    .venv/bin/python tools/bench_diff.py                        # tiny, base, large; networkx on tiny
    .venv/bin/python tools/bench_diff.py --sizes tiny --repeat 1 --no-write

Issue 6 left the matching method open ("networkx graph matching or a canonical form; measured").
bertopt.report.diff hashes nodes structurally and propagates matches along edges, linear in the graph. The
networkx alternative measured here is ISMAGS' largest common subgraph with nodes matched by op, the
textbook way to align two graphs; it gets `--nx-timeout` seconds per size (default: tiny only) and is
reported as not finishing when it runs out. Each measurement is a separate process (bench_pipeline's
`measure`: wall time and peak RSS from wait4), median of `--repeat`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_pipeline import environment, export, measure, write_section

BEGIN, END = "<!-- bench_diff:begin -->", "<!-- bench_diff:end -->"

NETWORKX = """import sys
import networkx as nx
from networkx.algorithms import isomorphism
from bertopt.graph import load_graph

def digraph(path):
    graph, g = load_graph(path), nx.DiGraph()
    for node in graph.nodes:
        g.add_node(id(node), op=node.op)
        g.add_edges_from((id(node), id(c)) for t in node.outputs for c in t.outputs)
    return g

old, new = digraph(sys.argv[1]), digraph(sys.argv[2])
match = isomorphism.ISMAGS(old, new, node_match=isomorphism.categorical_node_match("op", None))
print(len(next(iter(match.largest_common_subgraph()))))"""


def optimized(model: Path, folder: Path, batch: int, seq: int) -> Path:
    out = folder / f"{model.stem}.default.onnx"
    subprocess.run([sys.executable, "-m", "bertopt", "optimize", str(model), "--passes", "default", "--batch",
                    str(batch), "--seq", str(seq), "--output", str(out), "--force"], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def networkx_seconds(old: Path, new: Path, timeout: float) -> float | None:
    """ISMAGS' wall time, or None when it did not finish within `timeout`."""
    start = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-c", NETWORKX, str(old), str(new)], check=True, timeout=timeout,
                       capture_output=True)
    except subprocess.TimeoutExpired:
        return None
    return time.perf_counter() - start


def row(size: str, old: Path, new: Path, repeat: int, nx_timeout: float | None) -> str:
    seconds, peaks = measure([sys.executable, "-m", "bertopt", "diff", str(old), str(new)], repeat)
    if nx_timeout is None:
        networkx = "not run"
    else:
        took = networkx_seconds(old, new, nx_timeout)
        networkx = f"did not finish in {nx_timeout:.0f} s" if took is None else f"{took:.1f} s"
    return (f"| bert-{size} | {statistics.median(seconds):.1f} | {statistics.median(peaks):.0f} | "
            f"{old.stat().st_size / 2**20:.1f} | {networkx} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,base,large")
    parser.add_argument("--nx-sizes", default="tiny", help="sizes networkx is tried on")
    parser.add_argument("--nx-timeout", type=float, default=120.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    rows = ["| model | bertopt diff wall s (median) | peak RSS MiB | model MiB | networkx ISMAGS (same pair) |",
            "|---|---:|---:|---:|---|"]
    with tempfile.TemporaryDirectory(prefix="bench-diff-") as tmp:
        for size in args.sizes.split(","):
            print(f"[{size}] export, optimize, diff x{args.repeat}", flush=True)
            old = export(size, Path(tmp))
            new = optimized(old, Path(tmp), args.batch, args.seq)
            rows.append(row(size, old, new, args.repeat, args.nx_timeout if size in args.nx_sizes.split(",") else None))
    command = "python tools/bench_diff.py " + " ".join(sys.argv[1:])
    text = (f"## Graph diff cost (tools/bench_diff.py)\n\nMeasured {time.strftime('%Y-%m-%d')} with "
            f"`{command.strip()}`: the legacy opset-14 export against its `default` output at batch {args.batch}, "
            f"seq {args.seq}; bertopt diff as a whole process (loading both models included).\n"
            f"Machine: {environment()}.\n\n" + "\n".join(rows))
    print(text)
    if not args.no_write:
        write_section(text, BEGIN, END)


if __name__ == "__main__":
    main()

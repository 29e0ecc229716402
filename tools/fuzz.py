"""Fuzz bertopt's command line: malformed models and random configurations must end cleanly.

    .venv/bin/python tools/fuzz.py --seed 0 --malformed 1000 --configs 60          # writes BENCHMARKS.md
    .venv/bin/python tools/fuzz.py --seed 0 --case 17 --keep /tmp/case17            # reproduce one case

Every case must end in one of three ways: a result (exit 0, and an output that passes parity and ATC
legality when re-checked here, independently of the run's own verdict), a clean refusal (exit 2, one
`bertopt: error:` line on stderr) or a flagged failure (exit 1 with the reason on that line). Anything
else is a bug and is listed with its reproducer: a traceback, exit 0 with an output that fails the
re-check (a silent failure), exit 0 on an input that bertopt's loader or ONNX Runtime cannot run at that
shape (accepted-invalid: there is no parity to check, so it should have been refused), an exit without
its one line, a hang (`--case-timeout`), a killed worker, an input file bertopt modified, or an output
file others cannot read.

Two kinds of case, each fully determined by (seed, case index):
- malformed (cases 0 .. --malformed-1): a valid tiny export (bert-tiny from the legacy exporter at
  opset 14, from the dynamo exporter at 18, or bertopt's own `default` output) damaged by byte flips,
  truncation, junk, or a protobuf field mutation (nodes dropped or duplicated, dangling or renamed
  inputs, wrong dtypes, bad or huge shapes, negative opsets and IR versions, unknown ops, broken
  attributes and initializers, cycles, missing external data...), then given to `optimize`, `check`,
  `run`, `validate`, `diff` or `inputs` with random shapes. These run in-process through
  bertopt.cli.main (SystemExit caught, stderr captured) in worker processes, since a fresh `bertopt`
  process costs about 3 s of imports per case.
- config (the --configs cases after them): a random tiny model of a family that works (the families
  whose rows COMPATIBILITY.json marks ok, else bert): hidden, heads, layers, intermediate size,
  activation (where the config names one: hidden_act, activation or hidden_activation), attention
  implementation, exporter, opset, mask input, batch and seq, exported through bertopt's exporter (and
  its cache), then `bertopt run` on it.
A configuration that torch or transformers cannot export (SDPA below opset 14, a family without SDPA)
is `not-made`, no case for bertopt; bertopt's exporter refusing it in one line is a refusal, and a
traceback from bertopt's own code a bug. Workers run under an address-space cap; a worker that dies is
restarted and its case recorded as `crashed`. Results (one JSON line per case) go to --work; the summary
to BENCHMARKS.md between this tool's markers, unless --no-write.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from bench_pipeline import environment, write_section
from compat_matrix import bertopt_frame, one_line, raised_in_bertopt, tiny_config

from bertopt.errors import BertoptError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORK = REPO / ".cache" / "fuzz"
BEGIN, END = "<!-- fuzz:begin -->", "<!-- fuzz:end -->"
BASES = ("legacy14", "dynamo18", "optimized")
TINY_BATCH, TINY_SEQ = 2, 16
GOOD = ("result", "refusal", "flagged")
NOT_MADE = "not-made"  # torch or transformers could not make the case's input: no case for bertopt
BUGS = ("traceback", "silent-failure", "accepted-invalid", "unclean-exit", "timeout", "crashed", "input-modified",
        "unreadable-output")


@dataclass
class Case:
    index: int
    kind: str  # "malformed" | "config"
    mutation: str  # what was done to the input (malformed) or the configuration (config)
    command: list[str]  # bertopt's arguments, with {input}, {base} and {out} placeholders
    base: str = ""
    config: dict = field(default_factory=dict)


@dataclass
class Outcome:
    index: int
    kind: str
    mutation: str
    command: list[str]
    exit: int | None
    outcome: str  # one of GOOD, NOT_MADE or BUGS
    detail: str
    seconds: float


# --------------------------------------------------------------------------- malformed inputs

def malformed_case(seed: int, index: int) -> Case:
    rng = random.Random(f"{seed}:{index}")
    base = rng.choice(BASES)
    mutation = rng.choice(list(MUTATIONS))
    return Case(index, "malformed", f"{mutation}:{rng.randrange(1 << 30)}", random_command(rng), base)


def random_command(rng: random.Random) -> list[str]:
    """One bertopt command on {input}, with shapes mostly sane and sometimes not."""
    batch, seq = rng.choice([(TINY_BATCH, TINY_SEQ)] * 6 + [(1, 8), (3, 32), (0, 16), (2, -4), (10**9, 16),
                                                           (2, 4096), (2, 1)])
    shape = ["--batch", str(batch), "--seq", str(seq)]
    command = rng.choices(["optimize", "check", "run", "validate", "diff", "inputs"], [55, 15, 12, 8, 5, 5])[0]
    if command == "optimize":
        target = rng.choice(["ascend", "ascend", "ort"])
        return ["optimize", "{input}", "--output", "{out}/optimized.onnx", "--target", target, *shape]
    if command == "check":
        return ["check", "{input}", "--legal-only", *rng.choice([[], ["--json"], ["--cann", "8.0"]])]
    if command == "run":
        return ["run", "{input}", "--output", "{out}/run", "--force", *shape,
                *rng.choice([[], ["--target", "ort"], ["--cann", "8.0"]])]
    if command == "validate":
        return ["validate", "{base}", "{input}", *shape, "--samples", "1"]
    if command == "diff":
        return ["diff", "{base}", "{input}"]
    return ["inputs", "{input}", "--output", "{out}/feeds", *shape, "--count", "2"]


def mutate(data: bytes, mutation: str, base_model, folder: Path) -> Path:
    """Write the damaged model into `folder` and return its path (it may come with a .data file)."""
    name, _, seed = mutation.partition(":")
    rng = random.Random(int(seed))
    path = folder / "input.onnx"
    kind, function = MUTATIONS[name]
    if kind == "bytes":
        path.write_bytes(function(bytearray(data), rng))
    elif kind == "proto":
        model = _copy(base_model)
        function(model, rng)
        path.write_bytes(model.SerializeToString())
    else:
        function(_copy(base_model), rng, path)
    return path


def _copy(model):
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def flip_bytes(data: bytearray, rng: random.Random) -> bytes:
    for _ in range(rng.choice([1, 2, 8, 64])):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def truncate(data: bytearray, rng: random.Random) -> bytes:
    return bytes(data[:rng.choice([0, 1, 16, rng.randrange(len(data)), len(data) - 1])])


def junk(data: bytearray, rng: random.Random) -> bytes:
    return rng.choice([b"", b"not a model\n", bytes(rng.randrange(256) for _ in range(512)),
                       bytes(data) + bytes(rng.randrange(256) for _ in range(64)), b"\x00" * 4096])


def _node(model, rng: random.Random, ops: tuple[str, ...] = ()):
    nodes = [n for n in model.graph.node if not ops or n.op_type in ops] or list(model.graph.node)
    return rng.choice(nodes)


def drop_node(model, rng):
    model.graph.node.remove(_node(model, rng))


def duplicate_node(model, rng):
    model.graph.node.append(_node(model, rng))


def dangling_input(model, rng):
    node = _node(model, rng)
    if node.input:
        node.input[rng.randrange(len(node.input))] = "no_such_tensor"


def cycle(model, rng):
    node = _node(model, rng, ("Add", "MatMul", "Mul"))
    node.input[0] = node.output[0]


def shuffle_nodes(model, rng):
    nodes = list(model.graph.node)
    rng.shuffle(nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def unknown_op(model, rng):
    node = _node(model, rng)
    if rng.random() < 0.5:
        node.op_type = "NoSuchOp"
    else:
        node.domain = "com.example.unknown"


def wrong_input_dtype(model, rng):
    tensor = rng.choice(model.graph.input)
    tensor.type.tensor_type.elem_type = rng.choice([0, 1, 2, 6, 7, 8, 9, 10, 11, 16, 999])


def bad_input_shape(model, rng):
    dims = rng.choice(model.graph.input).type.tensor_type.shape.dim
    choice = rng.randrange(4)
    if choice == 0 and dims:
        dims[rng.randrange(len(dims))].dim_value = rng.choice([0, -5, 1, 7, 2**40])
    elif choice == 1:
        dims.add().dim_value = rng.choice([1, 3])
    elif choice == 2 and dims:
        del dims[rng.randrange(len(dims))]
    elif dims:
        dims[rng.randrange(len(dims))].dim_param = rng.choice(["", "??", "batch"])


def bad_output(model, rng):
    choice = rng.randrange(3)
    if choice == 0:
        del model.graph.output[:]
    elif choice == 1:
        model.graph.output.append(model.graph.output[0])
    else:
        model.graph.output[0].name = "no_producer"


def graph_inputs(model, rng):
    choice = rng.randrange(4)
    if choice == 0:
        model.graph.input.remove(rng.choice(model.graph.input))
    elif choice == 1:
        model.graph.input.append(model.graph.input[0])
    elif choice == 2:
        import onnx

        model.graph.input.append(onnx.helper.make_tensor_value_info("position_ids", onnx.TensorProto.INT64,
                                                                      ["batch", "seq"]))
    else:
        old = rng.choice(model.graph.input)
        new = rng.choice(["", "x y", "input_ids"])
        for node in model.graph.node:
            node.input[:] = [new if name == old.name else name for name in node.input]
        old.name = new


def bad_opset(model, rng):
    choice = rng.randrange(3)
    if choice == 0:
        model.opset_import[0].version = rng.choice([-1, 0, 1, 7, 10, 99, 10**9])
    elif choice == 1:
        del model.opset_import[:]
    else:
        model.opset_import.add(domain="", version=rng.choice([11, 13]))


def bad_ir_version(model, rng):
    model.ir_version = rng.choice([-1, 0, 1, 3, 99, 2**40])


def bad_attribute(model, rng):
    node = _node(model, rng, ("Softmax", "Transpose", "Gather", "Cast", "Reshape", "LayerNormalization",
                              "ReduceMean", "Concat", "Unsqueeze"))
    if not node.attribute or rng.random() < 0.3:
        import onnx

        node.attribute.append(onnx.helper.make_attribute(rng.choice(["axis", "perm", "to", "bogus"]),
                                                         rng.choice([7, -9, [3, 1], 1.5, "x"])))
        return
    attribute = rng.choice(node.attribute)
    choice = rng.randrange(3)
    if choice == 0:
        attribute.i = rng.choice([-9, 7, 99, 2**40])
    elif choice == 1:
        del attribute.ints[:]
        attribute.ints.extend(rng.choice([[0], [3, 2, 1, 0, 4], [9, 9]]))
    else:
        attribute.type = rng.choice([1, 3, 7, 0])


def _initializer(model, rng, floats_only: bool = False):
    tensors = [t for t in model.graph.initializer if not floats_only or t.data_type == 1]
    return rng.choice(tensors) if tensors else None


def bad_initializer(model, rng):
    tensor = _initializer(model, rng)
    if tensor is None:
        return
    choice = rng.randrange(5)
    if choice == 0 and tensor.raw_data:
        tensor.raw_data = tensor.raw_data[: len(tensor.raw_data) // 2]
    elif choice == 1:
        tensor.data_type = rng.choice([0, 6, 7, 8, 10, 16, 999])
    elif choice == 2:
        del tensor.dims[:]
        tensor.dims.extend(rng.choice([[2**40], [0], [3, 5, 7], [-1]]))
    elif choice == 3:
        model.graph.initializer.remove(tensor)
    else:
        model.graph.initializer.append(tensor)


def extreme_constant(model, rng):
    """A valid model with an extreme float constant (the mask's -3.4e38, or a weight scaled by 1e4)."""
    import numpy as np
    from onnx import numpy_helper

    tensor = _initializer(model, rng, floats_only=True)
    if tensor is None:
        return
    values = numpy_helper.to_array(tensor).copy()
    if values.size == 1 or rng.random() < 0.3:
        values[...] = rng.choice([-3.4028234e38, 3.4028234e38, -1e9, 0.0])
    else:
        values *= np.float32(rng.choice([1e4, -1.0, 0.0]))
    tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), tensor.name))


def missing_external_data(model, rng, path: Path):
    """Weights saved as external data, then the data file removed, truncated or pointed elsewhere."""
    import onnx

    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="input.onnx.data", size_threshold=0)
    data = path.with_name("input.onnx.data")
    choice = rng.randrange(3)
    if choice == 0:
        data.unlink()
    elif choice == 1:
        data.write_bytes(data.read_bytes()[: rng.randrange(data.stat().st_size)])
    else:
        proto = onnx.load(str(path), load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = rng.choice(["../../etc/passwd", "/dev/zero", "nowhere.data"])
        path.write_bytes(proto.SerializeToString())


MUTATIONS = {
    "flip-bytes": ("bytes", flip_bytes), "truncate": ("bytes", truncate), "junk": ("bytes", junk),
    "drop-node": ("proto", drop_node), "duplicate-node": ("proto", duplicate_node),
    "dangling-input": ("proto", dangling_input), "cycle": ("proto", cycle), "shuffle-nodes": ("proto", shuffle_nodes),
    "unknown-op": ("proto", unknown_op), "wrong-input-dtype": ("proto", wrong_input_dtype),
    "bad-input-shape": ("proto", bad_input_shape), "bad-output": ("proto", bad_output),
    "graph-inputs": ("proto", graph_inputs), "bad-opset": ("proto", bad_opset),
    "bad-ir-version": ("proto", bad_ir_version), "bad-attribute": ("proto", bad_attribute),
    "bad-initializer": ("proto", bad_initializer), "extreme-constant": ("proto", extreme_constant),
    "external-data": ("file", missing_external_data),
}


# --------------------------------------------------------------------------- random configurations

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "quick_gelu")
ACTIVATION_FIELDS = ("hidden_act", "activation", "hidden_activation")  # the first the config has, as a string


def config_case(seed: int, index: int, families: list[str]) -> Case:
    rng = random.Random(f"{seed}:{index}")
    family = rng.choice(families)
    heads = rng.choice([1, 2, 4, 8])
    head_dim = rng.choice([8, 16, 32])
    exporter = rng.choice(["legacy", "legacy", "dynamo"])
    config = {"family": family, "hidden": heads * head_dim, "heads": heads, "layers": rng.choice([1, 2, 3]),
              "intermediate": heads * head_dim * rng.choice([2, 4]), "activation": rng.choice(ACTIVATIONS),
              "attention": rng.choice(["eager", "sdpa"]), "exporter": exporter,
              "opset": rng.choice(range(11, 18) if exporter == "legacy" else range(18, 24)),
              "mask": rng.choices(["int", "float", "additive", "none"], [70, 10, 10, 10])[0],
              "batch": rng.choice([1, 2, 3, 4, 8]), "seq": rng.choice([8, 16, 24, 32, 64, 100, 128])}
    command = ["run", "{input}", "--output", "{out}/run", "--force", "--batch", str(config["batch"]),
               "--seq", str(config["seq"])]
    label = ", ".join(f"{k}={v}" for k, v in config.items() if k not in ("batch", "seq"))
    return Case(index, "config", label, command, config=config)


def export_config(config: dict, folder: Path) -> Path:
    """The random configuration's tiny model, through bertopt's exporter (cached by content)."""
    from transformers import AutoConfig

    from bertopt.flow.export import export_onnx, random_source

    family = config["family"]
    overrides = tiny_config(family)
    default = AutoConfig.for_model(family)
    names = getattr(default, "attribute_map", {})
    sizes = {"hidden_size": config["hidden"], "num_attention_heads": config["heads"],
             "num_hidden_layers": config["layers"], "intermediate_size": config["intermediate"]}
    overrides.update({names.get(k, k): v for k, v in sizes.items() if names.get(k, k) in overrides})
    activation = next((key for key in ACTIVATION_FIELDS if isinstance(getattr(default, key, None), str)), None)
    if activation:
        overrides[activation] = config["activation"]
    source = random_source(family, overrides)
    head = "qa" if family in _qa_families() else "cls"
    return export_onnx(source, folder / "input.onnx", exporter=config["exporter"], opset=config["opset"],
                       attention=config["attention"], head=head, mask=config["mask"]).path


def _qa_families() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES

    return set(MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES)


def working_families() -> list[str]:
    """Families with an `ok` row in COMPATIBILITY.json (every exporter), else bert alone."""
    matrix = REPO / "COMPATIBILITY.json"
    if not matrix.is_file():
        return ["bert"]
    rows = json.loads(matrix.read_text())["rows"]
    statuses: dict[str, set[str]] = {}
    for row in rows:
        statuses.setdefault(row["family"], set()).add(row["status"])
    return sorted(f for f, found in statuses.items() if found == {"ok"}) or ["bert"]


# --------------------------------------------------------------------------- running one case

class CaseTimeout(BaseException):
    """Raised by the alarm in a case that hangs: not an Exception, so nothing in bertopt catches it."""


def run_case(case: Case, bases: dict[str, Path], folder: Path, timeout: int) -> Outcome:
    """Make the case's input, run bertopt's CLI in-process, classify the ending, re-check an exit 0."""
    start = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)  # a folder kept from an earlier run would change the case
    folder.mkdir(parents=True)
    try:
        signal.alarm(timeout)
        try:
            path = _make_input(case, bases, folder)
        except BertoptError as exc:  # bertopt's exporter refused the configuration in one line
            return _outcome(case, exc.exit_code, "refusal", f"export: {exc}"[:300], start)
        except Exception as exc:
            if raised_in_bertopt(exc):
                return _outcome(case, None, "traceback", f"export: {type(exc).__name__}: {str(exc)[:200]} "
                                                         f"(raised in {bertopt_frame(exc)})", start)
            return _outcome(case, None, NOT_MADE, one_line(exc), start)
        before = _digest(path)
        argv = [part.format(input=path, out=folder, base=bases.get(case.base or "legacy14")) for part in case.command]
        code, stderr = call_cli(argv)
        outcome, detail = classify(code, stderr)
        if outcome == "result":
            outcome, detail = recheck(argv, path, folder)
        if outcome in GOOD and _digest(path) != before:
            outcome, detail = "input-modified", f"{path.name} changed"
    except CaseTimeout:
        return _outcome(case, None, "timeout", f"no answer in {timeout} s", start)
    finally:
        signal.alarm(0)
    return _outcome(case, code, outcome, detail, start)


def _make_input(case: Case, bases: dict[str, Path], folder: Path) -> Path:
    if case.kind == "config":
        return export_config(case.config, folder)
    return mutate(bases[case.base].read_bytes(), case.mutation, _base_model(bases[case.base]), folder)


_BASE_MODELS: dict[Path, object] = {}


def _base_model(path: Path):
    import onnx

    if path not in _BASE_MODELS:
        _BASE_MODELS[path] = onnx.load(str(path))
    return _BASE_MODELS[path]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def _outcome(case: Case, code: int | None, outcome: str, detail: str, start: float) -> Outcome:
    return Outcome(case.index, case.kind, case.mutation, case.command, code, outcome, detail,
                   round(time.perf_counter() - start, 2))


def call_cli(argv: list[str]) -> tuple[int | str, str]:
    """bertopt.cli.main on `argv` in this process: (exit code, stderr), or ("traceback", what was raised where)."""
    from bertopt import cli

    stderr = io.StringIO()
    old_argv, sys.argv = sys.argv, ["bertopt", *argv]
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except CaseTimeout:
        raise
    except BaseException as exc:  # noqa: BLE001 - what the fuzzer is looking for
        return "traceback", f"{type(exc).__name__}: {str(exc).strip()[:200]} (raised in {bertopt_frame(exc)})"
    finally:
        sys.argv = old_argv
    return code, stderr.getvalue()


def classify(code: int | str, stderr: str) -> tuple[str, str]:
    if code == "traceback":
        return "traceback", stderr
    errors = [line for line in stderr.splitlines() if line.startswith("bertopt: error:")]
    if code == 0:
        return "result", ""
    if code in (1, 2) and len(errors) == 1 and "Traceback" not in stderr:
        return ("flagged" if code == 1 else "refusal"), errors[0][len("bertopt: error: "):][:300]
    return "unclean-exit", f"exit {code}, stderr: {stderr.strip()[-300:]!r}"


def recheck(argv: list[str], source: Path, folder: Path) -> tuple[str, str]:
    """Exit 0: the output must pass parity and (for the ascend target) legality, checked here again."""
    command = argv[0]
    if command == "optimize":
        target = argv[argv.index("--target") + 1]
        return _recheck_output(source, folder / "optimized.onnx", target, _shape(argv), None)
    if command == "run":
        target = argv[argv.index("--target") + 1] if "--target" in argv else "ascend"
        cann = argv[argv.index("--cann") + 1] if "--cann" in argv else None
        return _recheck_output(source, folder / "run" / "optimized.onnx", target, _shape(argv), cann,
                               report=folder / "run" / "report.json")
    if command == "check":
        return _recheck_legal(source, argv[argv.index("--cann") + 1] if "--cann" in argv else None)
    if command == "validate":
        return _recheck_parity(Path(argv[1]), source, _shape(argv))
    return "result", ""


def _shape(argv: list[str]) -> tuple[int, int]:
    return int(argv[argv.index("--batch") + 1]), int(argv[argv.index("--seq") + 1])


def _recheck_output(source: Path, output: Path, target: str, shape: tuple[int, int], cann: str | None,
                    report: Path | None = None) -> tuple[str, str]:
    unreadable = [p.name for p in (output, report) if p is not None and p.is_file() and not p.stat().st_mode & 0o004]
    if not output.is_file():
        return "silent-failure", f"exit 0 but no {output.name}"
    if target == "ascend":
        outcome, detail = _recheck_legal(output, cann)
        if outcome != "result":
            return outcome, detail
    outcome, detail = _recheck_parity(source, output, shape)
    if outcome == "result" and unreadable:
        return "unreadable-output", f"{', '.join(unreadable)} not readable by others"
    return outcome, detail


def _recheck_legal(model: Path, cann: str | None) -> tuple[str, str]:
    from bertopt.ascend.cann import resolve_cann
    from bertopt.ascend.legality import check_model_level
    from bertopt.graph import load_graph

    try:
        checks = check_model_level(load_graph(model), resolve_cann(cann)[0])
    except Exception as exc:  # noqa: BLE001 - an exit-0 output the checker cannot even read
        return "silent-failure", f"exit 0, but the re-check of legality fails: {type(exc).__name__}: {exc}"[:300]
    illegal = [f"{c.name}: {c.reason}" for c in checks if c.ok is False]
    return ("silent-failure", f"exit 0, but not legal: {'; '.join(illegal)}"[:300]) if illegal else ("result", "")


def _recheck_parity(source: Path, output: Path, shape: tuple[int, int]) -> tuple[str, str]:
    """Parity of `output` with `source` on feeds of another seed than bertopt's own (1, not 0).

    When `source` itself cannot be read or run at this shape (by bertopt's loader or ONNX Runtime), no
    parity exists to check: that is `accepted-invalid`, an input bertopt should have refused."""
    from bertopt.model.facts import detect_facts
    from bertopt.graph import load_graph
    from bertopt.validation.parity import OrtRunner, input_specs_of, graph_only, parity_check, realistic_feeds

    try:
        facts = detect_facts(load_graph(source))
        [feed] = realistic_feeds(facts, input_specs_of(graph_only(source)), batch=shape[0], seq=shape[1], seed=1)
        expected = OrtRunner(source).run(feed)
    except Exception as exc:  # noqa: BLE001
        return "accepted-invalid", f"the input cannot be fed or run here: {exc}"[:300]
    if not all(np.isfinite(value).all() for value in expected.values()):
        return "result", "the input itself gives NaN/inf here: no parity to check"
    try:
        comparison = parity_check(source, output, facts, batch=shape[0], seq=shape[1], samples=1, seed=1)
    except Exception as exc:  # noqa: BLE001
        return "silent-failure", f"exit 0, but the output cannot run: {type(exc).__name__}: {exc}"[:300]
    if not comparison.passed:
        return "silent-failure", f"exit 0, but parity fails: {comparison.summary_line()}"[:300]
    return "result", ""


# --------------------------------------------------------------------------- workers and the parent

def make_bases(folder: Path) -> dict[str, Path]:
    """The valid inputs the malformed cases damage: bert-tiny from both exporters, and `default`'s output."""
    from bertopt.flow.export import export_onnx, resolve_source
    from bertopt.flow.run import optimize

    folder.mkdir(parents=True, exist_ok=True)
    source = resolve_source("bert-tiny")
    bases = {"legacy14": export_onnx(source, folder / "legacy14.onnx").path,
             "dynamo18": export_onnx(source, folder / "dynamo18.onnx", exporter="dynamo", opset=18).path}
    optimized = folder / "optimized.onnx"
    if not optimized.is_file():
        optimize(bases["legacy14"], optimized, "default", batch=TINY_BATCH, seq=TINY_SEQ)
    bases["optimized"] = optimized
    return bases


def all_cases(seed: int, malformed: int, configs: int, families: list[str]) -> list[Case]:
    return ([malformed_case(seed, i) for i in range(malformed)]
            + [config_case(seed, i, families) for i in range(malformed, malformed + configs)])


def worker_main(args: argparse.Namespace) -> int:
    """Run the cases whose indices are in --cases, appending a `start` line and then a result line each."""
    cases = {c.index: c for c in all_cases(args.seed, args.malformed, args.configs, args.families.split(","))}
    bases = {name: args.work / "bases" / f"{name}.onnx" for name in BASES}
    deadline = args.deadline
    with args.results.open("a") as results:
        for index in map(int, args.cases.split(",")):
            case = cases[index]
            if case.kind == "config" and deadline and time.time() > deadline:
                continue
            results.write(json.dumps({"start": index}) + "\n")
            results.flush()
            folder = args.work / "cases" / str(index)
            timeout = args.case_timeout if case.kind == "malformed" else 10 * args.case_timeout
            outcome = run_case(case, bases, folder, timeout)
            if outcome.outcome in (*GOOD, NOT_MADE):  # a bug's folder is kept: its files reproduce it
                shutil.rmtree(folder, ignore_errors=True)
            results.write(json.dumps(asdict(outcome)) + "\n")
            results.flush()
    return 0


def run_workers(args: argparse.Namespace, cases: list[Case]) -> list[dict]:
    """Split the cases over --jobs worker processes; restart a worker that dies, recording its case."""
    pending = [[c.index for c in cases[w::args.jobs]] for w in range(args.jobs)]
    done: dict[int, dict] = {}
    by_index = {c.index: c for c in cases}
    attempts = 0
    while any(pending) and attempts < 50:
        attempts += 1
        procs = [(w, *_spawn(args, w, indices)) for w, indices in enumerate(pending) if indices]
        for w, proc, results, log in procs:
            proc.wait()
            finished, started = _read_results(results)
            done.update(finished)
            lost = [i for i in started if i not in finished]
            for index in lost:  # the case the worker died in
                case = by_index[index]
                done[index] = asdict(Outcome(index, case.kind, case.mutation, case.command, None, "crashed",
                                             f"worker died (exit {proc.returncode}): "
                                             f"{_last_line(log)}", 0.0))
            pending[w] = [i for i in pending[w] if i not in done and not _skipped(by_index[i], args)]
            results.unlink()
    return [done[i] for i in sorted(done)]


def _skipped(case: Case, args: argparse.Namespace) -> bool:
    return case.kind == "config" and args.deadline and time.time() > args.deadline


def _spawn(args: argparse.Namespace, worker: int, indices: list[int]):
    results = args.work / f"results-{worker}.jsonl"
    results.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--worker", "--seed", str(args.seed), "--malformed", str(args.malformed),
               "--configs", str(args.configs), "--families", args.families, "--work", str(args.work),
               "--results", str(results), "--cases", ",".join(map(str, indices)),
               "--case-timeout", str(args.case_timeout), "--deadline", str(args.deadline or 0)]
    cap = int(args.memory_gib * 2**30)
    log = args.work / f"worker-{worker}.log"
    with log.open("w") as handle:
        proc = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)))
    return proc, results, log


def _read_results(path: Path) -> tuple[dict[int, dict], list[int]]:
    finished, started = {}, []
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "start" in record:
                started.append(record["start"])
            else:
                finished[record["index"]] = record
    return finished, started


def _last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1][:200] if lines else "no output"


# --------------------------------------------------------------------------- the record

def section(args: argparse.Namespace, record: dict) -> str:
    outcomes, seconds = record["outcomes"], record["seconds"]
    counts = Counter(o["outcome"] for o in outcomes)
    by_kind = {kind: Counter(o["outcome"] for o in outcomes if o["kind"] == kind) for kind in ("malformed", "config")}
    bugs = [o for o in outcomes if o["outcome"] in BUGS]
    columns = [*GOOD, NOT_MADE, *BUGS]
    lines = ["## Fuzzing the command line (tools/fuzz.py)", "",
             f"Run {record.get('date', time.strftime('%Y-%m-%d'))}: seed {args.seed}, {len(outcomes)} cases "
             f"({sum(by_kind['malformed'].values())} malformed inputs, {sum(by_kind['config'].values())} random "
             f"configurations of {', '.join(args.families.split(','))}) in {seconds / 60:.1f} min with "
             f"{args.jobs} worker(s). Outcomes: result = exit 0 and the output passes parity and legality when "
             "re-checked; refusal = exit 2 with one line; flagged = exit 1 with its reason; not-made = torch or "
             "transformers could not export the configuration (no case for bertopt); every other column is a bug "
             "(unreadable-output: exit 0 and the output passed the re-checks, but a file bertopt wrote is not "
             "readable by others).", "",
             "| cases | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, counter in (("malformed", by_kind["malformed"]), ("config", by_kind["config"]), ("all", counts)):
        lines.append(f"| {label} | " + " | ".join(str(counter.get(c, 0)) for c in columns) + " |")
    mutations = Counter(o["mutation"].split(":")[0] for o in outcomes if o["kind"] == "malformed")
    lines += ["", "Malformed cases by mutation: " + ", ".join(f"{m} {n}" for m, n in sorted(mutations.items())) + "."]
    lines += ["", f"**{counts.get('traceback', 0)} tracebacks, {counts.get('silent-failure', 0)} silent failures**"
              + (f"; {len(bugs)} bug case(s) in all, grouped by cause (reproduce one with "
                 f"`--seed {args.seed} --case N --keep DIR`, which prints the command with the files filled in; "
                 "`{input}` is the damaged model, `{base}` the undamaged export, `{out}` the case's folder; every "
                 "case is in the run's outcomes.json):" if bugs else ".")]
    groups: dict[tuple[str, str], list[dict]] = {}
    for bug in bugs:
        groups.setdefault((bug["outcome"], signature(bug)), []).append(bug)
    if groups:
        lines += ["", "| bug | cause | cases | e.g. |", "|---|---|---:|---|"]
    for (outcome, cause), members in sorted(groups.items(), key=lambda item: (BUGS.index(item[0][0]), -len(item[1]))):
        first = members[0]
        example = f"case {first['index']} ({first['mutation'].split(':')[0]}): `bertopt {' '.join(first['command'])}`"
        lines.append(f"| {outcome} | {cause.replace('|', '/')} | {len(members)} | {example} |")
    lines += ["", f"Machine: {environment()}.", "", "Command:", "",
              "    " + " ".join([".venv/bin/python tools/fuzz.py", *record["argv"]])]
    return "\n".join(lines)


def signature(outcome: dict) -> str:
    """What bug cases of one cause share: a traceback's exception type and bertopt frame, else the detail
    without the paths, numbers and quoted names that differ from case to case."""
    import re

    detail = outcome["detail"]
    if outcome["outcome"] == "traceback":
        return f"{detail.split(':')[0]} in {detail.rsplit('(raised in ', 1)[-1].rstrip(')')}"
    detail = re.sub(r"/\S+|'[^']*'|\(\S+, \S+\)|\[[^]]*\]|-?\b\d[\d.e+-]*\b", "_", detail)
    return detail[:110]


def reproduce(args: argparse.Namespace) -> int:
    """Make one case's input in --keep and run it, printing what a user would run and what happened."""
    [case] = [c for c in all_cases(args.seed, args.malformed, args.configs, args.families.split(","))
              if c.index == args.case]
    bases = make_bases(args.work / "bases")
    outcome = run_case(case, bases, args.keep, args.case_timeout)
    argv = [p.format(input=args.keep / "input.onnx", out=args.keep, base=bases.get(case.base or "legacy14"))
            for p in case.command]
    print(f"case {case.index}: {case.mutation} (base {case.base or '-'})\nbertopt {' '.join(argv)}\n"
          f"-> {outcome.outcome} (exit {outcome.exit}): {outcome.detail}")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--malformed", type=int, default=1000, help="malformed-input cases")
    parser.add_argument("--configs", type=int, default=60, help="random-configuration cases (at most)")
    parser.add_argument("--config-minutes", type=float, default=None,
                        help="stop starting configuration cases after this many minutes of the run")
    parser.add_argument("--families", default=None, help="families for configuration cases "
                        "(default: those COMPATIBILITY.json marks ok with every exporter)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--case-timeout", type=int, default=120, help="seconds per malformed case (x10 per config)")
    parser.add_argument("--memory-gib", type=float, default=4, help="address-space cap per worker")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    parser.add_argument("--report-only", action="store_true",
                        help="write the section again from --work's outcomes.json, running nothing")
    parser.add_argument("--case", type=int, help="reproduce this case only (with --keep)")
    parser.add_argument("--keep", type=Path, help="folder for the reproduced case's files")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.families = args.families or ",".join(working_families())
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.case is not None:
        return reproduce(args)
    if args.report_only:
        record = json.loads((args.work / "outcomes.json").read_text())
        run_args = parse_args([*record["argv"], "--families", record.get("families", args.families)])
        return write_record(run_args, record, args.no_write)
    start = time.time()
    if args.config_minutes is not None:
        args.deadline = start + 60 * args.config_minutes
    make_bases(args.work / "bases")
    cases = all_cases(args.seed, args.malformed, args.configs, args.families.split(","))
    outcomes = run_workers(args, cases)
    record = {"seed": args.seed, "argv": argv, "families": args.families, "date": time.strftime("%Y-%m-%d"),
              "seconds": time.time() - start, "outcomes": outcomes}
    (args.work / "outcomes.json").write_text(json.dumps(record, indent=1))
    return write_record(args, record, args.no_write)


def write_record(args: argparse.Namespace, record: dict, no_write: bool) -> int:
    """Print the run's section (and put it into BENCHMARKS.md); exit 1 when any case is a bug."""
    text = section(args, record)
    print(text)
    if not no_write:
        write_section(text, BEGIN, END)
    return 1 if any(o["outcome"] in BUGS for o in record["outcomes"]) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Which model families bertopt handles: tiny models of every family transformers ships, through `default`.

    .venv/bin/python tools/compat_matrix.py                                # every family: COMPATIBILITY.md
    .venv/bin/python tools/compat_matrix.py --families bert,xlm --exporters legacy14 --output /tmp/m.md

Families are DISCOVERED from transformers' auto mappings (every model type with a question-answering,
sequence-classification, image-classification, audio-classification or base-model class), not listed by
hand. Image and audio classifiers (the `image-cls` and `audio-cls` heads: pixel values, log-mel features or
a waveform in, logits out) are run whatever their config says, since the class alone is exported; an image
or audio model with only a base class is excluded. Families bertopt exports as users deploy them
(bertopt.flow.export.KINDS: Whisper's, T5's and BART's encoders, CLIP's vision tower...) are run so, their
row's head naming what the export returns, e.g. `last_hidden_state (as deployed)`. A text family is
excluded, with a row saying why, when its config or classes say it is
not a text encoder: an encoder-decoder (`is_encoder_decoder`), a composite model (a sub-config set, e.g.
text_config + vision_config), a model whose main input is not `input_ids` (time series) or whose forward
takes no `input_ids`, a decoder-only model (a
causal-LM class and no masked-LM class in the mappings, or, found once the model is built, a self-attention
module with `is_causal` set), or one with only a base-model class (bertopt exports a QA or classification
head). Every other family is exported at tiny size with each exporter of `--exporters` and run through
`default`; each row says whether it exported (or why not), which passes changed the graph, parity, ATC
legality for the CANN version (`--cann`, default: bertopt's), the attention blocks in ATC's form, the
predicted fusion, and the run's outcome or its refusal's line.

Decisions where the issue was silent:
- Tiny config: the family's config class defaults with hidden 32, 2 heads, 2 layers, intermediate 64, vocab
  1000 and 128 positions, set through the config's own names (its `attribute_map`); other integer fields
  equal to the default hidden, intermediate (else 4 x hidden) or head sizes, layer counts and vocabularies
  shrink alike, and special token ids outside the new vocabulary are moved inside it. A family whose tiny
  model does not run on bertopt's export inputs is tried at its default widths (2 layers, small vocabulary)
  and with its other head, and the row says which ran. Weights are seeded random with biases and
  LayerNorm perturbed (bertopt.flow.export.random_source).
- Attention: what transformers gives by default, `sdpa` where the class supports it, else `eager` (an
  exporter spec may force one: `legacy14:eager`). Head: QA where the family has it, else classification.
- A traceback from bertopt's own code, the exporter's included, is a `crashed` row (its traceback kept
  beside the row in --work); a failure inside torch or transformers is `not-exported`.
- Shape: batch 2, seq 16 (the tests' tiny shape); the run is bertopt.flow.run.run, i.e. `bertopt run`, with the
  exit code the CLI would give (0 result, 1 failed check, 2 refusal).
- Isolation: each row runs in a subprocess of its own (this file with --worker) under a timeout and an
  address-space cap, so one bad family cannot take the tool down; a row that dies is a `crashed` row.
- Resumable: each finished row is kept in `--work` (default .cache/compat-matrix) under a key of the
  family, exporter, CANN version and a hash of bertopt's sources, so a re-run redoes only what is missing
  or stale; exports are reused from bertopt's export cache.
COMPATIBILITY.md (and the JSON beside it) is generated: never edit it by hand, re-run this tool.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import resource
import subprocess
import sys
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from bench_pipeline import environment

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "COMPATIBILITY.md"
DEFAULT_WORK = REPO / ".cache" / "compat-matrix"
# spec -> (exporter, opset); a spec may end in ":eager" or ":sdpa" to force the attention implementation
EXPORTER_SPECS = {"legacy14": ("legacy", 14), "legacy17": ("legacy", 17), "dynamo18": ("dynamo", 18)}
DEFAULT_EXPORTERS = "legacy14,legacy17,dynamo18"
BATCH, SEQ = 2, 16
HEAD_SIZE_NAMES = ("d_kv",)  # per-head sizes not named "head" (T5Config.d_kv)
CONTENT_HEADS = ("image-cls", "audio-cls")  # run whatever the config says: the classifier alone is exported
TINY = {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2, "intermediate_size": 64,
        "vocab_size": 1000, "max_position_embeddings": 128}
TINY_HEAD_DIM = TINY["hidden_size"] // TINY["num_attention_heads"]
STATUSES = {  # status -> what it means in the summary, in the order the summary lists them
    "ok": "exit 0: parity passes, legal for ATC, every attention block in ATC's form",
    "ok-not-atc-form": "exit 0: parity passes and legal for ATC, but not every attention block is in ATC's form",
    "failed": "exit 1: a check failed (parity, or not legal for the CANN version)",
    "refused": "exit 2: refused with one line",
    "crashed": "a traceback, a timeout or a killed process (a bertopt bug)",
    "not-exported": "the export itself failed in torch or transformers (a failure in bertopt's exporter is crashed)",
    "excluded": "not a text encoder with a QA or classification head, nor an image or audio classifier (why: its row)",
}


@dataclass
class Family:
    name: str
    heads: list[str]  # the heads bertopt can export that the family has, in HEAD_MAPPINGS' order
    model_class: str  # the class of its first head (else its base model)
    excluded: str | None = None  # why the family is not run

    @property
    def head(self) -> str | None:
        """The row's head: for a family bertopt exports as deployed, what that export returns."""
        return deployed_as(self.name) or (self.heads[0] if self.heads else None)


def deployed_as(name: str) -> str | None:
    """'<outputs> (as deployed)' for a family bertopt exports as users deploy it (bertopt.flow.export.KINDS:
    ViT's logits, CLIP's image_embeds, the encoders' last_hidden_state), whatever head the row asked for."""
    from bertopt.flow.export import KINDS

    kind = KINDS.get(name)
    return f"{', '.join(kind.outputs)} (as deployed)" if kind else None


# --------------------------------------------------------------------------- discovery

def head_mappings() -> dict[str, dict]:
    """bertopt's export heads -> transformers' auto mapping (model type -> class names) of that head."""
    from transformers.models.auto import modeling_auto as auto

    return {"qa": auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES, "cls": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
            "image-cls": auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
            "audio-cls": auto.MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES}


def discover_families(selected: list[str] | None = None) -> list[Family]:
    """Every model type with a class of a head bertopt exports (`head_mappings`) or a base-model class (or
    those of `selected` among them), each classified. A selected name the mappings do not have is a SystemExit."""
    from transformers.models.auto import modeling_auto as auto

    mappings, base = head_mappings(), auto.MODEL_MAPPING_NAMES
    decoders = set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    known = sorted(set(base).union(*mappings.values()))
    unknown = sorted(set(selected or ()) - set(known))
    if unknown:
        raise SystemExit(f"compat_matrix: {', '.join(unknown)}: not in transformers' auto mappings")
    families = []
    for name in selected or known:
        heads = [head for head, mapping in mappings.items() if name in mapping]
        class_name = _first_name(mappings[heads[0]][name] if heads else base[name])
        families.append(Family(name, heads, class_name, _exclusion(name, heads, class_name, name in decoders)))
    return families


def _first_name(names: str | tuple[str, ...]) -> str:
    return names if isinstance(names, str) else names[0]


def _exclusion(name: str, heads: list[str], class_name: str, decoder: bool) -> str | None:
    """Why the family is neither a text encoder bertopt can be asked to run nor an image or audio classifier,
    from its config and classes."""
    import transformers
    from transformers import AutoConfig

    from bertopt.flow.export import CONTENT_INPUTS

    try:
        config = AutoConfig.for_model(name)
    except Exception as exc:  # a family whose config cannot even be built with its defaults
        return f"its config cannot be built: {one_line(exc)}"
    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        return f"transformers has no class {class_name}"
    if set(heads) & set(CONTENT_HEADS) or (heads and deployed_as(name)):
        return None
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder (config.is_encoder_decoder)"
    sub_configs = [key for key in getattr(config, "sub_configs", {}) if getattr(config, key, None) is not None]
    if sub_configs:
        return f"composite model (sub-configs {', '.join(sub_configs)})"
    main_input = getattr(model_class, "main_input_name", "input_ids")
    if main_input in CONTENT_INPUTS:
        modality = CONTENT_INPUTS[main_input]
        return f"{modality} base model only (main input {main_input}): no {modality}-classification class to export"
    if main_input != "input_ids":
        return f"not a text model (main input {main_input})"
    if "input_ids" not in inspect.signature(model_class.forward).parameters:
        return f"not a text model ({class_name}.forward takes no input_ids)"
    if decoder:
        return "decoder-only (a causal-LM class and no masked-LM class)"
    if not heads:
        return "base model only: no question-answering or sequence-classification class to export"
    return None


def tiny_config(name: str, *, narrow: bool = True) -> dict:
    """Config overrides making `name` tiny, through the config's own field names (see the docstring).

    `narrow=False` keeps the default widths (hidden, heads, intermediate) and shrinks only the layers,
    vocabularies and positions: the fallback for a family whose widths are tied in ways the generic
    rules do not know (e.g. LayoutLMv3's 4 coordinate + 2 shape embeddings that must add up to hidden).
    """
    from transformers import AutoConfig

    default = AutoConfig.for_model(name)
    values = {key: value for key, value in default.to_dict().items() if _is_int(value)}
    names = {standard: getattr(default, "attribute_map", {}).get(standard, standard) for standard in TINY}
    kept = () if narrow else ("hidden_size", "num_attention_heads", "intermediate_size")
    overrides = {names[s]: tiny for s, tiny in TINY.items()
                 if s not in kept and (values.get(names[s], 0) > tiny or _unset(default, names[s]))}
    if not narrow:
        return {**overrides, **_shrunk_counts(values, overrides, {}, None),
                **_token_ids_inside(values, overrides.get(names["vocab_size"]))}
    hidden = values.get(names["hidden_size"])
    # a config without an intermediate_size names it its own way (d_inner): the usual 4 x hidden finds it
    intermediate = values.get(names["intermediate_size"]) or (4 * hidden if hidden else None)
    sizes = {size: tiny for size, tiny in ((hidden, TINY["hidden_size"]), (intermediate, TINY["intermediate_size"]))
             if size}
    heads = values.get(names["num_attention_heads"])
    head_dim = hidden // heads if heads and hidden else None
    return {**overrides, **_shrunk_counts(values, overrides, sizes, head_dim),
            **_token_ids_inside(values, overrides.get(names["vocab_size"]))}


def _shrunk_counts(values: dict, overrides: dict, sizes: dict, head_dim: int | None) -> dict:
    """The other integer fields: default widths (`sizes`), head dims, layer counts and vocabularies."""
    found = {}
    for key, value in values.items():
        if key in overrides or key.endswith(("_id", "_index")):
            continue
        if value in sizes:
            found[key] = sizes[value]
        elif ("head" in key or key in HEAD_SIZE_NAMES) and value == head_dim:
            found[key] = TINY_HEAD_DIM
        elif key.endswith("layers") and value > TINY["num_hidden_layers"]:
            found[key] = TINY["num_hidden_layers"]
        elif "vocab_size" in key and value > TINY["vocab_size"]:
            found[key] = TINY["vocab_size"]
    return found


def _unset(config, name: str) -> bool:
    """A size field the config has but leaves None (ESM's vocab_size): the model cannot be built without it."""
    fields = config.to_dict()
    return name in fields and fields[name] is None


def _token_ids_inside(values: dict, vocab: int | None) -> dict:
    """Special token ids at or past a shrunk vocabulary, moved to its last rows (distinct ones stay distinct)."""
    if vocab is None:
        return {}
    outside = sorted({v for k, v in values.items() if k.endswith("token_id") and v >= vocab})
    moved = {old: vocab - 1 - index for index, old in enumerate(outside)}
    return {k: moved[v] for k, v in values.items() if k.endswith("token_id") and v in moved}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def default_attention(class_name: str) -> str:
    """What transformers picks when the user asks for nothing: sdpa where the class supports it."""
    import transformers

    return "sdpa" if getattr(getattr(transformers, class_name), "_supports_sdpa", False) else "eager"


def causal_attention(model) -> str | None:
    """The first self-attention module built causal (a decoder's), by class name, or None."""
    return next((type(m).__name__ for m in model.modules() if getattr(m, "is_causal", False) is True), None)


# --------------------------------------------------------------------------- one row (in a worker process)

def worker_row(family: Family, spec: str, work: Path, cann: str | None) -> dict:
    """Export one family with one exporter and run `default` on it. Raises only on a bertopt bug (a
    traceback from bertopt's own code), which worker_main records as a crashed row."""
    from bertopt.errors import BertoptError, first_line
    from bertopt.flow.export import default_cache_dir, export_onnx

    exporter, opset, attention = parse_spec(spec, family.model_class)
    row = {"family": family.name, "exporter": spec, "head": family.head, "attention": attention}
    model = runnable_model(family, attention)
    if isinstance(model, str):
        return {**row, "status": "not-exported", "detail": model}
    if model.causal:
        return {**row, "status": "excluded",
                "detail": f"decoder-only (causal self-attention: {model.causal}.is_causal)"}
    row.update(head=family.head if deployed_as(family.name) else model.head, config=model.overrides,
               size="tiny" if model.narrow else "default widths, 2 layers")
    onnx_path = work / "exports" / f"{family.name}-{spec.replace(':', '-')}.onnx"
    try:
        exported = export_onnx(model.source, onnx_path, exporter=exporter, opset=opset, attention=attention,
                               head=model.head, cache_dir=default_cache_dir())
    except BertoptError as exc:
        return {**row, "exit": exc.exit_code, "status": "refused", "detail": f"export: {first_line(exc)}"}
    except Exception as exc:
        if raised_in_bertopt(exc):
            raise  # bertopt's exporter itself broke: worker_main records the traceback
        return {**row, "status": "not-exported", "detail": one_line(exc)}
    row["export_cached"] = exported.cached
    try:
        return {**row, **_run_default(onnx_path, work / "runs" / onnx_path.stem, cann)}
    except BertoptError as exc:
        return {**row, "exit": exc.exit_code, "status": "failed" if exc.exit_code == 1 else "refused",
                "detail": first_line(exc)}


@dataclass
class Runnable:
    source: object  # bertopt.flow.export.ExportSource
    head: str
    overrides: dict
    narrow: bool  # tiny widths (else the family's default widths, see tiny_config)
    causal: str | None  # the class of a self-attention module built causal, if any


def runnable_model(family: Family, attention: str) -> Runnable | str:
    """The first model of the family that runs on the inputs bertopt exports with: tiny, else at its
    default widths (tiny_config's `narrow`), with each head the family has (Longformer's QA head wants
    three separators in every row, its classifier does not). A string saying why when none runs."""
    import torch

    from bertopt.errors import BertoptError, first_line
    from bertopt.flow.export import ExportWrapper, random_source

    failures = []
    for narrow in (True, False):
        for head in family.heads:
            overrides = tiny_config(family.name, narrow=narrow)
            source = random_source(family.name, overrides)
            try:
                model = source.build(attention, head)
                causal = causal_attention(model)
                if causal:  # a decoder is excluded whether or not it runs on bertopt's inputs
                    return Runnable(source, head, overrides, narrow, causal)
                wrapper = ExportWrapper(model, head)
                with torch.no_grad():
                    wrapper(*wrapper.trace_inputs())
            except BertoptError as exc:  # bertopt refused the model in one line (an input layout it does not know)
                failures.append(first_line(exc))
                continue
            except Exception as exc:
                if raised_in_bertopt(exc):
                    raise
                failures.append(one_line(exc))
                continue
            return Runnable(source, head, overrides, narrow, None)
    return f"no model of it runs on bertopt's export inputs ({len(failures)} tried), the first: {failures[0]}"


def raised_in_bertopt(exc: BaseException) -> bool:
    """bertopt's code raised it, an attribute lookup it made included (a config field the family lacks): a
    bertopt bug, not the family's. Raised deeper, in torch or transformers, it is the family's."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.name not in ("__getattribute__", "__getattr__")]
    return bool(frames) and _is_bertopt(frames[-1])


def bertopt_frame(exc: BaseException) -> str:
    """Where in bertopt's own code (the innermost of its frames) `exc` went through: path:line function."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _is_bertopt(f)]
    if not frames:
        return "no bertopt frame"
    return f"{Path(frames[-1].filename).resolve().relative_to(REPO)}:{frames[-1].lineno} {frames[-1].name}"


def _is_bertopt(frame: traceback.FrameSummary) -> bool:
    path = Path(frame.filename).resolve()
    return path.is_relative_to(REPO / "bertopt") or path.is_relative_to(REPO / "passes")


def _run_default(onnx_path: Path, output: Path, cann: str | None) -> dict:
    from bertopt.flow.run import RunConfig, run

    report = run(RunConfig(model=str(onnx_path), batch=BATCH, seq=SEQ, output=output, force=True, cann=cann))
    check = report.ascend.check
    problems = report.failures()
    emulation = next((c for c in report.validation if c.kind == "emulation" and not c.informational), None)
    conforming = sum(block.conforming for block in check.blocks)
    status = "failed" if problems else "ok" if check.blocks_conforming else "ok-not-atc-form"
    return {
        "status": status, "exit": 1 if problems else 0, "detail": "; ".join(problems) or _first_form_failure(check),
        "passes": [record.name for record in report.passes if record.changed],
        "parity": _verdict(report.validation[0]),
        "emulation": _verdict(emulation) if emulation else "not run",
        "cann": check.cann,
        "legal": "yes" if check.model_conforming else "no: " + "; ".join(check.failure_summary(require_fusion=False)),
        "atc_form": f"{conforming}/{len(check.blocks)}" + _failing(check),
        "fusion": _fusion_cell(check.fusion),
        "facts": {k: report.facts.to_dict()[k] for k in ("family", "num_layers", "hidden", "heads", "mask_kind")},
    }


def _verdict(candidate) -> str:
    if candidate.comparison is None:
        return f"not run: {candidate.error or candidate.skipped}"
    worst = max(stats.max_abs for stats in candidate.comparison.outputs)
    return f"{'pass' if candidate.passed else 'FAIL'} (max abs {worst:.1e})"


def _failing(check) -> str:
    failing = sorted(check.failing_conditions())
    return f" (fails: {', '.join(failing)})" if failing else ""


def _first_form_failure(check) -> str:
    """Why the first block that is not in ATC's form is not (empty when every block is)."""
    failed = (c for block in check.blocks for c in block.checks if c.ok is False)
    first = next(failed, None)
    return f"{first.name}: {first.reason}" if first else ("no attention block found" if not check.blocks else "")


def _fusion_cell(fusion) -> str:
    """Blocks predicted to fuse, then which of ATC's fusions stop, by kind of verdict (shape, form...)."""
    stops: dict[str, list[str]] = {}
    for _, verdict in fusion.grouped():
        names = stops.setdefault(verdict.verdict, [])
        if not verdict.fuses and verdict.fusion not in names:
            names.append(verdict.fusion)
    fused = sum(block.fuses for block in fusion.blocks)
    return f"{fused}/{len(fusion.blocks)}" + "".join(f"; {kind}: {', '.join(names)}" for kind, names in stops.items()
                                                   if names)


def parse_spec(spec: str, class_name: str) -> tuple[str, int, str]:
    name, _, attention = spec.partition(":")
    exporter, opset = EXPORTER_SPECS[name]
    return exporter, opset, attention or default_attention(class_name)


def one_line(exc: BaseException) -> str:
    from bertopt.errors import first_line

    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", first_line(exc))  # torch's messages carry terminal colours
    return f"{type(exc).__name__}: {text}"[:300]


def worker_main(family_json: str, spec: str, work: Path, cann: str | None, row_path: Path) -> int:
    family = Family(**json.loads(family_json))
    try:
        row = worker_row(family, spec, work, cann)
    except Exception as exc:  # anything bertopt let through: the traceback is the bug report
        trace = row_path.with_suffix(".traceback.txt")
        trace.write_text(traceback.format_exc())
        row = {"family": family.name, "exporter": spec, "head": family.head,
               "attention": parse_spec(spec, family.model_class)[2], "status": "crashed",
               "detail": f"traceback ({trace.name}): {one_line(exc)} (raised in {bertopt_frame(exc)})"}
    row["code"] = code_fingerprint()  # the sources this row ran with (they may change under a long run)
    row_path.write_text(json.dumps(row, indent=1, default=str))
    return 0


# --------------------------------------------------------------------------- scheduling (the parent)

def code_fingerprint() -> str:
    """bertopt's sources (library, passes and data): a row made by other code is stale. This tool is not
    in it (its tables change more often than its rows): after changing how rows are made, delete --work."""
    digest = hashlib.sha256()
    files = sorted([*(REPO / "bertopt").rglob("*.py"), *(REPO / "bertopt" / "data").glob("*.json"),
                    *(REPO / "passes").glob("*.py")])
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git_state() -> str:
    """The checkout's commit, and whether bertopt's sources differ from it (the rows ran on the files)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "bertopt", "passes"], capture_output=True,
                           text=True, cwd=REPO)
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" with uncommitted changes to bertopt" if dirty.stdout.strip() else "")


def spawn_row(family: Family, spec: str, work: Path, cann: str | None, timeout: float, memory_gib: float,
              code: str) -> dict:
    """One row in its own process (timeout, address-space cap); reuses a finished row that ran on the same
    `code` (code_fingerprint) for the same CANN version."""
    stem = f"{family.name}-{spec.replace(':', '-')}-cann{cann or 'default'}"
    for done in sorted((work / "rows").glob(f"{stem}-*.json")):
        row = json.loads(done.read_text())
        if row.get("code") == code:
            return row
    row_path = work / "rows" / f"{stem}-{code}.json"
    row_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--worker", json.dumps(asdict(family)), "--exporters", spec,
               "--work", str(work), "--row", str(row_path)] + (["--cann", cann] if cann else [])
    cap = int(memory_gib * 2**30)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)))
    except subprocess.TimeoutExpired:
        return _died(family, spec, f"timed out after {timeout:.0f} s")
    if not row_path.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return _died(family, spec, f"worker exited {done.returncode} ({_signal_name(done.returncode)}): {last}")
    row = json.loads(row_path.read_text())
    row["seconds"] = round(time.perf_counter() - start, 1)
    row_path.write_text(json.dumps(row, indent=1, default=str))
    return row


def _died(family: Family, spec: str, why: str) -> dict:
    """A worker that died is a row too, not kept: the next run tries it again."""
    return {"family": family.name, "exporter": spec, "head": family.head, "status": "crashed", "detail": why}


def _signal_name(code: int) -> str:
    import signal

    return f"killed by {signal.Signals(-code).name}" if code < 0 else "no row written"


def excluded_row(family: Family) -> dict:
    return {"family": family.name, "exporter": "-", "head": family.head, "status": "excluded",
            "detail": family.excluded}


# --------------------------------------------------------------------------- COMPATIBILITY.md

def render(rows: list[dict], meta: dict) -> str:
    run_rows = [r for r in rows if r["exporter"] != "-" and r["status"] != "excluded"]
    excluded = sorted((r for r in rows if r["status"] == "excluded"), key=lambda r: r["family"])
    lines = ["<!-- Generated by tools/compat_matrix.py: do not edit by hand; re-run the command below. -->",
             "# Compatibility: every encoder family and image or audio classifier transformers ships, through `default`",
             "",
             f"Generated {meta['date']} by `{meta['command']}`.  ",
             f"Machine: {meta['machine']}.  ", f"bertopt: git {meta['git']}, sources {meta['code']}.  ",
             f"Target: CANN {meta['cann']} (ATC legality and form), {meta['soc']}; every model is tiny "
             f"(hidden {TINY['hidden_size']}, {TINY['num_attention_heads']} heads, {TINY['num_hidden_layers']} "
             f"layers, random seeded weights) and run at batch {BATCH}, seq {SEQ} (image and audio models at their "
             "config's input size), so ATC's attention kernels are "
             "never predicted to fuse: their shape gates want hidden 768 or 1024. The JSON beside this file holds "
             "every row in full (configs, facts, timings).", "",
             *_drift_note(run_rows, meta["code"]),
             "Families are discovered from transformers' auto mappings (question answering, sequence "
             "classification, image classification, audio classification, base model); see `tools/compat_matrix.py` for how each is made tiny and why some "
             "are excluded.", "", *summary(run_rows, excluded, meta["exporters"]), "",
             "## Families run", "",
             "| family | exporter | head, attention | outcome | passes that changed the graph | parity (fp32) "
             "| emulation (fp16) | legal | ATC form (blocks) | fusion predicted | detail |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_table_row(r) for r in sorted(run_rows, key=lambda r: (r["family"], r["exporter"]))]
    lines += ["", "## Families excluded", "", "| family | why |", "|---|---|"]
    lines += [f"| {r['family']} | {_cell(r['detail'])} |" for r in excluded]
    return "\n".join(lines) + "\n"


def _drift_note(rows: list[dict], code: str) -> list[str]:
    """Rows made while bertopt's sources changed under the run (another checkout's edits) say so."""
    other = sum(row.get("code", code) != code for row in rows)
    return [f"**{other} of {len(rows)} rows ran on bertopt sources other than the run's ({code}): re-run to "
            "refresh them.**", ""] if other else []


def summary(run_rows: list[dict], excluded: list[dict], exporters: list[str]) -> list[str]:
    families = sorted({r["family"] for r in run_rows})
    lines = ["## Summary", "",
             f"{len(families)} families run with {len(exporters)} exporter(s) ({', '.join(exporters)}): "
             f"{len(run_rows)} rows; {len({r['family'] for r in excluded})} families excluded.", "",
             "| outcome | meaning | " + " | ".join(exporters) + " |", "|---|---|" + "---:|" * len(exporters)]
    for status, meaning in STATUSES.items():
        if status == "excluded":
            continue
        counts = [sum(r["status"] == status and r["exporter"] == spec for r in run_rows) for spec in exporters]
        lines.append(f"| {status} | {meaning} | " + " | ".join(map(str, counts)) + " |")
    lines += [""] + [f"{label} ({len(names)}): {', '.join(names) or 'none'}." for label, names in (
        ("In ATC's form with every exporter", _families_where(run_rows, families, {"ok"})),
        ("Exact and legal with every exporter, not always in ATC's form",
         _families_where(run_rows, families, {"ok-not-atc-form"}, {"ok", "ok-not-atc-form"})))]
    lines += ["", "Reasons, grouped (rows that did not end `ok`):", ""]
    reasons = Counter((r["status"], _reason_group(r)) for r in run_rows if r["status"] != "ok")
    lines += [f"- {status}, {count} row(s): {reason}" for (status, reason), count in sorted(
        reasons.items(), key=lambda item: (list(STATUSES).index(item[0][0]), -item[1]))]
    why = Counter(_exclusion_group(r["detail"]) for r in excluded)
    lines += ["", "Excluded, grouped: " + "; ".join(f"{reason} ({n})" for reason, n in why.most_common()) + "."]
    return lines


def _families_where(rows: list[dict], families: list[str], some: set[str], every: set[str] | None = None) -> list[str]:
    """Families all of whose rows are in `every` (default `some`) and at least one in `some`."""
    by_family = {f: {r["status"] for r in rows if r["family"] == f} for f in families}
    return [f for f, found in by_family.items() if found <= (every or some) and found & some]


def _reason_group(row: dict) -> str:
    """The row's reason without the numbers, names and files that differ between rows of one cause."""
    import re

    text = row["detail"] if row["status"] != "ok-not-atc-form" else "ATC form fails: " + row["atc_form"].split(
        "(fails: ", 1)[-1].rstrip(")")
    text = re.sub(r"^traceback \([^)]*\): ", "traceback: ", text)
    return re.sub(r"(?<!\w)'[^']*'|\b\d+(\.\d+)?(e[+-]?\d+)?\b", "N", text)[:200] or "(no detail)"


def _exclusion_group(detail: str) -> str:
    return detail.split(" (")[0].split(":")[0]


def _table_row(r: dict) -> str:
    cells = [r["family"], r["exporter"], f"{r.get('head')}, {r.get('attention', '-')}", r["status"],
             ", ".join(r.get("passes", [])) or "-", r.get("parity", "-"), r.get("emulation", "-"),
             r.get("legal", "-"), r.get("atc_form", "-"), r.get("fusion", "-"), r.get("detail", "")]
    return "| " + " | ".join(_cell(str(c)) for c in cells) + " |"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_outputs(rows: list[dict], meta: dict, output: Path) -> None:
    from bertopt.files import write_json, write_text

    write_text(output, render(rows, meta))
    write_json(output.with_suffix(".json"), {"meta": meta, "rows": rows})


# --------------------------------------------------------------------------- command line

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", help="comma list of model types (default: every one discovered)")
    parser.add_argument("--exporters", default=DEFAULT_EXPORTERS,
                        help=f"comma list of {', '.join(EXPORTER_SPECS)}, each optionally :eager or :sdpa")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the Markdown; the JSON goes beside it")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="finished rows, exports and run folders")
    parser.add_argument("--cann", help="CANN version of the target (default: bertopt's)")
    parser.add_argument("--jobs", type=int, default=1, help="rows at once")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per row")
    parser.add_argument("--memory-gib", type=float, default=6, help="address-space cap per row")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--row", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for spec in args.exporters.split(","):
        name, _, attention = spec.partition(":")
        if name not in EXPORTER_SPECS or attention not in ("", "eager", "sdpa"):
            parser.error(f"--exporters: {spec!r} is not one of {', '.join(EXPORTER_SPECS)} (optionally :eager/:sdpa)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.exporters, args.work, args.cann, args.row)
    from bertopt.ascend.cann import resolve_cann
    from bertopt.ascend.soc import DEFAULT_SOC

    families = discover_families(args.families.split(",") if args.families else None)
    specs = args.exporters.split(",")
    jobs = [(f, spec) for f in families if not f.excluded for spec in specs]
    print(f"{len(families)} families, {len(jobs)} rows to run", file=sys.stderr)
    code = code_fingerprint()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda job: _announce(spawn_row(*job, args.work, args.cann, args.timeout,
                                                             args.memory_gib, code)), jobs))
    rows += [excluded_row(f) for f in families if f.excluded]
    meta = {"date": time.strftime("%Y-%m-%d"), "command": " ".join([".venv/bin/python tools/compat_matrix.py",
                                                                     *argv]),
            "machine": environment(), "cann": resolve_cann(args.cann)[0].version,
            "soc": DEFAULT_SOC, "exporters": specs, "batch": BATCH, "seq": SEQ, "code": code, "git": git_state()}
    write_outputs(rows, meta, args.output)
    print(f"wrote {args.output} and {args.output.with_suffix('.json')}", file=sys.stderr)
    return 0


def _announce(row: dict) -> dict:
    print(f"{row['family']:>24} {row['exporter']:<10} {row['status']:<16} {row.get('detail', '')[:110]}",
          file=sys.stderr, flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

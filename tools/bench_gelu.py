"""What each Gelu kernel does to a real model: emulated logit shift and SQuAD EM/F1 on `minilm`.

    .venv/bin/python tools/bench_gelu.py                          # minilm, tests/data/squad-mini.json, seq 384
    .venv/bin/python tools/bench_gelu.py --precisions force_fp16 --cann 5.0 --no-write

`minilm` (all-MiniLM-L6-v2's real encoder weights; its QA head is random, so absolute EM/F1 mean nothing
and the deltas against the original graph are what matters) is exported, optimized with the Ascend
`default` pipeline at batch x seq, and the SQuAD file is tokenised as `bertopt squad check` does.
Candidates, all run on the same features:

- the optimized graph in fp32 on ONNX Runtime (exact erf Gelu): the fp32 reference;
- the Ascend emulation (bertopt.validation.backends.emulation) for each Gelu kernel (`high_performance`, the
  seed's, and `high_precision`) under each precision mode in `--precisions`. `force_fp16` is ATC's
  default on 310P (what the seed's OM computes); `origin` keeps fp32 everywhere, so it shows the Gelu
  kernel's own effect without fp16 rounding; `mixed_float16` is the emulation's approximation of
  ATC's mixed precision (see bertopt.validation.backends.emulation).

Per candidate, against the ORIGINAL graph in fp32: the largest and the 99th-percentile absolute
difference of the start/end logits over real tokens (attention mask 1), EM and F1 with their deltas,
and the share of questions whose answer text is the original's. No timing: the emulation's speed says
nothing about the NPU's. The table goes into BENCHMARKS.md between this tool's markers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_pipeline import environment, write_section

BEGIN, END = "<!-- bench_gelu:begin -->", "<!-- bench_gelu:end -->"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / "tests" / "data" / "squad-mini.json"
GELUS = ("high_performance", "high_precision")


@dataclass
class Row:
    label: str
    max_shift: float
    p99_shift: float
    exact_match: float
    f1: float
    delta_em: float
    delta_f1: float
    same_answers: float


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seq", type=int, default=384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precisions", default="force_fp16,mixed_float16,origin")
    parser.add_argument("--cann", default=None, help="CANN version whose Gelu kernels to emulate (default 6.0)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-gelu-") as tmp:
        rows, info = measure(args, Path(tmp))
    text = section(args, rows, info)
    print(text)
    if not args.no_write:
        write_section(text, BEGIN, END)


def measure(args: argparse.Namespace, folder: Path) -> tuple[list[Row], dict]:
    from bertopt.flow.run import optimize_file
    from bertopt.pipeline import PassManager, PassOptions
    from bertopt.squad.check import score_logits
    from bertopt.squad.data import load_examples
    from bertopt.squad.infer import run_features
    from bertopt.squad.model import load_tokenizer, obtain_model, tokenizer_folder
    from bertopt.squad.prep import prepare_features
    from bertopt.validation.backends.emulation import EmulationBackend
    from bertopt.validation.backends.ort import OrtBackend

    examples = load_examples(args.data)
    model = obtain_model(args.model, folder)
    source = tokenizer_folder(model)
    features = prepare_features(examples, load_tokenizer(source, model.facts.vocab_size), args.seq, None, str(source))
    optimized = folder / "optimized.onnx"
    optimize_file(model.onnx, optimized, PassManager("default", PassOptions(batch=args.batch, seq=args.seq)))
    feeds = {name: features.tokens[role] for name, role in model.inputs.items()}
    real = features.tokens["attention_mask"].astype(bool)

    candidates = [OrtBackend(model.onnx, name="original graph, fp32 (ORT CPU)"),
                  OrtBackend(optimized, name="optimized graph, fp32, exact Gelu (ORT CPU)")]
    candidates += [EmulationBackend(optimized, gelu=gelu, precision=precision, cann=args.cann)
                   for precision in args.precisions.split(",") for gelu in GELUS]
    rows, reference, notes = [], None, {}
    for candidate in candidates:
        print(f"running {candidate.name} on {len(features)} features", file=sys.stderr)
        start, end = run_features(candidate.run, feeds, args.batch)
        notes[candidate.name] = getattr(candidate, "notes", [])
        candidate.close()
        score = score_logits(candidate.name, candidate.name, examples, features, start, end)
        reference = reference or (start, end, score)
        rows.append(row(candidate.name, (start, end), reference, score, real))
    kernel = candidates[-1].gelu_kernel
    info = {"features": len(features), "questions": len(examples), "model": model.description,
            "kernels": {gelu: EmulationBackend(optimized, gelu=gelu, cann=args.cann).gelu_kernel.describe()
                        for gelu in GELUS},
            "cann": kernel.cann, "notes": {name: n for name, n in notes.items() if n}}
    return rows, info


def row(label: str, logits: tuple[np.ndarray, np.ndarray], reference, score, real: np.ndarray) -> Row:
    ref_start, ref_end, ref_score = reference
    shift = np.concatenate([np.abs(logits[0] - ref_start)[real], np.abs(logits[1] - ref_end)[real]])
    same = sum(score.predictions[q] == text for q, text in ref_score.predictions.items()) / len(ref_score.predictions)
    em, f1 = score.metrics.exact_match, score.metrics.f1
    return Row(label, float(shift.max()), float(np.percentile(shift, 99)), em, f1,
               em - ref_score.metrics.exact_match, f1 - ref_score.metrics.f1, same)


def section(args: argparse.Namespace, rows: list[Row], info: dict) -> str:
    command = " ".join(["    .venv/bin/python tools/bench_gelu.py", *sys.argv[1:]])
    data = args.data.relative_to(REPO) if args.data.is_relative_to(REPO) else args.data
    lines = ["## Gelu kernels on a real model (tools/bench_gelu.py)", "",
             f"{info['model']}, optimized with the Ascend `default` pipeline at batch {args.batch}, seq {args.seq}; "
             f"{info['questions']} questions of `{data}` "
             f"({info['features']} features). Emulated kernels (CANN {info['cann']}): "
             + "; ".join(f"`{gelu}` = {text}" for gelu, text in info["kernels"].items()) + ". "
             "Shifts are |logit - original fp32 logit| over real tokens of every feature (start and end); "
             "the QA head is random, so EM/F1 themselves mean little and the deltas and answer agreement "
             "are the measure. An emulation on ONNX Runtime, not an NPU.", "",
             "| candidate | max shift | p99 shift | EM | F1 | dEM | dF1 | same answers |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.label} | {r.max_shift:.4f} | {r.p99_shift:.4f} | {r.exact_match:.2f} | {r.f1:.2f} | "
              f"{r.delta_em:+.2f} | {r.delta_f1:+.2f} | {r.same_answers:.0%} |" for r in rows]
    for note in dict.fromkeys(n for notes in info["notes"].values() for n in notes):
        lines += ["", f"Emulation note ({', '.join(name for name, notes in info['notes'].items() if note in notes)}): "
                      f"{note}."]
    lines += ["", f"Machine: {environment()}.", "", "Command:", "", command]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

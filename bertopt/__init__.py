"""bertopt: a graph-surgery compiler frontend for BERT-family ONNX models.

What a user scripts with is here; every other module is internal and free to move.

    import bertopt

    report = bertopt.run("model.onnx", passes="default,my-pass", batch=2, seq=16, target="ort")
    bertopt.optimize("model.onnx", "out.onnx", "default", batch=1, seq=384)
    bertopt.check("out.onnx", cann="8.0.RC2").failure_summary()
    bertopt.validate("model.onnx", "out.onnx").passed

Writing a pass: `register_pass`, `PassResult`, `PassOptions`, `ModelFacts`; rules (`Rule`, `apply_rules`)
over patterns (`Op`, `Const`, `Var`, `OneOf`, `Pattern`) rewritten with a `Builder`. Passes outside this
package: the `bertopt.passes` entry-point group, or `load_passes(FILE_OR_MODULE)`. Running passes in a
script: `PassManager` with `Instruments` or your own `Instrument`. Testing them: `bertopt.testing`.

Importing bertopt imports nothing else: each name loads its module on first use (PEP 562), so
`import bertopt` costs no torch, ONNX Runtime or onnx import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "optimize": "bertopt.api", "run": "bertopt.api", "check": "bertopt.api", "validate": "bertopt.api",
    "register_pass": "bertopt.pipeline", "load_passes": "bertopt.pipeline", "PassResult": "bertopt.pipeline",
    "PassOptions": "bertopt.pipeline", "PassManager": "bertopt.pipeline", "Instrument": "bertopt.pipeline",
    "Instruments": "bertopt.pipeline",
    "Rule": "bertopt.graph.rules", "apply_rules": "bertopt.graph.rules", "RuleResult": "bertopt.graph.rules",
    "Builder": "bertopt.graph.builder",
    "Op": "bertopt.graph.pattern", "Const": "bertopt.graph.pattern", "Var": "bertopt.graph.pattern", "OneOf": "bertopt.graph.pattern",
    "Pattern": "bertopt.graph.pattern", "Match": "bertopt.graph.pattern",
    "ModelFacts": "bertopt.model.facts",
    "BertoptError": "bertopt.errors", "CheckFailed": "bertopt.errors",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from bertopt.api import check, optimize, run, validate
    from bertopt.errors import BertoptError, CheckFailed
    from bertopt.graph.builder import Builder
    from bertopt.graph.pattern import Const, Match, OneOf, Op, Pattern, Var
    from bertopt.graph.rules import Rule, RuleResult, apply_rules
    from bertopt.model.facts import ModelFacts
    from bertopt.pipeline import (Instrument, Instruments, PassManager, PassOptions, PassResult, load_passes,
                                  register_pass)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bertopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


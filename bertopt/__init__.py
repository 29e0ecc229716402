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
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "optimize": "bertopt.api", "run": "bertopt.api", "check": "bertopt.api", "validate": "bertopt.api",
    "register_pass": "bertopt.pipeline", "load_passes": "bertopt.pipeline", "PassResult": "bertopt.pipeline",
    "PassOptions": "bertopt.pipeline", "PassManager": "bertopt.pipeline", "Instrument": "bertopt.pipeline",
    "Instruments": "bertopt.pipeline",
    "Rule": "bertopt.rules", "apply_rules": "bertopt.rules", "RuleResult": "bertopt.rules",
    "Builder": "bertopt.builder",
    "Op": "bertopt.pattern", "Const": "bertopt.pattern", "Var": "bertopt.pattern", "OneOf": "bertopt.pattern",
    "Pattern": "bertopt.pattern", "Match": "bertopt.pattern",
    "ModelFacts": "bertopt.facts",
    "BertoptError": "bertopt.errors", "CheckFailed": "bertopt.errors",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from bertopt.api import check, optimize, run, validate
    from bertopt.builder import Builder
    from bertopt.errors import BertoptError, CheckFailed
    from bertopt.facts import ModelFacts
    from bertopt.pattern import Const, Match, OneOf, Op, Pattern, Var
    from bertopt.pipeline import (Instrument, Instruments, PassManager, PassOptions, PassResult, load_passes,
                                  register_pass)
    from bertopt.rules import Rule, RuleResult, apply_rules


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bertopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """bertopt's module object. `bertopt.run` and `bertopt.validate` are the API's functions although
    bertopt/run.py and bertopt/validate.py are modules too: importing a submodule sets it as an attribute
    of its package (importlib's _find_and_load), which would hide the function for good. These two
    properties keep the function and ignore that assignment; the modules stay importable by name
    (`from bertopt.run import RunConfig`). They go when those modules move into subpackages."""

    run = property(lambda self: __getattr__("run"), lambda self, module: None)
    validate = property(lambda self: __getattr__("validate"), lambda self, module: None)


sys.modules[__name__].__class__ = _Package

"""Finding and importing passes that live outside bertopt: the `bertopt.passes` entry-point group and
`--passes-from FILE_OR_MODULE`. The registry's bookkeeping (what each import registered, where a pass
came from, undoing a broken plugin's registrations) is bertopt.pipeline's; this module only imports.

What an entry point names (decision for issue 13): a MODULE, imported for its side effect. Its
`@bertopt.register_pass` decorators register its passes, as bertopt's own pass modules do, so one module
may register several passes, and the passes keep the names they register. The entry point's own name
only labels the plugin (in `bertopt passes` and in errors). A user's package declares it in its own
metadata, nothing in bertopt changes:

    [project.entry-points."bertopt.passes"]
    div-to-mul = "my_package.div_to_mul"

A value of the form `module:attribute` is loaded as well (the import is what registers; the attribute is
looked up, so a typo in it is an error too). Entry points are found once per process, from the installed
distributions' metadata (importlib.metadata), the first time the registry is read.

`--passes-from` takes a Python file (a path, or any name ending in .py) or an importable module name;
a file is imported under a module name made from its absolute path, so spawned sweep workers that load
it again get the same module.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

from bertopt.errors import BertoptError

ENTRY_POINT_GROUP = "bertopt.passes"
OPTION = "--passes-from"


def installed_plugins() -> list[importlib.metadata.EntryPoint]:
    """The `bertopt.passes` entry points of the installed distributions, in a stable order."""
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return sorted(found, key=lambda ep: (_distribution(ep), ep.name))


def entry_point_origin(ep: importlib.metadata.EntryPoint) -> str:
    """How `bertopt passes` and errors name an entry point: its name, its value and its distribution."""
    version = f" {ep.dist.version}" if ep.dist is not None else ""
    return f"entry point {ep.name} = {ep.value} ({_distribution(ep)}{version})"


def _distribution(ep: importlib.metadata.EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "unknown distribution"


def resolve_source(text: str) -> str:
    """What `--passes-from` names, as every process can load it: a file's absolute path, or a module name.

    Raises BertoptError for a file that does not exist, a folder, or text that is neither."""
    path = Path(text).expanduser()
    if text.endswith(".py") or "/" in text or path.exists():
        if path.is_dir():
            raise BertoptError(f"{OPTION} {text}: a folder; give a Python file or an importable module name")
        if not path.is_file():
            raise BertoptError(f"{OPTION} {text}: no such file")
        return str(path.resolve())
    if not all(part.isidentifier() for part in text.split(".")):
        raise BertoptError(f"{OPTION} {text!r}: neither a Python file nor a module name")
    return text


def is_file_source(source: str) -> bool:
    """Whether a resolved source is a file (else a module name)."""
    return source.startswith("/")


def source_origin(source: str) -> str:
    """How `bertopt passes` and errors name a resolved `--passes-from` source."""
    return f"file {source}" if is_file_source(source) else f"module {source}"


def import_source(source: str) -> ModuleType:
    """Import a resolved source (a file by path, a module by name); whatever the import raises, propagates."""
    if not is_file_source(source):
        return importlib.import_module(source)
    name = _module_name(Path(source))
    if name in sys.modules:
        return sys.modules[name]
    loader = importlib.machinery.SourceFileLoader(name, source)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, source, loader=loader))
    sys.modules[name] = module  # before running it, as an import does: dataclasses and pickling look it up
    try:
        loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _module_name(path: Path) -> str:
    """One name per file, the same in every process: its stem and a hash of its absolute path."""
    stem = re.sub(r"\W", "_", path.stem)
    return f"bertopt_passes_from_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"

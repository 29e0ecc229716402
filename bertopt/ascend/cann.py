"""The CANN version as a target: what its ATC accepts, as data keyed by version.

The data is ``bertopt/data/cann.json``: per CANN version the opset range ATC's ONNX parser takes, the
IR version, the operator list, per-operator opset ranges where the docs give them, whether ONNX
LayerNormalization is in the list, which precision flags exist and whether the implmode flags are
on their way out; every field with the page or source it was read from (``CannTarget.sources``).

A version a user types ("6.0", "6.0.1", "6.0.RC1", "8.0.RC2", "8.5.0") maps to the nearest known
version at or below it: a release between two documented ones is assumed to take what the older
one takes (a decision: the docs of every release were not read). Anything below the oldest known
version, or not a version at all, is refused.

Without ``--cann``, the installed toolkit's version is used, read from the files its installer writes
under a toolkit home (``$ASCEND_TOOLKIT_HOME``, what ``set_env.sh`` exports, then the default install
roots): ``<home>/<arch>-linux/ascend_toolkit_install.info`` (``version=8.0.RC2``), else
``<home>/version.cfg`` (``toolkit_running_version=[7.3.0.1.231:8.0.RC2]``: the CANN version is the part
after the colon). From CANN 8.5 the default root is ``/usr/local/Ascend/cann``. Formats read from public
install guides and logs quoting these files (found with the search tool: e.g. the CANN ops READMEs'
``cat /usr/local/Ascend/cann/<arch>-linux/ascend_toolkit_install.info``, vllm-ascend / MindIE logs quoting
``latest/version.cfg``). No toolkit found: ``DEFAULT_VERSION``, the seed's CANN.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from bertopt.errors import BertoptError

DEFAULT_VERSION = "6.0"  # the seed guide's CANN (6.0.RC1)

# Where a toolkit lives when $ASCEND_TOOLKIT_HOME is not set: the pre-8.5 and the 8.5+ layouts.
DEFAULT_TOOLKIT_HOMES = (Path("/usr/local/Ascend/ascend-toolkit/latest"), Path("/usr/local/Ascend/cann"))
INSTALL_INFO = "ascend_toolkit_install.info"
VERSION_CFG = "version.cfg"

_VERSION = re.compile(r"^\s*(\d+)\.(\d+)(?:[.\-].*)?\s*$")


@dataclass(frozen=True)
class CannTarget:
    """What one CANN version's ATC takes and which flags it has."""

    version: str  # "6.0", "7.0", "8.0", "9.0"
    opset_range: tuple[int, int]  # default-domain ONNX opsets its ONNX parser accepts
    ir_version: int  # the highest ONNX IR version it reads
    operators: frozenset[str] = field(repr=False)  # ONNX op types its ONNX parser takes
    operator_opsets: dict[str, tuple[int, int]] = field(default_factory=dict)  # per-op ranges, where documented
    layer_normalization: bool = False  # whether ONNX LayerNormalization is in its list
    precision_flags: tuple[str, ...] = ("--precision_mode",)  # which precision flags exist
    implmode_deprecated: bool = False  # --optypelist_for_implmode deprecated: use --op_precision_mode ini
    sources: dict[str, str] = field(default_factory=dict, repr=False)  # field -> where it was read
    onnx_version: str = ""  # the ONNX release its docs name

    @property
    def label(self) -> str:
        """How messages name it: "CANN 6.0"."""
        return f"CANN {self.version}"

    def opset_bounds(self, op: str) -> tuple[int, int]:
        """The default-domain opsets a model holding `op` may declare: the version's range, narrowed by
        the op's own documented range."""
        low, high = self.opset_range
        op_low, op_high = self.operator_opsets.get(op, (low, high))
        return max(low, op_low), min(high, op_high)


def known_versions() -> list[str]:
    """The versions cann.json describes, oldest first."""
    return sorted(_data()["versions"], key=version_key)


def cann_target(version: str) -> CannTarget:
    """The target for `version` ("6.0", "6.0.1", "8.0.RC2", ...); BertoptError for an unknown one."""
    return _target(_nearest_known(version))


def resolve_cann(option: str | None, toolkit_homes: Sequence[os.PathLike] | None = None
                 ) -> tuple[CannTarget, str]:
    """(target, where its version came from: ``option`` | ``toolkit`` | ``default``).

    `toolkit_homes` replaces the homes searched for an installed toolkit (tests pass fixture folders).
    """
    if option is not None:
        return cann_target(option), "option"
    homes = [Path(h) for h in toolkit_homes] if toolkit_homes is not None else _toolkit_homes_from_env()
    installed = installed_toolkit_version(homes)
    if installed is not None:
        version, where = installed
        try:
            return cann_target(version), "toolkit"
        except BertoptError as exc:
            raise BertoptError(f"the toolkit at {where} reports {exc}; pass --cann") from None
    return cann_target(DEFAULT_VERSION), "default"


def installed_toolkit_version(homes: Sequence[Path]) -> tuple[str, Path] | None:
    """(CANN version, file it was read from) of the first toolkit home that has one, else None."""
    for home in homes:
        for info in sorted(home.glob(f"*-linux/{INSTALL_INFO}")):
            version = _key_value(info, "version")
            if version:
                return version, info
        cfg = home / VERSION_CFG
        if cfg.is_file():
            version = _running_version(cfg)
            if version:
                return version, cfg
    return None


def _toolkit_homes_from_env() -> list[Path]:
    env = os.environ.get("ASCEND_TOOLKIT_HOME")
    return ([Path(env)] if env else []) + list(DEFAULT_TOOLKIT_HOMES)


def _key_value(path: Path, key: str) -> str | None:
    """`key=value` from an installer's .info file."""
    for line in _read_lines(path):
        name, sep, value = line.partition("=")
        if sep and name.strip() == key and value.strip():
            return value.strip()
    return None


def _running_version(path: Path) -> str | None:
    """The CANN version in version.cfg: `toolkit_running_version=[<inner>:<CANN>]`, else any package's."""
    found = {}
    for line in _read_lines(path):
        match = re.match(r"\s*(\w+)_running_version=\[([^\]]*)\]", line)
        if match:
            found[match.group(1)] = match.group(2).rpartition(":")[2].strip()
    return found.get("toolkit") or next((v for v in found.values() if v), None)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _nearest_known(version: str) -> str:
    """The known version at or below `version`; BertoptError naming the known ones otherwise."""
    known = known_versions()
    match = _VERSION.match(version or "")
    below = [k for k in known if match and version_key(k) <= version_key(version)]
    if not below:
        raise BertoptError(f"unknown CANN version {version!r} (bertopt knows {', '.join(known)}; a later "
                           "release maps to the nearest one below it)")
    return below[-1]


def version_key(version: str) -> tuple[int, int]:
    """(major, minor) of a CANN version string ("6.0", "6.0.1", "8.0.RC2") for ordering; BertoptError
    when it is not one."""
    match = _VERSION.match(version or "")
    if not match:
        raise BertoptError(f"CANN version {version!r}: expected MAJOR.MINOR[.PATCH|.RCn], e.g. 6.0 or 8.0.RC2")
    return int(match.group(1)), int(match.group(2))


@functools.lru_cache(maxsize=None)
def _target(version: str) -> CannTarget:
    data = _data()
    entry = data["versions"][version]
    listed = data["operator_lists"][entry["operator_list"]]["operators"]
    return CannTarget(
        version=version,
        opset_range=tuple(entry["opset_range"]),
        ir_version=entry["ir_version"],
        operators=frozenset(listed) - frozenset(entry["exclude_operators"]),
        operator_opsets={op: tuple(bounds) for op, bounds in entry["operator_opsets"].items()},
        layer_normalization=entry["layer_normalization"],
        precision_flags=tuple(entry["precision_flags"]),
        implmode_deprecated=entry["implmode_deprecated"],
        sources=dict(entry["sources"]),
        onnx_version=entry["onnx_version"],
    )


@functools.lru_cache(maxsize=None)
def _data() -> dict:
    text = importlib.resources.files("bertopt").joinpath("data", "cann.json").read_text()
    return json.loads(text)

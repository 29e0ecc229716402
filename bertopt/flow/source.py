"""What a model argument names: an ONNX file, used where it is, or a preset or HF checkpoint folder, exported.

Kept apart from `bertopt.flow.export` so that a run on an ONNX file never imports torch and transformers
(10 s of a tiny model's `bertopt run`, measured with cProfile on 2026-12-02).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def is_onnx_file(model: str) -> bool:
    """`model` names an ONNX file (by its suffix, or because a file of that name exists), not a preset or folder."""
    return model.endswith(".onnx") or Path(model).is_file()


def onnx_or_export(model: str, folder: str | os.PathLike, *, progress: Callable[[str], None] | None = None,
                   **options) -> tuple[Path, str]:
    """`model` as an ONNX file, and what it is: an .onnx file is used where it is (never modified); a preset
    or an HF checkpoint folder is exported to `folder`/original.onnx with `options` (`export_onnx`'s)."""
    if is_onnx_file(model):
        return Path(model), f"ONNX file {model}"
    from bertopt.flow.export import export_onnx, resolve_source  # imports torch

    source = resolve_source(model)
    if progress is not None:
        progress(f"exporting {model} ({options.get('exporter', 'legacy')})")
    result = export_onnx(source, Path(folder) / "original.onnx", **options)
    return result.path, result.description

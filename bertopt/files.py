"""Files and folders written whole or not at all (a temporary name beside them, renamed into place).

They get the permissions open() and mkdir() would give (0644 and 0755 under the usual umask 022), not
the private 0600/0700 of the temporary names they are staged under: results are shared.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bertopt.errors import BertoptError


@contextmanager
def new_folder(output: Path) -> Iterator[Path]:
    """A staging folder beside `output` that becomes `output` once the block succeeds.

    `output` must not exist or be empty, so no earlier result is overwritten; a failure (or an
    interrupt) leaves nothing under the final name.
    """
    output = Path(output)
    refuse_used_folder(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    staging.chmod(permitted(0o777))
    try:
        yield staging
        os.replace(staging, output)  # rename(2) also replaces an empty folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def refuse_used_folder(output: Path) -> None:
    """Fail before any work when `output` cannot become a new folder."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise BertoptError(f"--output {output}: already exists and is not an empty folder")


def check_writable_folder(folder: Path, option: str) -> None:
    """Fail in one line, before any work is spent, when `folder` cannot be created or written.

    Looks at the nearest existing ancestor without creating anything: a parent that is a file, a
    read-only filesystem or missing permissions are found here, not in a traceback after every pass.
    """
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise BertoptError(f"{option} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BertoptError(f"{option} {folder}: {existing} is not writable (permissions or a read-only filesystem)")


def write_json(path: Path, data: object) -> None:
    """Write JSON whole or not at all; what JSON cannot hold (paths, numpy scalars) as its str()."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write `text` whole or not at all: a temporary file beside `path`, renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, permitted(0o666))
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def permitted(mode: int) -> int:
    """`mode` less the process's umask: what open() (0o666) or mkdir() (0o777) would create."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def read_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BertoptError(f"{path}: no such file ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BertoptError(f"{path}: not a readable JSON file ({type(exc).__name__})") from None

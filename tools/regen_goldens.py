"""Regenerate every golden graph snapshot under tests/golden/ (then review `git diff tests/golden`).

    python tools/regen_goldens.py            # all golden tests
    python tools/regen_goldens.py -k gelu    # extra arguments go to pytest

It runs the tests marked `golden` with BERTOPT_UPDATE_GOLDENS=1, which makes
`bertopt.testing.assert_graph_matches` write the snapshot instead of comparing with it.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    env = dict(os.environ, BERTOPT_UPDATE_GOLDENS="1")
    command = [sys.executable, "-m", "pytest", "-q", "-m", "golden", *sys.argv[1:]]
    status = subprocess.call(command, cwd=REPO, env=env)
    if status == 0:
        print("goldens rewritten; review them with: git diff --stat tests/golden && git diff tests/golden")
    return status


if __name__ == "__main__":
    sys.exit(main())

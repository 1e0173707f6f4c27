"""The quick start's training recipe: the default QUICKSTART_TRAIN of scripts/quickstart.sh.

Benchmarks that measure "the quick start's model" read the recipe from the script
itself, so the figures follow the script when it changes.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parent.parent / "scripts" / "quickstart.sh"


def quickstart_text(script: Path = QUICKSTART) -> str:
    """The default QUICKSTART_TRAIN string, exactly as the script has it."""
    match = re.search(r'QUICKSTART_TRAIN="\$\{QUICKSTART_TRAIN-([^}]*)\}"', script.read_text())
    if match is None:
        raise SystemExit(f"no QUICKSTART_TRAIN default found in {script}")
    return match.group(1)


def quickstart_overrides(script: Path = QUICKSTART) -> dict[str, str]:
    """The default QUICKSTART_TRAIN as overrides (its key=value words)."""
    return dict(word.split("=", 1) for word in shlex.split(quickstart_text(script)))

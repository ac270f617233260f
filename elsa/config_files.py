"""Reading a run's config file: YAML (or JSON) into the flat dictionary ``make_config`` merges.

Apart from elsa/config.py so that the schema and its validation read on their own; the errors
here are about the file (missing, not UTF-8, not YAML, not a mapping), named with its line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from elsa.config import ConfigError


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) config file into a flat dictionary."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    data = _parse_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of field: value")
    return data


def _parse_yaml(path: Path) -> Any:
    """The file's YAML, or a ConfigError naming the file and line (yaml's own text names neither)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r}{where} is not valid YAML: {problem}") from None

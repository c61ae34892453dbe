"""Config patches: YAML files of changed keys, deep-merged over a config (`tunelab train CONFIG PATCH ...`).

A patch is a partial config: nested mappings merge key by key, anything else (numbers, strings, lists)
replaces the value below it. `tunelab diagnose RUN --write-patch FILE` writes one.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import UserError

PATCH_SUFFIXES = (".yaml", ".yml")


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `patch` over `base`, mappings merged recursively, other values replaced (lists included)."""
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_patch(path: str | Path) -> dict[str, Any]:
    """A patch file as a dict (an empty or comment-only file is an empty patch). UserError when unreadable."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"Patch file {path} does not exist. `tunelab diagnose RUN --write-patch FILE` writes one.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"Patch file {path} is not valid YAML{where}: {getattr(error, 'problem', error)}.") from None
    except UnicodeDecodeError:
        raise UserError(f"Patch file {path} is not UTF-8 text. Save it as UTF-8.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"Patch file {path} must be a YAML mapping of config keys, not a {type(data).__name__}.")
    return data


def merge_patches(config_dict: dict[str, Any], patch_paths: Iterable[str | Path]) -> dict[str, Any]:
    """`config_dict` with every patch file merged over it, in order (a later patch wins). The input is not changed.

    The result is a plain dict: validate it with `tunelab.config.validate_config` (unknown keys are errors there).
    """
    merged = copy.deepcopy(config_dict)
    for path in patch_paths:
        merged = deep_merge(merged, read_patch(path))
    return merged


def is_patch_argument(argument: str) -> bool:
    """True for a command-line argument naming a patch file (`x.yaml`), False for a `key=value` override."""
    return "=" not in argument and argument.lower().endswith(PATCH_SUFFIXES)

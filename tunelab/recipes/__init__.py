"""Built-in recipes: YAML configs shipped as package data. The first comment line of each is its description."""

from __future__ import annotations

import difflib
from importlib import resources

from tunelab.config import describe_fields
from tunelab.errors import UserError


def _files() -> dict[str, str]:
    folder = resources.files(__name__)
    return {
        p.name.removesuffix(".yaml"): p.read_text(encoding="utf-8")
        for p in folder.iterdir()
        if p.name.endswith(".yaml")
    }


def list_recipes() -> dict[str, str]:
    """Recipe name -> one-line description."""
    out = {}
    for name, text in sorted(_files().items()):
        first = text.splitlines()[0] if text else ""
        out[name] = first.lstrip("# ").strip()
    out["full"] = "every config key with its default and description"
    return out


def recipe_text(name: str) -> str:
    """The YAML text of a recipe ('full': every key, documented)."""
    if name == "full":
        return "\n".join(describe_fields()) + "\n"
    files = _files()
    if name not in files:
        close = difflib.get_close_matches(name, list(files), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"No recipe named '{name}'.{hint} `tunelab recipes` lists them: {', '.join(sorted(files))}.")
    return files[name]


def recipe_path(name: str) -> str:
    """The installed path of a recipe file (for loading it as a config)."""
    recipe_text(name)  # raises a clear error for unknown names
    return str(resources.files(__name__) / f"{name}.yaml")

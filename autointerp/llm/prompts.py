"""The one prompt loader: prompts/<name>.txt rendered with jinja2, and each template's sha256.

Every stage that talks to an LLM (explain, score) renders its prompts here, and records
`prompt_sha256(name)` with each answer: it is part of the LLM cache key, so editing a template
invalidates exactly the answers that came from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from autointerp.errors import UserError
from autointerp.llm.client import sha256_text

def _prompts_dir() -> Path:
    """The templates: the package autointerp.prompts (the repository's prompts/ folder, mapped
    into the package by pyproject.toml, so a wheel carries them)."""
    from importlib.resources import files

    try:
        return Path(str(files("autointerp.prompts")))
    except ModuleNotFoundError:  # a source tree on sys.path without an install
        return Path(__file__).resolve().parents[2] / "prompts"


PROMPTS_DIR = _prompts_dir()

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(PROMPTS_DIR)), undefined=jinja2.StrictUndefined,
                          keep_trailing_newline=False, autoescape=False)


def template_path(name: str) -> Path:
    path = PROMPTS_DIR / f"{name}.txt"
    if not path.is_file():
        raise UserError(f"prompt template {path} not found")
    return path


def template_names() -> list[str]:
    """Every template in prompts/, by name (without .txt)."""
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.txt"))


def prompt_sha256(name: str) -> str:
    """sha256 of a template's text: recorded with every answer and part of the cache key."""
    return sha256_text(template_path(name).read_text(encoding="utf-8"))


def render(name: str, **variables: Any) -> str:
    """Render prompts/<name>.txt with jinja2 (a missing variable is an error)."""
    template_path(name)
    return _env.get_template(f"{name}.txt").render(**variables)

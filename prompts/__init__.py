"""The prompt templates, shipped in the wheel as the package autointerp.prompts (pyproject.toml maps this folder)."""

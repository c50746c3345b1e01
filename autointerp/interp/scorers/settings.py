"""How many examples each scoring method shows and how: `ScoreSettings`, with the defaults by
engine. The scorers read it, and so do the stage (`autointerp.interp.score`) and the control."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from autointerp.errors import UserError

METHODS = ("simulation", "detection", "fuzzing")
SIMULATION_MODES = ("per-token", "json", "prompt-logprobs")


@dataclass
class ScoreSettings:
    """How many examples each method shows and how. `for_engine` gives the defaults: on vLLM
    delphi's 50 + 50 with simulation from prompt logprobs; on a CPU (llama.cpp) 10 + 10, the most
    that keeps `make demo` within its time (the issue's floor), simulation token by token; any
    other OpenAI-compatible server 10 + 10 with the JSON simulation (no prompt cache assumed)."""

    n_activating: int = 10  # activating windows per method, drawn across activation quantiles
    n_non_activating: int = 10  # non-activating windows per method
    per_prompt: int = 5  # detection/fuzzing examples per prompt (delphi's 5)
    n_quantiles: int = 5  # activation bins the activating windows are drawn from
    window: int = 3  # detection/fuzzing: tokens shown either side of the window's centre
    sim_window: int = 1  # simulation: tokens either side of the centre
    sim_per_prompt: int = 20  # simulation windows per prompt (all tokens are pooled over prompts)
    # "per-token" (llama.cpp: the all-at-once prompt cut after each token, prefix-cached), "json"
    # (any chat server: a JSON list answer + top_logprobs), "prompt-logprobs" (vLLM: one prefill pass)
    simulation: str = "per-token"
    top_logprobs: int = 10
    fuzz_threshold: float = 0.3  # a token is marked active at >= this share of its window's max (delphi)
    methods: tuple[str, ...] = METHODS
    chunk: int = 8  # latents per method-major round of requests
    bootstrap: int = 1000  # resamples for the per-latent 95% intervals
    seed: int = 0

    @classmethod
    def for_engine(cls, engine: str | None, **overrides: Any) -> "ScoreSettings":
        """Defaults by engine ("vllm" or anything else), then the overrides that are not None."""
        if engine == "vllm":
            base = cls(n_activating=50, n_non_activating=50, window=16, sim_window=8, sim_per_prompt=20,
                       simulation="prompt-logprobs", top_logprobs=20, chunk=64)
        elif engine in (None, "llama-cpp"):
            base = cls()
        else:
            base = cls(simulation="json")
        settings = replace(base, **{k: v for k, v in overrides.items() if v is not None})
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.simulation not in SIMULATION_MODES:
            raise UserError(f"unknown simulation mode {self.simulation!r}; choose from {', '.join(SIMULATION_MODES)}")
        if bad := [m for m in self.methods if m not in METHODS]:
            raise UserError(f"unknown scoring method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
        for name in ("n_activating", "n_non_activating", "per_prompt", "n_quantiles", "sim_per_prompt", "chunk"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"methods": list(self.methods)}

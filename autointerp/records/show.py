"""The terminal view of a record (`records show`): its top contexts, each token shaded by its level."""

from __future__ import annotations

from typing import Any

from rich.text import Text

from autointerp.display import shown
from autointerp.schema import LEVELS, Context, FeatureRecord

# background shades for levels 1..10 (0 = no background)
_SHADES = ["", "#3a2a12", "#4a3312", "#5a3c10", "#6b450e", "#7c4e0c", "#8e570a", "#a06008", "#b36a06", "#c67304", "#da7d00"]


def render_context(ctx: Context) -> Text:
    """One context as rich Text, each token's background shaded by its level. Text (not markup)
    is used, so tokens like "[bold]" or "<b>" print literally; control characters come escaped."""
    text = Text()
    for token, level in zip(ctx.tokens, ctx.levels):
        text.append(shown(token, "terminal"), style=f"on {_SHADES[level]}" if 0 < level <= LEVELS else "")
    return text


def describe_record(record: FeatureRecord, n_contexts: int = 5, n_negatives: int = 0) -> list[Any]:
    """The renderables `records show` prints for one record."""
    head = Text()
    head.append(f"feature {record.feature}", style="bold")
    head.append(f"  step {record.checkpoint_step}  layer {record.layer}  {record.model}\n")
    density = "-" if record.density is None else f"{record.density:.3%}"
    max_act = "-" if record.max_activation is None else f"{record.max_activation:.4g}"
    head.append(f"density {density}  max activation {max_act}  contexts {len(record.contexts)}  negatives {len(record.negatives)}")
    for key in ("human_granularity", "language_trend"):
        if key in record.extra:
            head.append(f"  {key} {record.extra[key]}")
    out: list[Any] = [head]
    for i, ctx in enumerate(record.contexts[:n_contexts]):
        peak = max(ctx.activations) if ctx.activations else max(ctx.levels, default=0)
        line = Text(f"#{i + 1} ({peak:.4g}) ", style="dim")
        out.append(line + render_context(ctx))
    kinds = record.extra.get("negative_kinds") or ["?"] * len(record.negatives)
    for ctx, kind in list(zip(record.negatives, kinds))[:n_negatives]:
        out.append(Text(f"neg {kind}: ", style="dim") + render_context(ctx))
    if not record.contexts:
        out.append(Text("(no contexts: the latent never fired on the corpus)", style="yellow"))
    return out

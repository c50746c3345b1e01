"""display.shown: one rule per target (prompt, terminal, html), on real tricky tokens; the prompt
rule is frozen (prompts are the LLM cache key) and '▁' never reaches the report's HTML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autointerp.display import shown
from autointerp.jsonl import write_jsonl
from autointerp.schema import Context, FeatureRecord, Label

# token -> what prompts have always shown (examples.shown_token before display.py, byte for byte)
PROMPT = {
    "\n": "↵", "<0x0A>": "↵", "\r\n": "↵", "\r": "", "\t": " ", "<0x09>": " ", "a\tb\nc": "a b↵c",
    "▁x": " x", "▁": " ", "▁▁": "  ", "▁日本": " 日本", "<0xE3>": "", "\ufffd": "",
    "Ġx": "Ġx", "Ċ": "Ċ",  # byte-level BPE marks: prompts never translated them
    "<<": "<<", ">>": ">>", "x>>y": "x>>y", "": "", " ": " ", "\u3000": "\u3000",
    "\x1b[31m": "\x1b[31m", "\x00": "\x00", "\u200d": "\u200d",  # prompts never escaped controls
    "<b>": "<b>", "|": "|",
}


@pytest.mark.parametrize("token,expected", PROMPT.items())
def test_prompt_rule_is_what_prompts_always_showed(token, expected):
    assert shown(token, "prompt") == expected


def test_prompt_marker_escape_runs_before_the_carriage_return_is_dropped():
    assert shown("<<a>>", "prompt", escape_markers=True) == "‹‹a››"
    # '<\r<' is no marker when escaped; it reads as one once \r is gone (as it always did)
    assert shown("a<\r<b", "prompt", escape_markers=True) == "a<<b"
    assert shown("<<", "prompt") == "<<"


@pytest.mark.parametrize("target", ["terminal", "html"])
@pytest.mark.parametrize("token,expected", [
    ("▁the", " the"), ("▁", " "), ("Ġthe", " the"), ("ĠĠ", "  "), ("Ċ", "↵"), ("ĊĊ", "↵↵"),
    ("\n", "↵"), ("<0x0A>", "↵"), ("\r\n", "↵"), ("\r", "↵"), ("\t", "⇥"), ("<0x09>", "⇥"),
    ("\x1b[31mred", "\\x1b[31mred"), ("\x00", "\\x00"), ("\x7f", "\\x7f"), ("\u202eevil", "\\u202eevil"),
    ("<0xE3>", ""), ("日本", "日本"), ("<b>&amp;", "<b>&amp;"), ("[bold]", "[bold]"), ("<<", "<<"),
])
def test_terminal_and_html_mark_whitespace_and_escape_controls(target, token, expected):
    assert shown(token, target) == expected


def test_html_keeps_format_characters_the_terminal_escapes():
    family = "👨\u200d👩"  # a zero-width joiner inside an emoji sequence
    assert shown(family, "html") == family
    assert shown(family, "terminal") == "👨\\u200d👩"
    assert shown("\ufeff", "terminal") == "\\ufeff" and shown("\ufeff", "html") == "\ufeff"
    assert shown("\u2067x", "html") == "\\u2067x"  # a bidi isolate would reorder the page


def test_unknown_target_is_an_error():
    with pytest.raises(ValueError, match="unknown display target"):
        shown("x", "markdown")  # type: ignore[arg-type]


def test_terminal_views_use_the_terminal_rule():
    from autointerp.human.annotate import context_text
    from autointerp.labels.evidence import _show
    from autointerp.records.show import render_context

    ctx = Context(tokens=["▁a", "Ġb", "<0x0A>", "\x1b[2J", "\t"], levels=[0, 10, 0, 0, 0])
    assert render_context(ctx).plain == " a b↵\\x1b[2J⇥"
    assert context_text(ctx, window=5).plain == " a b↵\\x1b[2J⇥"
    assert _show("<0x0A>") == "“↵”" and _show("▁more") == "“ more”"


def _run(root: Path) -> Path:
    """A one-layer run whose tokens are SentencePiece pieces ('▁dog', a bare '▁') and whose label's
    top tokens are raw too."""
    folder = root / "run" / "layer-3"
    ctx = Context(tokens=["▁the", "▁dog", "▁", "<0x0A>", "Ġcat", "犬"], levels=[0, 10, 4, 0, 2, 8])
    records = [FeatureRecord(model="m", layer=3, checkpoint_step=None, feature=f, contexts=[ctx] * 3)
               for f in range(2)]
    write_jsonl(folder / "records.jsonl", records)
    write_jsonl(folder / "labels.jsonl", [Label(
        checkpoint_step=None, feature=0, description="dogs", granularity="token", cross_lingual=False,
        language="en", language_profile={"trend": "en", "n_contexts": 3}, scores={}, confidence=0.9,
        explainer={}, evidence={"top_tokens": [["▁", 3], ["▁dog", 2], ["\n", 1]]}, layer=3,
        evidence_summary="“ dog” 3/3 · en")])
    return root / "run"


def test_no_sentencepiece_mark_reaches_the_report(tmp_path):
    from autointerp.report.build import build_report

    run = _run(tmp_path)
    index = build_report(run)
    page = (index.parent / "layer-3.html").read_text()
    assert '<span class="q10 mx"> dog</span>' in page  # the max token, its '▁' read as a space
    for html in [page, index.read_text()]:
        assert "▁" not in html and "Ġ" not in html and "<0x0A>" not in html


def test_lineage_top_tokens_use_the_html_rule(tmp_path):
    from autointerp.lineage import view
    from autointerp.run import Site

    run = _run(tmp_path)
    classes = view.latent_classes(run, Site(layer=3))
    assert classes[0].top_tokens == ["␣", " dog", "↵"]  # was ['▁', '▁dog', '↵'] on the report's cards
    assert "▁" not in json.dumps(json.loads((run / "layer-3" / view.CLASSES_CACHE).read_text()), ensure_ascii=False)

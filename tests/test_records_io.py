"""Feature-record files: importers (shared dev file, llm-jp-sae demo layout), malformed lines,
schema versions, and `autointerp records show`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autointerp.cli import app
from autointerp.errors import UserError
from autointerp.jsonl import write_jsonl
from autointerp.records.llmjp import LLMJP_GRANULARITY, import_llmjp_demo, language_trend
from autointerp.records.read import read_records
from autointerp.schema import GRANULARITIES, Context, FeatureRecord

DEV = Path(__file__).resolve().parents[2] / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"
SAMPLE = Path(__file__).resolve().parent / "data/llmjp_demo"
needs_dev = pytest.mark.skipif(not DEV.exists(), reason=f"shared dev file {DEV} is absent")


def record(feature: int, tokens: list[str], levels: list[int], step: int | None = 10) -> FeatureRecord:
    return FeatureRecord(model="m", layer=0, checkpoint_step=step, feature=feature,
                         contexts=[Context(tokens, levels, [float(v) for v in levels])],
                         density=0.25, max_activation=10.0, extra={"negative_kinds": []})


@needs_dev
def test_reads_shared_dev_file_with_extras(tmp_path):
    records = read_records(DEV)
    assert len(records) == 300
    assert {r.checkpoint_step for r in records} == {10, 100, 1000, 10000, 100000, 988240}
    for r in records:
        assert r.extra["human_granularity"] in GRANULARITIES
        assert LLMJP_GRANULARITY[r.extra["human_granularity_code"]] == r.extra["human_granularity"]
        assert language_trend(r.extra["language_counts"]) == r.extra["language_trend"]
        assert all(len(c.tokens) == len(c.levels) for c in r.contexts)
    # extras survive a write/read round trip
    write_jsonl(tmp_path / "dev.jsonl", records)
    again = read_records(tmp_path / "dev.jsonl")
    assert [r.to_dict() for r in again] == [r.to_dict() for r in records]


def test_imports_llmjp_demo_layout():
    records = import_llmjp_demo(SAMPLE)
    assert [(r.checkpoint_step, r.feature) for r in records] == [(10, 0), (10, 2), (988240, 0), (988240, 98)]
    raw = json.loads((SAMPLE / "988240/98.json").read_text())
    r = records[3]
    assert r.extra["human_granularity"] == LLMJP_GRANULARITY[raw["granularity"]]
    assert r.extra["language_counts"] == raw["language"]
    assert [c.tokens for c in r.contexts] == [[t for t, _ in s] for s in raw["token_act"]]
    assert [c.levels for c in r.contexts] == [[a for _, a in s] for s in raw["token_act"]]
    # one step folder or one file work too
    assert [x.key for x in import_llmjp_demo(SAMPLE / "10")] == [(10, 12, 0), (10, 12, 2)]
    assert import_llmjp_demo(SAMPLE / "10/2.json")[0].key == (10, 12, 2)


@needs_dev
def test_llmjp_import_matches_shared_dev_file():
    """The sample was written in llm-jp-sae's layout from dev features: importing it gives them back."""
    dev = {r.key: r for r in read_records(DEV)}
    for r in import_llmjp_demo(SAMPLE):
        d = dev[r.key]
        assert (r.model, r.layer) == (d.model, d.layer)
        assert [c.to_dict() for c in r.contexts] == [c.to_dict() for c in d.contexts[:len(r.contexts)]]
        for key in ("human_granularity", "human_granularity_code", "language_counts", "language_trend"):
            assert r.extra[key] == d.extra[key]


def test_language_trend_rule():
    assert language_trend({"en": 46, "ja": 4}) == "en"
    assert language_trend({"en": 45, "ja": 5}) == "mix"  # 90% is not over 90%
    assert language_trend({"en": 0, "ja": 10}) == "ja"
    assert language_trend({"en": 0, "ja": 0}) == "mix"


def test_bad_llmjp_file(tmp_path):
    (tmp_path / "10").mkdir()
    (tmp_path / "10/3.json").write_text(json.dumps({"token_act": [[["a", 1]]], "granularity": 9}))
    with pytest.raises(UserError, match="granularity code 9"):
        import_llmjp_demo(tmp_path)
    (tmp_path / "10/3.json").write_text("{not json")
    with pytest.raises(UserError, match="3.json"):
        import_llmjp_demo(tmp_path)


def write_with_bad_line(path: Path) -> None:
    good = [record(1, ["a", "b"], [0, 10]), record(2, ["c"], [10])]
    lines = [json.dumps(good[0].to_dict()), '{"feature": 3, "contexts": [{"tokens": ["x"]', json.dumps(good[1].to_dict())]
    path.write_text("\n".join(lines) + "\n")


def test_malformed_line_skip_keeps_good_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    write_with_bad_line(path)
    warnings: list[str] = []
    records = read_records(path, on_error="skip", warn=warnings.append)
    assert [r.feature for r in records] == [1, 2]
    assert len(warnings) == 1 and f"{path}:2:" in warnings[0]
    with pytest.raises(UserError, match=r"r\.jsonl:2"):
        read_records(path, on_error="fail")


def test_unknown_schema_version(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({**record(1, ["a"], [10]).to_dict(), "schema_version": 99}) + "\n")
    with pytest.raises(UserError, match="schema_version 99"):
        read_records(path)


runner = CliRunner()


def test_show_escapes_markup_and_html(tmp_path):
    path = tmp_path / "r.jsonl"
    write_jsonl(path, [record(4, ["<b>", "[bold]x[/bold]", " <script>", "\n"], [0, 10, 3, 0]),
                       record(5, ["z"], [10])])
    result = runner.invoke(app, ["records", "show", str(path), "--feature", "4"])
    assert result.exit_code == 0, result.output
    assert "<b>[bold]x[/bold] <script>↵" in result.output
    assert "density 25.000%" in result.output and "max activation 10" in result.output
    assert "feature 4" in result.output and "feature 5" not in result.output


def test_show_on_error_and_missing_feature(tmp_path):
    path = tmp_path / "r.jsonl"
    write_with_bad_line(path)
    result = runner.invoke(app, ["records", "show", str(path), "--feature", "2", "--on-error", "skip"])
    assert result.exit_code == 0 and "feature 2" in result.output
    result = runner.invoke(app, ["records", "show", str(path), "--feature", "2"])
    assert isinstance(result.exception, UserError) and "r.jsonl:2" in str(result.exception)
    result = runner.invoke(app, ["records", "show", str(path), "--feature", "9", "--on-error", "skip"])
    assert isinstance(result.exception, UserError) and "no feature 9" in str(result.exception)


def test_show_and_import_llmjp_sample(tmp_path):
    result = runner.invoke(app, ["records", "show", str(SAMPLE), "--feature", "0"])
    assert isinstance(result.exception, UserError) and "pick with --steps" in str(result.exception)
    result = runner.invoke(app, ["records", "show", str(SAMPLE), "--feature", "98", "--steps", "988240", "--contexts", "2"])
    assert result.exit_code == 0 and "human_granularity concept-semantic" in result.output
    assert result.output.count("\n#") == 2
    out = tmp_path / "imported.jsonl"
    result = runner.invoke(app, ["records", "import", str(SAMPLE), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [r.key for r in read_records(out)] == [r.key for r in import_llmjp_demo(SAMPLE)]

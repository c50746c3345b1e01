"""`autointerp compare`: kappa against scikit-learn and by hand, every input format, mismatched files."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import typer
from sklearn.metrics import cohen_kappa_score
from typer.testing import CliRunner

from autointerp.human.compare import cli, compare_files, compare_labels, load_labels
from autointerp.errors import UserError
from autointerp.jsonl import write_jsonl
from autointerp.records.read import read_records
from autointerp.schema import GRANULARITIES, Key, Label

DEV = Path(__file__).resolve().parents[2] / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"
LLMJP_SAMPLE = Path(__file__).resolve().parent / "data" / "llmjp_demo"
needs_dev = pytest.mark.skipif(not DEV.exists(), reason=f"shared dev file absent: {DEV}")
T, S, M, U = GRANULARITIES


def K(step, feature):
    return Key(step, None, feature)


def _keyed(labels: list[str], step: int = 1) -> dict:
    return {K(step, i): g for i, g in enumerate(labels)}


def test_kappa_by_hand():
    # agreement 3/4; chance = 0.5*0.25 + 0.5*0.75 = 0.5 -> kappa = (0.75 - 0.5) / 0.5 = 0.5
    result = compare_labels(_keyed([T, T, U, U]), _keyed([T, U, U, U]))
    assert result.overall.kappa == pytest.approx(0.5)
    assert result.overall.accuracy == pytest.approx(0.75)
    assert result.overall.confusion[0] == [1, 0, 0, 1]  # human token: 1 token, 1 uninterpretable
    assert result.overall.per_class[T] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3,
                                                         "support": 2})


def test_kappa_matches_scikit_learn_on_a_known_table():
    # confusion table (rows human, columns model) expanded into label pairs
    table = [[20, 2, 3, 5], [1, 6, 4, 0], [2, 3, 10, 1], [4, 0, 2, 15]]
    human, model = [], []
    for i, row in enumerate(table):
        for j, count in enumerate(row):
            human += [GRANULARITIES[i]] * count
            model += [GRANULARITIES[j]] * count
    order = list(range(len(human)))
    random.Random(0).shuffle(order)
    human, model = [human[i] for i in order], [model[i] for i in order]
    result = compare_labels(_keyed(human), _keyed(model))
    assert result.overall.confusion == table
    assert result.overall.kappa == pytest.approx(cohen_kappa_score(human, model))
    three = lambda xs: ["concept" if x.startswith("concept") else x for x in xs]
    assert result.overall.kappa_3way == pytest.approx(cohen_kappa_score(three(human), three(model)))
    assert result.overall.kappa_3way > result.overall.kappa  # synonym/semantic confusions merge
    assert len(result.disagreements) == sum(map(sum, table)) - sum(table[i][i] for i in range(4))


def test_mismatched_features_are_counted_and_compared_on_the_intersection():
    human = {K(10, 0): T, K(10, 1): U, K(10, 2): S, K(100, 0): T, K(1000, 3): U}
    model = {K(10, 0): T, K(10, 1): T, K(100, 0): M, K(100, 5): U, K(100, 6): U, K(1000, 3): U}
    result = compare_labels(human, model, descriptions={K(10, 1): "the word 'the'"})
    assert (result.n_common, result.only_human, result.only_model) == (4, 1, 2)
    assert list(result.per_checkpoint) == [10, 100, 1000]
    assert result.per_checkpoint[10].n == 2 and result.per_checkpoint[100].n == 1
    assert result.per_checkpoint[100].kappa == 0.0  # no agreement, no chance agreement
    assert result.per_checkpoint[1000].kappa is None  # one class on both sides: undefined, not nan
    assert result.disagreements == [
        {"checkpoint_step": 10, "feature": 1, "human": U, "model": T, "description": "the word 'the'"},
        {"checkpoint_step": 100, "feature": 0, "human": T, "model": M, "description": ""}]
    json.dumps(result.to_dict(), allow_nan=False)


@needs_dev
def test_every_input_format_reads_the_same_labels(tmp_path):
    records = read_records(DEV)
    truth = {r.key: r.extra["human_granularity"] for r in records}
    # 1. the dev file's human fields
    assert load_labels(DEV).labels == truth
    # 2. label JSONL (schema.Label) and 3. a run directory of step-N/labels.jsonl
    run = tmp_path / "run"
    for step in sorted({r.checkpoint_step for r in records}):
        write_jsonl(run / f"step-{step}" / "labels.jsonl", [
            Label(checkpoint_step=step, feature=r.feature, description=f"d{r.feature}",
                  granularity=truth[r.key], cross_lingual=False, language="mix", language_profile={},
                  scores={}, confidence=1.0, explainer={}, layer=r.layer)
            for r in records if r.checkpoint_step == step])
    from_run = load_labels(run)
    assert from_run.labels == truth and from_run.descriptions[Key(10, 12, 2)] == "d2"
    assert load_labels(run / "step-100" / "labels.jsonl").labels == {k: v for k, v in truth.items() if k.checkpoint_step == 100}
    # 4. CSV with names, codes and the paper's wording
    code = {U: 1, M: 2, S: 3, T: 4}
    csv_path = tmp_path / "labels.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["feature", "checkpoint", "layer", "granularity"])
        for i, (key, g) in enumerate(sorted(truth.items())):
            writer.writerow([key.feature, key.checkpoint_step, key.layer, [g, code[g], g.upper()][i % 3]])
    assert load_labels(csv_path).labels == truth
    # 5. the llm-jp-sae demo directory (docs/data/{step}/{i}.json with granularity codes)
    demo = tmp_path / "llm-jp-sae" / "docs" / "data"
    for r in records[:20]:
        (demo / str(r.checkpoint_step)).mkdir(parents=True, exist_ok=True)
        (demo / str(r.checkpoint_step) / f"{r.feature}.json").write_text(json.dumps(
            {"token_act": [[[t, l] for t, l in zip(c.tokens, c.levels)] for c in r.contexts[:2]],
             "language": r.extra["language_counts"], "granularity": code[truth[r.key]]}))
    expected = {r.key: truth[r.key] for r in records[:20]}
    assert load_labels(tmp_path / "llm-jp-sae").labels == expected
    assert load_labels(demo).labels == expected


@pytest.mark.skipif(not LLMJP_SAMPLE.is_dir(), reason="tests/data/llmjp_demo sample absent")
def test_llmjp_sample_codes():
    labels = load_labels(LLMJP_SAMPLE).labels
    for (step, _layer, feature), g in labels.items():
        data = json.loads((LLMJP_SAMPLE / str(step) / f"{feature}.json").read_text())
        assert g == {1: U, 2: M, 3: S, 4: T}[data["granularity"]]


@needs_dev
def test_cli_writes_json_and_markdown(tmp_path):
    records = read_records(DEV)
    rng = random.Random(1)
    model_path = tmp_path / "model.jsonl"
    write_jsonl(model_path, [
        Label(checkpoint_step=r.checkpoint_step, feature=r.feature, description=f"<b>feature {r.feature}</b>",
              granularity=r.extra["human_granularity"] if rng.random() < 0.6 else rng.choice(GRANULARITIES),
              cross_lingual=False, language="mix", language_profile={}, scores={}, confidence=0.5, explainer={})
        for r in records[:150]])
    app = typer.Typer()
    app.command()(cli)
    result = CliRunner().invoke(app, [str(DEV), str(model_path), "--out", str(tmp_path / "cmp"), "--show", "3"],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "compared 150 features; only in human: 150, only in model: 0" in result.output
    data = json.loads((tmp_path / "cmp.json").read_text())
    human = [r.extra["human_granularity"] for r in records[:150]]
    model = [l["granularity"] for l in map(json.loads, model_path.read_text().splitlines())]
    assert data["overall"]["kappa"] == pytest.approx(cohen_kappa_score(human, model))
    assert len(data["disagreements"]) == sum(h != m for h, m in zip(human, model))
    assert [p["checkpoint_step"] for p in data["per_checkpoint"]] == [10, 100, 1000]
    markdown = (tmp_path / "cmp.md").read_text()
    assert f"| **all** | 150 | " in markdown and "## Disagreements" in markdown
    assert markdown.count("&lt;b&gt;feature") == len(data["disagreements"]) and "<b>" not in markdown


def test_bad_inputs_are_user_errors(tmp_path):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("feature,step,granularity\n1,10,tokenish\n")
    with pytest.raises(UserError, match=r"bad.csv:2: unknown granularity 'tokenish'"):
        load_labels(bad_csv)
    no_cols = tmp_path / "cols.csv"
    no_cols.write_text("id,label\n1,token\n")
    with pytest.raises(UserError, match="needs the columns feature, checkpoint, granularity"):
        load_labels(no_cols)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"checkpoint_step": 1, "feature": 1, "granularity": "token"}\n')
    b.write_text('{"checkpoint_step": 2, "feature": 1, "granularity": "token"}\n')
    with pytest.raises(UserError, match="no \\(checkpoint_step, layer, feature\\) in common"):
        compare_files(a, b)
    with pytest.raises(UserError, match="is a folder holding a.jsonl, b.jsonl, .* not labels"):
        load_labels(tmp_path)


def test_printed_descriptions_are_not_rich_markup(capsys):
    from autointerp.human.compare import print_result

    result = compare_labels({K(1, 0): T, K(1, 1): U}, {K(1, 0): U, K(1, 1): U},
                            descriptions={K(1, 0): "[red]x[/red]"})
    print_result(result)
    assert "[red]x[/red]" in capsys.readouterr().out


def test_no_overlap_says_which_features_each_side_has_and_what_to_run(tmp_path):
    from autointerp.human.compare import feature_ranges

    assert feature_ranges([0, 1, 2, 7, 9, 10]) == "0–2, 7, 9–10"
    assert feature_ranges(list(range(0, 40, 2)), limit=3) == "0, 2, 4, …"
    run = tmp_path / "run"
    (run / "step-600").mkdir(parents=True)
    write_jsonl(run / "step-600" / "records.jsonl.zst", [])
    human, model = tmp_path / "human.jsonl", run / "step-600" / "labels.jsonl"
    human.write_text("".join(json.dumps({"checkpoint_step": 600, "feature": f, "granularity": "token",
                                         "annotator": "a"}) + "\n" for f in (0, 1)))
    model.write_text("".join(json.dumps({"checkpoint_step": 600, "feature": f, "granularity": "token",
                                         "description": "d", "scores": {}, "language_profile": {}}) + "\n"
                             for f in (165, 1060, 1234)))
    with pytest.raises(UserError) as err:
        compare_files(human, run)
    message = str(err.value)
    assert "the human labels cover features 0–1 at step 600" in message
    assert "the model labels cover 165, 1060, 1234 (3 features)" in message
    assert f"`autointerp annotate {run} --features 3`" in message
    with pytest.raises(UserError, match=f"autointerp annotate {run}/step-600/records.jsonl.zst --features 3"):
        compare_files(human, model)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"checkpoint_step": 10, "feature": 0, "granularity": "token"}) + "\n")
    with pytest.raises(UserError, match="human labels are at step\\(s\\) 10, the model labels at step\\(s\\) 600"):
        compare_files(other, model)

"""`autointerp annotate` driven through stdin: answers are saved at once, resumed, readable by compare."""

from __future__ import annotations

import io
import json

import typer
from rich.console import Console
from typer.testing import CliRunner

from autointerp.human.annotate import annotate, cli, context_text, load_answers
from autointerp.human.compare import load_labels
from autointerp.jsonl import write_jsonl
from autointerp.records.read import read_records
from autointerp.schema import Context, FeatureRecord, Key


def _records(n: int = 5) -> list[FeatureRecord]:
    return [FeatureRecord(model="m", layer=0, checkpoint_step=100, feature=i,
                          contexts=[Context(tokens=[" the", " dog", "犬", "<b>x</b>"], levels=[0, 10 - i, 4, 1])])
            for i in range(n)]


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(cli)
    return app


def test_annotate_saves_each_answer_and_resumes(tmp_path):
    records_path, out = tmp_path / "records.jsonl", tmp_path / "human.jsonl"
    write_jsonl(records_path, _records())
    runner = CliRunner()

    # token, back (to feature 0 again), uninterpretable, synonym, then quit
    first = runner.invoke(_app(), [str(records_path), "--out", str(out), "--annotator", "ann"],
                          input="t\nb\nu\ns\nq\n")
    assert first.exit_code == 0, first.output
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [(l["feature"], l["granularity"]) for l in lines] == [(0, "token"), (0, "uninterpretable"),
                                                                  (1, "concept-synonym")]
    assert all(l["annotator"] == "ann" and l["checkpoint_step"] == 100 and l["time"] for l in lines)
    assert {k: v["granularity"] for k, v in load_answers(out).items()} == {
        Key(100, 0, 0): "uninterpretable", Key(100, 0, 1): "concept-synonym"}

    # resume: starts at feature 2; a bad key is explained and asked again; n skips; EOF stops
    second = runner.invoke(_app(), [str(records_path), "--out", str(out)], input="m\nx\nn\nconcept-semantic\n")
    assert second.exit_code == 0, second.output
    assert "unknown key 'x'" in second.output
    assert "step 100 · feature 2" in second.output and "step 100 · feature 0" not in second.output
    answers = load_answers(out)
    assert answers[Key(100, 0, 2)]["granularity"] == "concept-semantic"
    assert answers[Key(100, 0, 3)]["granularity"] is None  # skipped
    assert answers[Key(100, 0, 4)]["granularity"] == "concept-semantic"

    # compare reads the file: the skipped feature is not a label; the corrected one keeps its last answer
    labels = load_labels(out)
    assert labels.labels == {Key(100, 0, 0): "uninterpretable", Key(100, 0, 1): "concept-synonym",
                             Key(100, 0, 2): "concept-semantic", Key(100, 0, 4): "concept-semantic"}
    assert labels.unlabelled == 1

    third = runner.invoke(_app(), [str(records_path), "--out", str(out)], input="")
    assert "all 5 features already have an answer" in third.output
    assert len(out.read_text().splitlines()) == 6


def test_torn_last_line_is_asked_again(tmp_path):
    out = tmp_path / "human.jsonl"
    out.write_text('{"checkpoint_step": 100, "layer": 0, "feature": 0, "granularity": "token"}\n'
                   '{"checkpoint_step": 100, "layer": 0, "feature": 1, "granul')
    keys = iter(["u", "q"])
    console = Console(file=io.StringIO(), width=120)
    done = annotate(_records(3), out, "ann", lambda: next(keys), console=console)
    assert done == {"labelled": 1, "skipped": 0, "remaining": 1}
    assert "feature 1" in console.file.getvalue()
    assert load_answers(out)[Key(100, 0, 1)]["granularity"] == "uninterpretable"


def test_context_text_highlights_max_and_keeps_markup_and_control_chars_inert():
    ctx = Context(tokens=["[bold]a[/bold]", "\x1b[31mred", "<0x0A>", "b"], levels=[0, 10, 2, 0])
    text = context_text(ctx, window=5)
    assert text.plain == "[bold]a[/bold]\\x1b[31mred↵b"
    styles = {text.plain[s.start:s.end]: str(s.style) for s in text.spans}
    assert "bold underline" in styles["\\x1b[31mred"]  # the max token
    assert "[bold]a[/bold]" not in styles  # level 0: no highlight


def test_annotate_rejects_empty_input(tmp_path):
    records_path = tmp_path / "records.jsonl"
    write_jsonl(records_path, _records(2))
    result = CliRunner().invoke(_app(), [str(records_path), "--out", str(tmp_path / "h.jsonl"),
                                         "--steps", "7"], input="")
    assert result.exit_code != 0
    assert "no feature records at steps 7" in str(result.exception)


def _mixed_records(steps=(10, 100), n: int = 40) -> list[FeatureRecord]:
    """Several checkpoints in one file, every third latent dead (no contexts)."""
    return [FeatureRecord(model="m", layer=0, checkpoint_step=s, feature=i,
                          contexts=[] if i % 3 == 0 else [Context(tokens=["a", f"t{i}"], levels=[0, 10])])
            for s in steps for i in range(n)]


def test_features_n_is_the_sample_label_draws(tmp_path):
    """annotate --features N asks about the latents `label` described with its LLM (marked
    `sampled` in labels.jsonl beside the records); before any label run, the plain seeded sample
    of live latents per records file, drawn from a key scan, not from parsed records."""
    from autointerp.human.annotate import records_files, select
    from autointerp.labels.sampling import sample_live

    run = tmp_path / "run"
    for step in (10, 100):
        write_jsonl(run / f"step-{step}" / "records.jsonl.zst", _mixed_records((step,)))
    mixed = tmp_path / "mixed.jsonl"
    write_jsonl(mixed, _mixed_records())
    for source in (run, mixed):
        for n in (1, 5, 12, 1000):
            picked = select(records_files(source), features=n)
            assert picked.keys == [r.key for f in records_files(source) for r in sample_live(read_records(f), n)]
            assert all(r.contexts for r in picked) and [r.key for r in picked] == picked.keys
    # after `label`: its sampled latents, whatever the plain sample would have been
    step10 = read_records(run / "step-10" / "records.jsonl.zst")
    chosen = [r for r in step10 if r.contexts][-3:]
    write_jsonl(run / "step-10" / "labels.jsonl", [
        {"checkpoint_step": r.checkpoint_step, "layer": r.layer, "feature": r.feature, "sampled": r in chosen} for r in step10])
    picked = select([run / "step-10" / "records.jsonl.zst"], features=5)
    assert picked.keys == [r.key for r in chosen]
    assert len(select([run / "step-10" / "records.jsonl.zst"], features=2)) == 2  # a subset when N is smaller
    assert len(select([mixed], features=1000)) == 2 * 26  # every live latent, no dead one
    everything = select(records_files(run), features=None)
    assert everything.keys == [r.key for f in records_files(run) for r in read_records(f)]  # dead ones too
    assert select(records_files(run), steps=[100], features=5).keys == \
        [k for k in select(records_files(run), features=5).keys if k[0] == 100]


def test_lazy_records_go_back_and_forth_without_reading_everything(tmp_path):
    from autointerp.human.annotate import LazyRecords, select

    path = tmp_path / "records.jsonl"
    write_jsonl(path, _mixed_records((10,), 30))
    lazy = select([path], features=None)
    lazy.cache_size = 2  # going back past the cache re-reads from the file's start
    order = [0, 1, 2, 29, 3, 0, 17, 16]
    assert [lazy[i].feature for i in order] == order
    assert isinstance(lazy, LazyRecords) and lazy[-1].feature == 29


def test_cli_features_sample_and_resume(tmp_path):
    from autointerp.labels.sampling import sample_live

    records_path, out = tmp_path / "records.jsonl", tmp_path / "human.jsonl"
    write_jsonl(records_path, _mixed_records((100,), 30))
    sample = [r.feature for r in sample_live(read_records(records_path), 4)]
    first = CliRunner().invoke(_app(), [str(records_path), "--out", str(out), "--features", "4"], input="t\nq\n")
    assert first.exit_code == 0, first.output
    assert f"step 100 · feature {sample[0]}   (1/4)" in first.output
    second = CliRunner().invoke(_app(), [str(records_path), "--out", str(out), "--features", "4"], input="u\nq\n")
    assert f"feature {sample[1]}   (2/4)" in second.output
    assert [k.feature for k in load_answers(out)] == sample[:2]

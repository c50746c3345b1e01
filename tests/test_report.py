"""The HTML report: renders a small run built from the shared dev file, escapes tokens,
says what is missing, and loads in headless Chromium with its plots and no console errors."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from autointerp.jsonl import write_jsonl
from autointerp.records.read import read_records
from autointerp.schema import GRANULARITIES, Context, FeatureRecord, Label
from autointerp.report.build import build_report

DEV = Path(__file__).resolve().parents[2] / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"
XSS = "<script>alert(1)</script>"
needs_dev = pytest.mark.skipif(not DEV.exists(), reason=f"shared dev file absent: {DEV}")


def make_run(root: Path, per_step: int = 12, steps_with_labels=None, with_metrics=True) -> Path:
    """A run directory from the dev file: records, synthetic labels (70% agree with the human),
    a fake SAE metrics.json, and one feature whose token and description are a <script> tag."""
    rng = random.Random(0)
    records = read_records(DEV)
    by_step: dict[int, list[FeatureRecord]] = {}
    for r in records:
        by_step.setdefault(r.checkpoint_step, []).append(r)
    run = root / "run"
    for i, (step, recs) in enumerate(sorted(by_step.items())):
        recs = recs[:per_step]
        if i == 0:  # the hostile token, in a context and in the description
            ctx = recs[0].contexts[0]
            recs[0].contexts.insert(0, Context(tokens=["a", XSS, "b"], levels=[0, 10, 3]))
        folder = run / f"step-{step}"
        write_jsonl(folder / "records.jsonl", recs)
        if steps_with_labels is None or step in steps_with_labels:
            labels = []
            for r in recs:
                human = r.extra["human_granularity"]
                granularity = human if rng.random() < 0.7 else rng.choice(GRANULARITIES)
                labels.append(Label(
                    checkpoint_step=step, feature=r.feature,
                    description=XSS if r is recs[0] and i == 0 else f"feature {r.feature} description",
                    granularity=granularity, cross_lingual=rng.random() < 0.3,
                    language=r.extra["language_trend"], language_profile={"trend": r.extra["language_trend"],
                                                                          "shares": {"en": 0.5, "ja": 0.5}},
                    scores={"simulation": rng.random(), "detection": rng.random(), "fuzzing": rng.random()},
                    confidence=rng.random(), explainer={"model": "fake", "prompt_sha256": "0", "engine": "none"}))
            write_jsonl(folder / "labels.jsonl", labels)
        if with_metrics:
            (folder / "sae").mkdir(parents=True, exist_ok=True)
            (folder / "sae" / "metrics.json").write_text(json.dumps(
                {"fvu": 0.5 / (i + 1), "l0": 32, "dead_fraction": 0.1 * i, "delta_ce": 1.0 / (i + 1)}))
    (run / "manifest.json").write_text(json.dumps({"stages": {"sae": {"model": "llm-jp/llm-jp-3-1.8b",
                                                                       "seconds": 12.5}}}))
    return run


@needs_dev
def test_report_renders_every_checkpoint_with_plots(tmp_path):
    from autointerp.report.build import build_report

    run = make_run(tmp_path)
    index = build_report(run, human=DEV)
    html = index.read_text()
    steps = sorted({r.checkpoint_step for r in read_records(DEV)})
    for step in steps:
        page = run / "report" / f"step-{step}.html"
        assert page.exists()
        assert f'href="step-{step}.html"' in html
        # 12 features per page, each with its contexts shaded by level
        assert page.read_text().count('<div class="feature') == 12
        assert re.search(r'class="q10( mx)?"', page.read_text())
    # granularity, language, cross-lingual, scores, SAE metrics, human vs model
    assert html.count("data:image/png;base64,") == 6
    assert "Missing:" not in html
    compare = json.loads((run / "report" / "compare.json").read_text())
    assert compare["n_common"] == 12 * len(steps)


@needs_dev
def test_hostile_token_is_escaped_in_every_page(tmp_path):
    from autointerp.report.build import build_report

    run = make_run(tmp_path)
    build_report(run, human=DEV)
    pages = list((run / "report").glob("*.html"))
    assert len(pages) == 7
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    first = min(pages, key=lambda p: (p.name != "step-10.html"))
    assert first.read_text().count(escaped) >= 2  # the token and the description
    for page in pages:
        assert XSS not in page.read_text(), page.name
        # the only <script> is our own filter code on checkpoint pages
        assert page.read_text().count("<script") == (0 if page.name == "index.html" else 1)


@needs_dev
def test_missing_stages_are_named_and_the_rest_renders(tmp_path):
    from autointerp.report.build import build_report

    run = make_run(tmp_path, per_step=4, steps_with_labels={10, 100}, with_metrics=False)
    (run / "step-1000" / "records.jsonl").unlink()
    with open(run / "step-10" / "labels.jsonl", "a") as fh:
        fh.write('{"checkpoint_step": 10, "feature": ')  # a torn last line
    html = build_report(run).read_text()
    assert "Missing: labels (autointerp label)" in (run / "report" / "step-10000.html").read_text()
    page_1000 = (run / "report" / "step-1000.html").read_text()
    assert "Missing: records (autointerp collect)" in page_1000
    assert "SAE metrics (sae/metrics.json)" in html
    assert "malformed line" in (run / "report" / "step-10.html").read_text()
    # records-only checkpoints still show their features (language from the records)
    assert (run / "report" / "step-10000.html").read_text().count('<div class="feature') == 4
    # granularity + language + cross-lingual + scores; no SAE-metrics or human plot
    assert html.count("data:image/png;base64,") == 4


def test_report_on_a_missing_run_is_a_user_error(tmp_path):
    from autointerp.errors import UserError
    from autointerp.report.build import build_report

    with pytest.raises(UserError, match="no such run directory"):
        build_report(tmp_path / "nope")


def test_language_trend_follows_the_paper_rule():
    from autointerp.labels.language import profile

    def rec(max_tokens):
        return FeatureRecord(model="m", layer=0, checkpoint_step=1, feature=0,
                             contexts=[Context(tokens=["x", t], levels=[0, 10]) for t in max_tokens])

    assert profile(rec([" dog"] * 10))["trend"] == "en"
    assert profile(rec(["犬"] * 10))["trend"] == "ja"
    mixed = profile(rec([" dog"] * 5 + ["犬"] * 5))
    assert mixed["trend"] == "mix" and mixed["max_token_scripts"]["en"] == pytest.approx(0.5)
    assert mixed["paper_counts"] == {"en": 5, "ja": 5}
    assert profile(rec([" dog"] * 9 + ["犬"]))["trend"] == "mix"  # 90% is not over 90%


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0"]


def _run_chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    profile.mkdir(parents=True, exist_ok=True)
    return subprocess.run([chromium_path(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
                          capture_output=True, text=True, timeout=120)


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line and ("Error" in line or "Uncaught" in line)]


@needs_dev
@pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (apt-get install chromium)")
@pytest.mark.timeout(300)
def test_index_loads_in_headless_chromium(tmp_path):
    from autointerp.report.build import build_report

    # the console check must see a real error, or it proves nothing
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    assert _console_errors(_run_chromium(broken, tmp_path / "p0", "--dump-dom").stderr)

    run = make_run(tmp_path)
    index = build_report(run, human=DEV)
    result = _run_chromium(index, tmp_path / "p1", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not _console_errors(result.stderr)
    images = re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="[^"]+"', result.stdout)
    assert len(images) == 6
    step_page = run / "report" / "step-10.html"
    result = _run_chromium(step_page, tmp_path / "p2", "--dump-dom")
    assert not _console_errors(result.stderr)
    assert "12 of 12 features" not in result.stdout  # the filter script only writes on change
    assert result.stdout.count('<div class="feature') == 12

    shot = tmp_path / "index.png"
    _run_chromium(index, tmp_path / "p3", f"--screenshot={shot}", "--window-size=1280,2400",
                  "--hide-scrollbars")
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20000


@needs_dev
def test_pages_show_labelled_features_first_and_only_them_by_default(tmp_path):
    run = make_run(tmp_path, per_step=12)
    step = sorted(int(p.name.split("-")[1]) for p in run.glob("step-*"))[0]
    labels_path = run / f"step-{step}" / "labels.jsonl"
    kept = labels_path.read_text().splitlines()[:3]  # a run labels a sample of its latents
    labels_path.write_text("\n".join(kept) + "\n")
    labelled = [json.loads(line)["feature"] for line in kept]
    order = {g: i for i, g in enumerate(GRANULARITIES)}  # after the LLM-described ones: by class, then id
    labelled_in_order = [d["feature"] for d in sorted(map(json.loads, kept),
                                                      key=lambda d: (order[d["granularity"]], d["feature"]))]

    build_report(run)
    page = (run / "report" / f"step-{step}.html").read_text()
    assert page.count('<div class="feature"') == 3
    assert "9 more" in page
    build_report(run, max_features=5)
    page = (run / "report" / f"step-{step}.html").read_text()
    shown = re.findall(r"<h3>#(\d+) ", page)
    assert len(shown) == 5 and [int(f) for f in shown[:3]] == labelled_in_order


@needs_dev
def test_step_page_does_not_count_a_latent_left_without_a_description_as_described(tmp_path):
    from autointerp.jsonl import iter_jsonl

    run = make_run(tmp_path, per_step=6, steps_with_labels={10})
    path = run / "step-10" / "labels.jsonl"
    labels = list(iter_jsonl(path, Label.from_dict))
    labels[1].sampled, labels[1].description, labels[1].error = True, "", "description cut short by max_tokens"
    write_jsonl(path, labels)
    build_report(run)
    text = " ".join(re.sub(r"<[^>]+>", " ", (run / "report" / "step-10.html").read_text()).split())
    assert "6 labels (5 described by the LLM, 1 more sampled but left without a description)" in text


def _layer_run(root: Path) -> Path:
    """A run of one model's layers: layer-3 and layer-9, each with records, labels (a synonym
    latent, a token latent, and a dead latent's label line) and SAEBench metrics."""
    run = root / "layers"
    for layer in (3, 9):
        folder = run / f"layer-{layer}"
        ctx = [Context(tokens=["the", " dog", "と", "犬"], levels=[0, 10, 0, 8])]
        records = [FeatureRecord(model="m", layer=layer, checkpoint_step=None, feature=f, contexts=ctx if f < 2 else [],
                                 density=0.01 * (f + 1) if f < 2 else None) for f in range(3)]
        write_jsonl(folder / "records.jsonl", records)

        def label(feature, granularity, tokens, profile):
            # the link as the label stores it (relations.SynonymLink.to_dict): the report only reads it
            link = {"words": [[" dog", 20]], "partners": [[["犬", 15]]], "source": "gloss_ja_en",
                    "text": "JMdict: 犬 = dog", "covered": 35, "of": 50} if granularity == "concept-synonym" else None
            return Label(checkpoint_step=None, feature=feature, description="", granularity=granularity,
                         cross_lingual=granularity == "concept-synonym", language="mix", language_profile=profile,
                         scores={}, confidence=0.9, explainer={}, evidence={"top_tokens": tokens, "link": link},
                         layer=layer, evidence_summary="“ dog” 20/50 · “犬” 15/50")

        write_jsonl(folder / "labels.jsonl", [
            label(0, "concept-synonym", [[" dog", 20], ["犬", 15]], {"trend": "mix", "n_contexts": 50}),
            label(1, "token", [[" the", 40]], {"trend": "en", "n_contexts": 50}),
            label(2, "uninterpretable", [], {"trend": "mix", "n_contexts": 0}),  # dead: no contexts
        ])
        (folder / "sae").mkdir()
        (folder / "sae" / "metrics.json").write_text(json.dumps({
            "explained_variance": 0.8, "l0": 32, "dead_fraction": 0.1, "dense_fraction": 0.02,
            "ce_loss_score": 0.83, "delta_ce": 0.5, "kl_div_with_sae": 0.4, "kl_div_score": 0.812 + layer / 1000,
            "cossim": 0.951, "l2_ratio": 0.97, "eval_tokens": 2500, "definitions": {"ce_loss_score": "SAELens: ..."},
            "density_histogram": {"log10_edges": [-3.0, -2.0, -1.0, 0.0], "counts": [5, 10, 2], "never": 3}}))
    return run


def test_a_run_of_layers_gets_a_page_per_layer_with_sae_metrics_density_and_synonyms(tmp_path):
    from autointerp.report.build import build_report

    run = _layer_run(tmp_path)
    index = build_report(run).read_text()
    page3, page9 = ((run / "report" / f"layer-{n}.html").read_text() for n in (3, 9))
    assert "<h1>layers: layer 3</h1>" in page3 and 'href="layer-9.html">layer 9 →' in page3
    assert 'href="layer-3.html">layer 3</a>' in page9 and "<th>layer</th>" in index
    assert "81.5%" in page3 and "82.1%" in page9 and "0.951" in index  # the KL score, the cosine
    assert "Firing density of every latent" in page3 and "2500 held-out tokens" in page3
    assert page3.count('alt="histogram of latent firing densities"') == 1
    # the synonym latent with the two words its label links, the link and its coverage, read from
    # the label (whatever this install's dictionaries); not the token latent
    synonyms = page3.split('id="synonyms"', 1)[1].split("</table>", 1)[0]
    assert "<code> dog</code>" in synonyms and "<code>犬</code>" in synonyms and 'href="#f0"' in synonyms
    assert 'href="#f1"' not in synonyms
    assert "JMdict: 犬 = dog" in synonyms and "<td>35/50 (70%)</td>" in synonyms
    assert index.count('<td class="l">layer 3</td>') == 1 and index.count('<td class="l">layer 9</td>') == 1
    assert "the top 2 of 2 by confidence" in index
    # the dead latent's label line is counted apart and is no class
    assert "3 feature records (1 dead: they never fired on the corpus; counted apart, not a class)" in page3
    assert "2 labels (1 label lines of dead latents left out)" in page3
    shares = page3.split("<h2>Shares over all", 1)[1].split("</table>", 1)[0]
    assert "1 / 2" in shares and "/ 3" not in shares
    # cards: the labelled latents by class, the dead one last
    assert [int(f) for f in re.findall(r"<h3>#(\d+) ", page3)] == [1, 0, 2]


def test_report_of_one_saes_flat_folder_says_how_to_make_it_a_run(tmp_path):
    from typer.testing import CliRunner

    from autointerp.cli import app

    flat = tmp_path / "my-sae-labels"
    write_jsonl(flat / "records.jsonl.zst", [FeatureRecord(model="m", layer=2, checkpoint_step=None, feature=0,
                                                           contexts=[Context(tokens=["a"], levels=[10])])])
    result = CliRunner().invoke(app, ["report", str(flat)])
    assert result.exit_code == 1 and "move them into a site folder" in str(result.exception)
    assert not (flat / "report").exists()


def test_sae_metrics_from_before_saelenss_definitions_are_not_shown_under_their_names():
    """A metrics.json without "definitions" was measured the old way: its explained variance (on
    unit-norm inputs) is not shown as SAELens's, and the CE/KL scores of then had other keys; the
    figures whose definitions did not change (L0, dead, cosine) still show."""
    from autointerp.report.sae import metric_rows

    old = {"explained_variance": 0.745, "l0": 32.0, "dead_fraction": 0.149, "ce_loss_recovered": 0.952,
           "kl_score": 0.94, "cosine_similarity": 0.9956, "delta_ce": 0.96}
    rows = {r["key"]: r for r in metric_rows(old)}
    assert rows["explained_variance"]["value"] == "–" and "predates" in rows["explained_variance"]["what"]
    assert rows["ce_loss_score"]["value"] == "–" and rows["kl_div_score"]["value"] == "–"
    assert rows["delta_ce"]["value"] == "–"
    assert rows["l0"]["value"] == "32.0" and rows["cossim"]["value"] == "0.996" and rows["dead_fraction"]["value"] == "14.9%"
    new = {**old, "explained_variance": 0.836, "ce_loss_score": 0.881, "definitions": {}}
    rows = {r["key"]: r for r in metric_rows(new)}
    assert rows["explained_variance"]["value"] == "0.836" and rows["ce_loss_score"]["value"] == "88.1%"
    assert all(r["what"].split(":")[0] in ("SAELens", "SAEBench", "autointerp") for r in rows.values())

"""The report over a whole SAE's labels: shares from every latent with Wilson intervals, the LLM
sample beside them, the control banner on every page, noise greyed, and old label files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from autointerp.run import Site
from scipy.stats import binomtest

from autointerp.report.build import build_report
from autointerp.report.read import read_step
from autointerp.report.views import step_summary
from autointerp.jsonl import write_jsonl
from autointerp.schema import Context, FeatureRecord
from test_report import CHROMIUM_FLAGS, chromium_path

STEPS = (10, 600)
N = 40  # latents per checkpoint
SAMPLED = {3, 11, 17, 25, 38}  # the LLM-described sample at each checkpoint


def granularity_of(feature: int) -> str:
    # 22 token, 10 concept-synonym, 5 concept-semantic, 3 uninterpretable out of 40
    return ("token" if feature < 22 else "concept-synonym" if feature < 32
            else "concept-semantic" if feature < 37 else "uninterpretable")


def record(step: int, feature: int) -> FeatureRecord:
    tokens = ["Debian", " の", "設定", "ファイル", " more", " text"]
    ctx = Context(tokens=tokens, levels=[0, 2, 10, 4, 1, 0], activations=[0.0, 0.2, 1.0, 0.4, 0.1, 0.0])
    return FeatureRecord(model="m", layer=0, checkpoint_step=step, feature=feature, contexts=[ctx] * 3,
                         density=0.01, max_activation=1.0)


def label_line(step: int, feature: int, new_format: bool = True) -> dict:
    """A labels.jsonl line as a dict: the all-latent format (sampled, evidence_summary,
    bilingual_firing), or the old one (a label only for the LLM-described latents)."""
    sampled = feature in SAMPLED
    line = {
        "checkpoint_step": step, "feature": feature, "granularity": granularity_of(feature),
        "description": f"the word 設定 in config sentences #{feature}" if sampled else "",
        "cross_lingual": feature in (22, 23),  # two synonym latents in the paper's sense
        "language": "ja" if feature % 2 else "mix",
        "language_profile": {"trend": "ja" if feature % 2 else "mix", "cross_lingual": feature % 4 == 0},
        "scores": {}, "confidence": 0.8,
        "explainer": {"model": "smollm2-135m-instruct", "engine": "llama.cpp"} if sampled else {},
    }
    if sampled:
        line["scores"] = {"simulation": 0.1, "detection": 0.55, "fuzzing": 0.5,
                          "ci95": {"simulation": [-0.2, 0.4], "detection": [0.41, 0.69], "fuzzing": [0.36, 0.64]},
                          "auc": {"detection": 0.58}, "n": {"simulation": 20, "detection": 20, "fuzzing": 20}}
    if new_format:
        line |= {"sampled": sampled, "bilingual_firing": feature % 4 == 0, "scores_noise": False,
                 "evidence_summary": f"“設定” 30/50 · “ more” 8/50 · en+ja #{feature}"}
    return line


def control(noise: bool = False, signal: set[str] | None = None, n: int = 12) -> dict:
    """What interp.control.ControlResult.to_dict() writes: the methods in `signal` discriminate
    (default: detection, unless `noise`), the others do not; `n` latents scored both ways."""
    signal = (set() if noise else {"detection"}) if signal is None else signal
    few = n < 10

    def method(name: str, metric: str, gap: float) -> dict:
        vouched = name in signal and not few
        lo, hi = (round(gap - 0.09, 2), round(gap + 0.09, 2)) if vouched or few else (round(gap - 0.1, 2), 0.05)
        verdict = (f"{name} discriminates (gap {gap:.2f}, 95% CI {lo:.2f}–{hi:.2f})" if vouched else
                   f"{name}: {n} latents are too few for a verdict: treat it as noise" if few else
                   f"{name} from smollm2 does not beat shuffled descriptions: treat it as noise")
        return {"metric": metric, "n": n, "matched": 0.5 + gap, "shuffled": 0.5, "gap": gap, "ci95": [lo, hi],
                "p": 0.001 if vouched else 0.4, "p_holm": 0.003 if vouched else 0.8, "signal": vouched,
                "verdict": verdict}

    methods = {"detection": method("detection", "auc", 0.19 if "detection" in signal else -0.05),
               "simulation": method("simulation", "pearson", 0.03 if "simulation" in signal else -0.01),
               "fuzzing": method("fuzzing", "balanced accuracy", 0.1 if "fuzzing" in signal else 0.0)}
    vouched = [m for m, d in methods.items() if d["signal"]]
    verdict = "; ".join(d["verdict"] for d in methods.values()) if vouched else (
        "scores from smollm2-135m-instruct do not beat shuffled descriptions (best: detection gap −0.05, "
        "95% CI −0.13–0.03; 12 latents): treat them as noise")
    return {"methods": methods, "n_latents": n, "model": "smollm2-135m-instruct", "seed": 0, "fraction": 0.2,
            "noise": not vouched, "vouched": vouched, "verdict": verdict, "min_latents": 10,
            "rule": "signal: the gap's exact sign-flip p-value, Holm-corrected over the 3 method(s) tested, below "
                    "0.05 (one-sided), on at least 10 latents", "sample": []}


def make_run(root: Path, new_format: bool = True, manifest_control: dict | None = None, stage: str = "label",
             with_scores: bool = True) -> Path:
    run = root / "run"
    for step in STEPS:
        folder = run / f"step-{step}"
        write_jsonl(folder / "records.jsonl", [record(step, f) for f in range(N)])
        lines = [label_line(step, f, new_format) for f in range(N)]
        if not new_format:  # an old run labelled only its LLM sample
            lines = [line for line in lines if line["feature"] in SAMPLED]
        if not with_scores:
            for line in lines:
                line["scores"] = {}
        write_jsonl(folder / "labels.jsonl", lines)
    stages = {"label": {"features": len(SAMPLED), "llm": {"model": "smollm2-135m-instruct", "engine": "llama.cpp"},
                        "sample": {"n": len(SAMPLED), "seed": 0,
                                   "strata": {"token": 3, "concept-synonym": 1, "uninterpretable": 1},
                                   "per_checkpoint": {"step-600": {"n": 5, "strata": {"token": 2, "uninterpretable": 3}}}}}}
    if manifest_control is not None:
        stages[stage] = stages.get(stage, {}) | {"control": manifest_control}
    (run / "manifest.json").write_text(json.dumps({"stages": stages}))
    return run


def pages(run: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted((run / "report").glob("*.html"))}


def card(page: str, feature: int) -> str:
    start = page.index(f'id="f{feature}"')
    end = page.find('<div class="feature', start)
    return page[start:end if end >= 0 else len(page)]


def pct_interval(k: int, n: int) -> str:
    """The interval as the page prints it, computed by scipy (an oracle independent of shares.py)."""
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return f"{100 * ci.low:.1f}–{100 * ci.high:.1f}%"


def test_shares_count_every_latent_not_only_the_cards_shown(tmp_path):
    run = make_run(tmp_path, manifest_control=control(noise=False))
    build_report(run, max_features=4)  # 4 cards a page; the shares must still rest on all 40
    page = pages(run)["step-600.html"]
    assert page.count('<div class="feature') == 4
    # the LLM-described latents come first
    assert [int(f) for f in re.findall(r"<h3>#(\d+) ", page)] == sorted(SAMPLED)[:4]
    for cls, k in [("token", 22), ("concept-synonym", 10), ("concept-semantic", 5), ("uninterpretable", 3)]:
        row = re.search(rf'<tr><td class="l"><span class="tag g-{cls}">{cls}</span></td>\s*'
                        rf'<td>(\d+) / (\d+)</td><td>([\d.]+)%</td><td class="ci">([^<]+)</td>', page)
        assert row, cls
        assert (int(row[1]), int(row[2])) == (k, N)
        assert float(row[3]) == pytest.approx(100 * k / N, abs=0.05)
        assert row[4] == pct_interval(k, N)
    # the sample beside them: 5 latents, 3 of them token (3, 11, 17)
    sample_token = re.search(r'g-token">token</span></td>.*?<td>(\d+) / (\d+)</td>.*?<td>(\d+) / (\d+)</td>', page,
                             re.S)
    assert (int(sample_token[3]), int(sample_token[4])) == (3, len(SAMPLED))
    assert "Sample vs all: sample of 5 vs all 40 latents" in page
    # how the sample was drawn: the checkpoint's own strata where the manifest has them
    assert "stratified by the statistical class (seed 0; token 2, uninterpretable 3)" in page
    assert "(seed 0; token 3, concept-synonym 1, uninterpretable 1 over all checkpoints)" in pages(run)["step-10.html"]
    # bilingual firing (every 4th latent) and cross-lingual (2 synonym latents) over all 40
    assert re.search(rf"bilingual firing</td><td>10 / 40</td><td>25.0%</td><td class=\"ci\">{pct_interval(10, 40)}", page)
    assert re.search(rf"cross-lingual</td><td>2 / 40</td><td>5.0%</td><td class=\"ci\">{pct_interval(2, 40)}", page)
    index = pages(run)["index.html"]
    assert f"55.0% <span class=\"muted\">[{pct_interval(22, 40)}]</span>" in index


def test_summary_streams_labels_and_keeps_only_the_page(tmp_path):
    run = make_run(tmp_path)
    kept = read_step(run, Site(600), max_records=6, max_contexts=1)
    everything = read_step(run, Site(600))
    assert len(kept.labels) == 6 and len(everything.labels) == N  # memory: only the page's labels
    assert set(list(kept.labels)[:5]) == {(600, 0, f) for f in SAMPLED}  # the sample first
    assert kept.n_labels == N
    a, b = step_summary(kept, {}), step_summary(everything, {})
    assert a["granularity"] == b["granularity"] and a["granularity"].n == N
    assert a["granularity_sample"].n == len(SAMPLED) and a["scores"]["detection"] == [0.55] * len(SAMPLED)


def test_the_control_banner_is_on_every_page(tmp_path):
    run = make_run(tmp_path, manifest_control=control(noise=False))
    build_report(run)
    for name, html in pages(run).items():
        banner = re.search(r'<div class="control (\w+)" id="control">(.*?)</div>', html, re.S)
        assert banner, name
        assert banner[1] == "signal"
        assert "detection discriminates (gap 0.19, 95% CI 0.10–0.28)" in banner[2]
        assert "0.100 – 0.280" in banner[2]  # the gap's interval in the table
        # it comes before any feature card or figure
        assert html.index('id="control"') < min(i for i in (html.find('<div class="feature'), html.find("<figure"))
                                                  if i >= 0)


def test_noise_scores_are_greyed_and_labelled(tmp_path):
    run = make_run(tmp_path, manifest_control=control(noise=True), stage="score")  # the score stage's control
    build_report(run)
    all_pages = pages(run)
    for name, html in all_pages.items():
        assert '<div class="control noise" id="control">' in html, name
        assert "treat them as noise" in html
    page = all_pages["step-10.html"]
    spans = re.findall(r'<span class="score([^"]*)" data-method="(\w+)">', page)
    assert len(spans) == 3 * len(SAMPLED)
    assert all(cls == " noise" for cls, _ in spans)
    assert page.count('<span class="noise-tag">noise</span>') >= 3 * len(SAMPLED)
    # the index's mean simulation is greyed too
    assert re.search(r'<td class="noise">0\.100 \(n=5\) <span class="noise-tag">noise</span></td>',
                     all_pages["index.html"])


def test_a_method_with_signal_is_not_greyed_but_the_others_are(tmp_path):
    run = make_run(tmp_path, manifest_control=control(noise=False))
    build_report(run)
    page = pages(run)["step-600.html"]
    spans = dict((m, cls) for cls, m in re.findall(r'<span class="score([^"]*)" data-method="(\w+)">', page))
    assert spans == {"detection": "", "simulation": " noise", "fuzzing": " noise"}
    # with what each score rests on: its interval and n, and the AUC
    assert "detection 0.550 (95% CI 0.41–0.69, n=20), AUC 0.58" in page


def test_scores_without_a_control_are_greyed_and_a_stats_only_run_says_so(tmp_path):
    run = make_run(tmp_path / "a", manifest_control=None)
    build_report(run)
    for html in pages(run).values():
        assert '<div class="control unchecked" id="control">' in html
    assert '<span class="score noise" data-method="detection">' in pages(run)["step-10.html"]
    run = make_run(tmp_path / "b", manifest_control=None, with_scores=False)
    build_report(run)
    for html in pages(run).values():
        assert '<div class="control none" id="control">' in html and "No LLM scores in this run" in html


OUTCOMES = {  # name -> (manifest control, the methods shown as information, why the others are greyed)
    "all noise": (control(noise=True), set(), "noise"),
    "simulation only (demo-real's)": (control(signal={"simulation"}), {"simulation"}, "noise"),
    "detection and fuzzing": (control(signal={"detection", "fuzzing"}), {"detection", "fuzzing"}, "noise"),
    "all signal": (control(signal={"simulation", "detection", "fuzzing"}), {"simulation", "detection", "fuzzing"}, ""),
    "too few latents": (control(signal={"simulation", "detection"}, n=6), set(), "too few latents"),
    "no control": (None, set(), "no control"),
}


@pytest.mark.parametrize("outcome", list(OUTCOMES))
def test_every_control_outcome_renders_and_greys_only_what_it_does_not_vouch_for(tmp_path, outcome):
    manifest_control, vouched, why = OUTCOMES[outcome]
    run = make_run(tmp_path, manifest_control=manifest_control)
    build_report(run)  # the templates are strict: a name they read and the view lacks fails here
    all_pages = pages(run)
    for name, html in all_pages.items():
        banner = re.search(r'<div class="control (\w+)" id="control">(.*?)</div>', html, re.S)
        assert banner, name
        if manifest_control is None:
            assert banner[1] == "unchecked" and "stay out of the granularity decision" in banner[2]
            continue
        assert banner[1] == ("signal" if vouched else "noise")
        said = re.search(r'<p class="vouched">(.*?)</p>', banner[2])[1]
        if vouched:
            assert said.startswith("The control vouches for ")
            assert all(m in said.split(":")[0] for m in vouched)
            assert not any(m in said.split(":")[0] for m in {"simulation", "detection", "fuzzing"} - vouched)
        else:
            assert said.startswith("The control vouches for no score") and why in said
    page = all_pages["step-600.html"]
    spans = dict((m, cls) for cls, m in re.findall(r'<span class="score([^"]*)" data-method="(\w+)">', page))
    assert spans == {m: ("" if m in vouched else " noise") for m in ("simulation", "detection", "fuzzing")}
    greyed_tags = re.findall(r'data-method="(\w+)">[^<]*</span> <span class="noise-tag">([^<]+)</span>', page)
    assert {m for m, _ in greyed_tags} == {"simulation", "detection", "fuzzing"} - vouched
    assert all(tag == why for _, tag in greyed_tags)
    index = all_pages["index.html"]
    cell = re.search(r'<td( class="noise")?>0\.100 \(n=5\)( <span class="noise-tag">([^<]+)</span>)?</td>', index)
    assert cell and bool(cell[1]) == ("simulation" not in vouched)
    assert (cell[3] or "") == ("" if "simulation" in vouched else why)


def test_a_control_written_by_label_renders_with_each_verdict(tmp_path):
    """The manifest of a real `label` run (fake LLM server), rendered as written, then with its
    simulation verdict turned to signal as make demo-real's control gave it."""
    from typer.testing import CliRunner

    from autointerp.cli import app
    from autointerp.labels.decision import trusted_scores
    from autointerp.schema import Scores
    from test_label import scorer_answer, write_run
    from fakeserver import FakeServer

    run, _ = write_run(tmp_path, n=30)
    with FakeServer(answer=scorer_answer) as server:
        result = CliRunner().invoke(app, ["label", str(run), "--server", server.base_url, "--features", "12",
                                          "--engine", "openai-compatible", "--concurrency", "8"])
        assert result.exit_code == 0, result.output
    manifest = json.loads((run / "manifest.json").read_text())
    written = manifest["stages"]["label"]["control"]
    assert set(written["methods"]) == {"simulation", "detection", "fuzzing"}
    assert written["vouched"] == [m for m, d in written["methods"].items() if d["signal"]]
    assert all({"p", "p_holm"} <= set(d) for d in written["methods"].values() if d["gap"] is not None)
    for turned in ([], ["simulation"]):
        for name, method in written["methods"].items():
            method["signal"] = name in turned
        written["vouched"], written["noise"] = turned, not turned
        (run / "manifest.json").write_text(json.dumps(manifest))
        build_report(run)
        page = next(html for name, html in pages(run).items() if name.startswith("step-"))
        said = re.search(r'<p class="vouched">(.*?)</p>', page)[1]
        assert said.startswith("The control vouches for simulation:" if turned else "The control vouches for no score")
        assert re.search(r'<td( class="noise")?>', pages(run)["index.html"])
    # the decision follows the same verdict: only vouched methods reach it
    sc = Scores(10, 0, simulation=0.3, detection=0.7, fuzzing=0.6)
    assert trusted_scores(sc, []) is None
    kept = trusted_scores(sc, ["simulation"])
    assert (kept.simulation, kept.detection, kept.fuzzing) == (0.3, None, None)


def test_cards_show_the_evidence_above_the_description_with_the_explainer(tmp_path):
    run = make_run(tmp_path, manifest_control=control(noise=False))
    build_report(run)
    page = pages(run)["step-600.html"]
    f11 = card(page, 11)
    assert f11.index('class="evidence"') < f11.index('class="desc"')
    assert "“設定” 30/50 · “ more” 8/50 · en+ja #11" in f11
    assert "— smollm2-135m-instruct" in f11
    # bilingual firing and cross-lingual are told apart: #0 fires in both scripts, #22 is a synonym
    assert "bilingual firing</span>" in card(page, 0) and ">cross-lingual</span>" not in card(page, 0)
    assert ">cross-lingual</span>" in card(page, 22) and "bilingual firing</span>" not in card(page, 22)
    assert "bilingual firing</span>" not in card(page, 1)
    # a statistical-only card says so, and has its evidence but no description
    f1 = card(page, 1)
    assert "statistical label only" in f1 and 'class="evidence"' in f1 and 'class="desc"' not in f1


def test_an_old_label_file_still_renders(tmp_path):
    run = make_run(tmp_path, new_format=False, manifest_control=control(noise=True))
    build_report(run)
    page = pages(run)["step-10.html"]
    assert page.count('<div class="feature') == len(SAMPLED)  # the labelled ones, as before
    assert "These labels cover 5 of the checkpoint's 40 live latents" in page
    assert 'class="desc"' in card(page, 3) and 'class="evidence"' not in card(page, 3)
    assert "statistical label only" not in page  # an old label with a description is the LLM's
    # the old `cross_lingual` was the profile flag (every 4th latent here): it reads as bilingual
    # firing; the paper's cross-lingual is kept only for a synonym latent
    assert re.search(r"bilingual firing</td><td>0 / 5</td>", page)
    assert re.search(r"cross-lingual</td><td>0 / 5</td>", page)


# --- Japanese renders ----------------------------------------------------------------------------

# Appended to a copy of a report page: draws two different kanji and two private-use characters
# (which no font has: the tofu box) on a canvas in the font of the page's first context line, and
# writes whether each pair's pixels differ. Tofu draws every missing character as the same box.
GLYPH_PROBE = """<script>
(function () {
  var el = document.querySelector(".ctx");
  var font = "40px " + getComputedStyle(el).fontFamily;
  function pixels(ch) {
    var c = document.createElement("canvas"); c.width = 64; c.height = 64;
    var x = c.getContext("2d"); x.font = font; x.fillStyle = "#000"; x.textBaseline = "top"; x.fillText(ch, 4, 4);
    return Array.prototype.join.call(x.getImageData(0, 0, 64, 64).data, ",");
  }
  var out = document.createElement("pre"); out.id = "glyph-probe";
  out.textContent = JSON.stringify({kanji: pixels("設") !== pixels("定"), tofu: pixels("\\uE000") !== pixels("\\uE001"),
                                    ink: pixels("設") !== pixels(" "), font: font});
  document.body.appendChild(out);
})();
</script>"""


def _probe(page: Path, profile: Path, env: dict | None = None) -> dict:
    profile.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([chromium_path(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                            capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})
    found = re.search(r'<pre id="glyph-probe">(.*?)</pre>', result.stdout, re.S)
    assert found, result.stderr[-2000:]
    return json.loads(found[1].replace("&amp;", "&").replace("&quot;", '"'))


@pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (make test installs it)")
@pytest.mark.timeout(300)
def test_japanese_renders_as_glyphs_not_boxes_in_headless_chromium(tmp_path):
    # fontconfig knows a Japanese font (the Makefile installs fonts-noto-cjk beside chromium)
    if shutil.which("fc-list"):
        fonts = subprocess.run(["fc-list", ":lang=ja", "family"], capture_output=True, text=True).stdout
        assert fonts.strip(), "no Japanese font: apt-get install fonts-noto-cjk"
    run = make_run(tmp_path, manifest_control=control(noise=False))
    build_report(run)
    html = (run / "report" / "step-600.html").read_text(encoding="utf-8")
    assert "設定" in html and "Noto Sans CJK JP" in html  # the page holds Japanese and names a CJK face
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", GLYPH_PROBE + "</body>"), encoding="utf-8")
    seen = _probe(probe, tmp_path / "p1")
    assert seen["ink"] and not seen["tofu"], seen  # the probe draws, and sees two boxes as equal
    assert seen["kanji"], f"two different kanji draw the same box (tofu) in {seen['font']}"
    # the probe can fail: with fontconfig limited to a Latin font folder, the kanji become boxes
    latin = Path("/usr/share/fonts/truetype/dejavu")
    if latin.is_dir():
        conf = tmp_path / "fonts.conf"
        conf.write_text(f'<?xml version="1.0"?><fontconfig><dir>{latin}</dir>'
                        f'<cachedir>{tmp_path / "fc-cache"}</cachedir></fontconfig>')
        assert not _probe(probe, tmp_path / "p2", {"FONTCONFIG_FILE": str(conf)})["kanji"]

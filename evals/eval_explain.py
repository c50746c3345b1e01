"""Does the explainer write descriptions that mean something? (`make eval-explain`)

Three numbers, on the 300 human-labelled dev features and on a demo run's records (a seeded
sample of live latents per checkpoint), each against the issue's target:

- distinct: distinct descriptions / features (a failed answer counts as not distinct). Target >= 90%.
- quotes top token: among the features the calibrated decision calls token-level (statistical
  model, as `label` decides for every latent), the share whose description quotes one of the
  feature's top-3 max tokens, or a JMdict gloss / headword of one. Target >= 60%.
- copies a template: descriptions that repeat >= 6 consecutive words of any prompt template in
  prompts/ (the explainer's worked examples included). Target 0.

Explainer: the embedded llama.cpp server (SmolLM2-135M-Instruct) unless --server. Explanations
are cached as RUN/step-N/explanations.jsonl under --out (default runs/eval-explain for the dev
file, which `make eval-scores` reads; runs/eval-explain-demo for the demo), and answers in
cache.sqlite, so a rerun prints the same numbers without a request.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from rich.console import Console

from autointerp.labels import decision as granularity
from autointerp.labels import dictionary
from autointerp.labels import language
from autointerp.labels import sampling
from autointerp import run as run_lib
from autointerp.interp.explainer import ExplainSettings, explain_records
from autointerp.llm.prompts import PROMPTS_DIR
from autointerp.progress import progress_bar
from autointerp.records.read import read_records
from autointerp.schema import Explanation, FeatureRecord

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"
DEMO = REPO / "runs/demo"  # make demo's


def _shown(path: Path) -> str:
    """A path as printed: relative to the working directory where it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


COPY_WORDS = 6  # the issue: no description repeats 6 or more consecutive words of a template

_WORD = re.compile(r"[\w']+", re.UNICODE)


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def template_ngrams(n: int = COPY_WORDS, folder: Path = PROMPTS_DIR) -> set[tuple[str, ...]]:
    """Every n consecutive words of every prompt template (jinja markup dropped)."""
    out: set[tuple[str, ...]] = set()
    for path in sorted(folder.glob("*.txt")):
        text = re.sub(r"{[{%#].*?[}%#]}", " ", path.read_text(encoding="utf-8"), flags=re.S)
        out |= ngrams(words(text), n)
    return out


def copies_template(description: str, grams: set[tuple[str, ...]], n: int = COPY_WORDS) -> bool:
    return bool(ngrams(words(description), n) & grams)


def top_max_tokens(record: FeatureRecord, n: int = 3) -> list[str]:
    """The n most common max tokens (cleaned, stripped), most common first."""
    counts = Counter(language.clean_token(t).strip() for t in map(language.max_token, record.contexts) if t)
    return [t for t, _ in counts.most_common() if t][:n]


def _mentions(description: str, token: str) -> bool:
    text, token = description.lower(), token.lower()
    if re.fullmatch(r"[\w']+", token, re.ASCII):  # a Latin word or number: as a whole word
        return re.search(rf"(?<![\w]){re.escape(token)}(?![\w])", text) is not None
    return token in text  # kana/kanji or symbols: as a substring


def quotes_top_token(description: str, record: FeatureRecord) -> bool:
    """The description names one of the top-3 max tokens, or a dictionary gloss / headword of one."""
    for token in top_max_tokens(record):
        if _mentions(description, token):
            return True
        linked = dictionary.english_glosses(token) | dictionary.japanese_headwords(token)
        if any(len(w) > 1 and _mentions(description, w) for w in linked):
            return True
    return False


def measure(records: list[FeatureRecord], explanations: list[Explanation]) -> dict:
    grams = template_ngrams()
    descriptions = [e.description.strip() for e in explanations]
    written = [d for d in descriptions if d]
    distinct = len({d.lower() for d in written})
    models = granularity.load_models()
    token_level = [(r, d) for r, d in zip(records, descriptions)
                   if granularity.decide(r, models=models)[0] == "token"]
    quoted = sum(quotes_top_token(d, r) for r, d in token_level)
    copied = [d for d in written if copies_template(d, grams)]
    return {"features": len(records), "answered": len(written), "distinct": distinct,
            "token_level": len(token_level), "quoted": quoted, "copied": len(copied), "copied_examples": copied[:3],
            "most_common": Counter(d.lower() for d in written).most_common(3)}


def report(name: str, m: dict) -> None:
    n = max(m["features"], 1)
    tl = m["token_level"]
    print(f"{name}: {m['features']} features, {m['answered']} with a description")
    print(f"  distinct descriptions       {m['distinct']}/{m['features']} = {m['distinct'] / n:.0%}   (target >= 90%)")
    share = f"{m['quoted'] / tl:.0%}" if tl else "n/a"
    print(f"  token-level quoting a top-3 max token or its gloss  {m['quoted']}/{tl} = {share}   (target >= 60%)")
    print(f"  copying >= {COPY_WORDS} words of a prompt template  {m['copied']}   (target 0)")
    for text in m["copied_examples"]:
        print(f"    copied: {text!r}")
    print("  most common: " + "; ".join(f"{k!r} x{v}" for k, v in m["most_common"]))


def explain_all(name: str, records: list[FeatureRecord], out: Path, client, settings: ExplainSettings,
                console: Console) -> list[Explanation]:
    by_step: dict[int | None, list[FeatureRecord]] = defaultdict(list)
    for r in records:
        by_step[r.checkpoint_step].append(r)
    done: dict = {}
    with progress_bar(console=console) as progress:
        task = progress.add_task(f"explain {name}", total=len(records))
        for step, recs in sorted(by_step.items(), key=lambda kv: kv[0] or 0):
            path = run_lib.step_dir(out, step if step is not None else 0) / "explanations.jsonl"
            for e in explain_records(recs, client, path, settings, on_done=lambda _: progress.advance(task)):
                done[e.key] = e
            progress.update(task, completed=len(done))
    return [done[r.key] for r in records]


def demo_records(run: Path, per_checkpoint: int, seed: int) -> list[FeatureRecord]:
    """The plain seeded sample of live latents per checkpoint (annotate's before any label run),
    found by a key scan: only the chosen records are parsed."""
    import json

    from autointerp.records.lean import scan_records

    out = []
    for step in run_lib.checkpoint_steps(run):
        path = run_lib.records_file(run_lib.step_dir(run, step))
        if not path.is_file():
            continue
        live = [key for key, is_live, _ in scan_records(path) if is_live]
        chosen = set(sampling.sample_keys(live, per_checkpoint, seed))
        found = {key: FeatureRecord.from_dict(json.loads(raw)) for key, _, raw in scan_records(path) if key in chosen}
        out += [found[k] for k in sorted(found, key=lambda k: k[1])]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dev", type=Path, default=DEV, help="the human-labelled dev file")
    ap.add_argument("--features", type=int, default=None, help="only a seeded sample of N dev features (default all 300)")
    ap.add_argument("--demo", default=str(DEMO), help="a demo run folder (read only); '' to skip")
    ap.add_argument("--demo-features", type=int, default=16, help="live latents per demo checkpoint (seeded sample)")
    ap.add_argument("--out", type=Path, default=REPO / "runs/eval-explain", help="cache for the dev explanations")
    ap.add_argument("--demo-out", type=Path, default=REPO / "runs/eval-explain-demo", help="cache for the demo's")
    ap.add_argument("--server", default=None, help="an OpenAI-compatible server (default: the embedded llama.cpp)")
    ap.add_argument("--llm", default=None, help="model name at --server")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from autointerp.llm.client import LLMClient
    from autointerp.llm.serve import endpoint

    console = Console(stderr=True)
    sets = []
    if args.dev and args.dev.exists():
        dev = read_records(args.dev)
        dev = sampling.sample_live(dev, args.features, args.seed) if args.features else dev
        sets.append(("dev", dev, args.out))
    if args.demo and Path(args.demo).is_dir():
        sets.append((f"demo ({_shown(args.demo)})", demo_records(Path(args.demo), args.demo_features, args.seed), args.demo_out))
    if not sets:
        print("no dev file and no demo run found", file=sys.stderr)
        return 1
    started = time.perf_counter()
    results = []
    with endpoint(args.server, args.llm, None, args.threads, 2048) as (url, model, engine, alive):
        for name, records, out in sets:
            client = LLMClient(url, model, cache_path=out / "cache.sqlite", concurrency=args.concurrency,
                               timeout=600, check_alive=alive, seed=args.seed)
            try:
                explanations = explain_all(name, records, out, client, ExplainSettings(engine=engine), console)
            finally:
                client.close()
            results.append((name, records, explanations))
    print(f"explainer: {model} ({engine}); prompt prompts/explain.txt; {time.perf_counter() - started:.0f} s")
    for name, records, explanations in results:
        report(name, measure(records, explanations))
    return 0


if __name__ == "__main__":
    sys.exit(main())

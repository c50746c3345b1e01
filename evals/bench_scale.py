"""Whole-SAE scale: statistical labels, memory and record size on a synthetic 32,768-latent checkpoint.

    .venv/bin/python evals/bench_scale.py [--latents 32768] [--subset 300] [--keep DIR]

Builds RUN/step-600/records.jsonl.zst (what `collect` writes) for --latents latents from windows
of the demo corpus (evals/synthetic_sae.py: 50 contexts x <= 64 tokens and 35 negatives a
latent, contexts repeating across latents as in a real SAE), counting the bytes the same records
take as plain JSONL without writing them. Then, each in a subprocess whose process tree is
sampled for memory:

  label    autointerp score RECORDS --stats-only  (every latent, streamed, on worker processes)
  report   autointerp report RUN

and, in this process, a baseline of the pre-#14 path on the first --subset latents: the records
read into a list, langdetect called on every context (no cache, no batching), one process. The
same comparison runs on the shared dev file and, when present, on the demo's records
(runs/demo/step-600 where present). Ratios are against the baseline measured in this run;
the CPU is shared, so absolute numbers move with the load (the load average is printed).
"""

from __future__ import annotations

import argparse
import os
from itertools import islice
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from synthetic_sae import SyntheticSAE, demo_pool  # noqa: E402

from autointerp.labels import decision as granularity
from autointerp.labels import evidence

from autointerp.labels import language  # noqa: E402
from autointerp.jsonl import iter_lines, to_json_line, write_jsonl  # noqa: E402
from autointerp.records.read import stream_records  # noqa: E402
from autointerp.labels.statlabels import default_workers  # noqa: E402

DEV = HERE.parents[1] / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"
DEMO_RECORDS = [Path(__file__).resolve().parents[1] / "runs/demo/step-600"]
AUTOINTERP = [sys.executable, "-m", "autointerp.cli"]


# ---- measuring a subprocess -----------------------------------------------------------------------

def _tree_memory(root: int) -> int:
    """Proportional set size (Pss: shared pages split between the processes that share them, so
    forked workers are not counted twice) of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    children.setdefault(int(fh.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                total += next(int(line.split()[1]) * 1024 for line in fh if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            pass
        todo.extend(children.get(pid, []))
    return total


# runs the command and reports the peak RSS of the largest process of its tree (its own children only)
_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(rc)")


def run_measured(args: list[str]) -> dict:
    """Run a command; wall seconds, peak memory of its whole process tree (Pss, sampled every
    50 ms), peak RSS of its largest process (getrusage, exact), CPU seconds of the tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_memory(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    sampler.join()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{output[-3000:]}")
    max_rss = int(output.rsplit("MAXRSS", 1)[1].split()[0]) * 1024
    return {"wall": wall, "tree_rss": peak[0], "max_rss": max_rss,
            "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), "output": output}


# ---- the baseline: the path before #14 -----------------------------------------------------------

def baseline_labels(path: Path, limit: int | None, out: Path) -> None:
    """The pre-#14 statistical labels (run as `bench_scale.py --baseline`, a CLI-like process): the
    records read into a list, then granularity + language profile with one plain langdetect call
    per context text (behind the lru_cache pre-#14 had, so a text repeated across latents is
    detected once), one process. Faster than the real pre-#14 code (it shares this version's
    other speed-ups), so the ratios printed understate the gain."""
    import functools

    import autointerp.cli  # noqa: F401  the same start-up as `autointerp score`

    one_call = functools.lru_cache(maxsize=65536)(language.langdetect_language)
    language.detect_languages = lambda texts: [one_call(t) for t in texts]
    started = time.perf_counter()
    records = list(islice(stream_records(path), limit))  # in memory, as before #14 (only the subset)
    write_jsonl(out, [granularity.label_record(r) for r in records])
    print(f"BASELINE_SECONDS {time.perf_counter() - started}")


def baseline_rate(path: Path, limit: int | None) -> tuple[int, float]:
    """(latents, features/s) of baseline_labels in a subprocess, from the first record read to
    the last label written (start-up excluded, as in `score`'s own features/s)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "labels.jsonl"
        result = run_measured([sys.executable, __file__, "--baseline", str(path), "--subset", str(limit or 0),
                               "--keep", str(out)])
        n = sum(1 for _ in iter_lines(out))
        return n, n / float(result["output"].rsplit("BASELINE_SECONDS", 1)[1].split()[0])


def reported_rate(output: str) -> float:
    """The features/s `autointerp score --stats-only` prints (labelling alone, start-up excluded)."""
    return float(output.rsplit("statistical labels (", 1)[1].split()[0].replace(",", ""))


def label_rate(records: Path) -> dict:
    """`autointerp score --stats-only` on a copy of a records file."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / records.name
        shutil.copy(records, target)
        result = run_measured([*AUTOINTERP, "score", str(target), "--stats-only"])
        result["n"] = sum(1 for _ in iter_lines(target))
        result["rate"] = reported_rate(result["output"])
        return result


def breakdown(path: Path, n: int) -> str:
    """Where one core's time goes on the first n latents (CPU ms a latent, in this process)."""
    from autointerp.records.lean import lean_record

    clock = time.process_time
    language.LANGUAGE_CACHE.clear()
    granularity.load_models()
    t0 = clock()
    lines = [line for _, (_, line) in zip(range(n), iter_lines(path))]
    t1 = clock()
    records = [lean_record(line) for line in lines]  # what statlabels reads: contexts, density
    t3 = clock()
    texts = language.detect_records(records)
    t4 = clock()
    labels = [granularity.label_record(r, texts=ts) for r, ts in zip(records, texts)]
    t5 = clock()
    for label in labels:
        to_json_line(label)
    t6 = clock()
    models = granularity.load_models()
    groups = models[granularity.choose_model(models)].groups  # the evidence the labels' model reads
    for r in records:  # again, alone (its caches, e.g. JMdict glosses, are warm now)
        evidence.stat_features(r, groups)
    t7 = clock()
    parts = [("decompress", t1 - t0), ("lean_record (msgspec)", t3 - t1),
             ("langdetect (distinct texts)", t4 - t3), ("label_record", t5 - t4),
             ("of which evidence.stat_features (warm)", t7 - t6), ("label JSON", t6 - t5)]
    return ", ".join(f"{name} {seconds / len(records) * 1e3:.2f}" for name, seconds in parts)


def cpu_bound(n: int, cpu: float, workers: int) -> str:
    """The rate the run's CPU time allows when its workers have their cores to themselves (the
    machine is shared: the wall-clock rate moves with the other jobs' load)."""
    return f"{n / (cpu / workers):,.0f} features/s on {workers} free cores by its CPU time, start-up included"


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", type=int, default=32_768)
    p.add_argument("--subset", type=int, default=300, help="latents the baseline labels (it is slow; the dev file has 300)")
    p.add_argument("--keep", type=Path, default=None, help="build the run here and keep it")
    p.add_argument("--baseline", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline:
        return baseline_labels(args.baseline, args.subset or None, args.keep)
    workers = default_workers()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; label workers {workers}", flush=True)

    tmp = tempfile.TemporaryDirectory()
    run = args.keep or Path(tmp.name) / "run"
    records = run / "step-600" / "records.jsonl.zst"
    started = time.perf_counter()
    pool = demo_pool()
    sae = SyntheticSAE(pool, args.latents)
    plain_bytes = [0]

    def lines():
        for record in sae.records():
            line = to_json_line(record)
            plain_bytes[0] += len(line.encode("utf-8"))
            yield line

    write_jsonl(records, lines())
    compact = records.stat().st_size
    n_contexts = len({tuple(w) for w in pool})
    print(f"\nsynthetic checkpoint: {args.latents:,} latents from {n_contexts:,} demo-corpus windows, "
          f"built in {time.perf_counter() - started:.0f} s", flush=True)
    print(f"  records bytes per latent: plain JSONL {plain_bytes[0] / args.latents:,.0f}, "
          f"records.jsonl.zst {compact / args.latents:,.0f}  ({plain_bytes[0] / compact:.1f}x smaller; "
          f"{mb(plain_bytes[0])} -> {mb(compact)})", flush=True)

    label = run_measured([*AUTOINTERP, "score", str(records), "--stats-only"])
    rate = reported_rate(label["output"])
    n_base, base = baseline_rate(records, args.subset)
    print(f"  statistical labels: {rate:,.0f} features/s ({label['wall']:.0f} s wall, {label['cpu']:.0f} s CPU "
          f"= {label['cpu'] / args.latents * 1e3:.2f} ms a latent; {cpu_bound(args.latents, label['cpu'], workers)}), "
          f"peak memory {mb(label['tree_rss'])} (Pss, all processes; RSS of the largest {mb(label['max_rss'])})", flush=True)
    print(f"    baseline (pre-#14 path, first {n_base} latents, one process, start-up excluded): {base:,.1f} features/s -> "
          f"{rate / base:.1f}x", flush=True)
    print(f"    one core's CPU ms a latent (first {min(args.subset * 4, args.latents)} latents): "
          f"{breakdown(records, min(args.subset * 4, args.latents))}", flush=True)
    report = run_measured([*AUTOINTERP, "report", str(run)])
    print(f"  report: {report['wall']:.0f} s, peak memory {mb(report['tree_rss'])} (Pss; RSS of the largest "
          f"process {mb(report['max_rss'])})", flush=True)

    for name, path in [("dev file", DEV)] + [("demo step-600", d / f) for d in DEMO_RECORDS
                                             for f in ("records.jsonl.zst", "records.jsonl")]:
        if not path.exists() or (name.startswith("demo") and "demo step-600" in _done):
            continue
        _done.add(name)
        n_base, base = baseline_rate(path, args.subset)
        new = label_rate(path)
        cost = breakdown(path, min(new["n"], args.subset * 4))
        print(f"\n{name} ({path}, {new['n']} latents):\n  statistical labels {new['rate']:,.1f} features/s "
              f"({new['wall']:.1f} s wall with start-up, {new['cpu'] / new['n'] * 1e3:.1f} ms CPU a latent; "
              f"{cpu_bound(new['n'], new['cpu'], workers)}), "
              f"peak memory {mb(new['tree_rss'])}\n    baseline (pre-#14 path, {n_base} latents, one process, start-up excluded): "
              f"{base:,.1f} features/s -> {new['rate'] / base:.1f}x\n    one core's CPU ms a latent: {cost}", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}", flush=True)
    tmp.cleanup()


_done: set[str] = set()

if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# GPU check: train the embedded model's SAE and run `collect` on CUDA, with the CPU figures beside.
#
#   bash evals/gpu_check.sh [LM_CHECKPOINT]        (output also in $OUT/gpu_check.txt when OUT is set)
#
# One shot, a few minutes of GPU time (every step has a timeout; the whole stays under 8 min),
# installs nothing from the network. It needs a Python whose torch sees a CUDA GPU plus this
# project's dependencies: it tries .venv/bin/python, then python3; where a dependency is missing
# it installs it offline from a wheel folder ($WHEELS, or pip's configured find-links) or says
# which one is missing. LM_CHECKPOINT (default runs/demo/lm/step-600) is the embedded demo model;
# without one a small model of the demo's shape is trained for 60 steps on the CPU first.
# GPU_CHECK_CORPUS=FILE.jsonl[.gz] names the corpus (default: the demo's debian-reference where installed).
# GPU_CHECK_ALLOW_CPU=1 runs every "cuda" step on the CPU instead (tests the plumbing only).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUTDIR=${OUT:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/gpu_check.txt
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }
say "repo $REPO, output $OUTDIR"

# ---- a Python with torch + CUDA --------------------------------------------------------------
DEVICE=cuda
PY=""
for cand in "$REPO/.venv/bin/python" python3 python; do
  command -v "$cand" >/dev/null 2>&1 || [ -x "$cand" ] || continue
  status=$("$cand" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())' 2>&1 | tail -1)
  say "$cand: torch ${status}"
  if [ "$("$cand" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)" = "True" ]; then PY=$cand; break; fi
done
if [ -z "$PY" ]; then
  if [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
    PY=${PY:-$REPO/.venv/bin/python}; DEVICE=cpu
    say "CUDA unavailable: GPU_CHECK_ALLOW_CPU=1, running the 'cuda' steps on the CPU (plumbing test, no GPU figures)"
  else
    say "CUDA IS NOT AVAILABLE: no Python here has a torch that sees a GPU (see above). Nothing was measured."
    say "nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | head -2)"
    exit 2
  fi
fi
say "python $PY; $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")')"

# ---- the project's dependencies, offline -------------------------------------------------------
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
MODULES="transformers tokenizers safetensors numpy typer rich langdetect zstandard msgspec jinja2"
missing=$("$PY" - <<EOF
import importlib.util
print(" ".join(m for m in "$MODULES".split() if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  say "missing modules: $missing; installing offline (no network)"
  declare -A PKG=([langdetect]=langdetect [zstandard]=zstandard [msgspec]=msgspec [typer]=typer [rich]=rich [jinja2]=jinja2
                  [numpy]=numpy [safetensors]=safetensors [tokenizers]=tokenizers [transformers]=transformers)
  pkgs=$(for m in $missing; do echo -n "${PKG[$m]} "; done)
  "$PY" -m pip install -q --no-index ${WHEELS:+--find-links "$WHEELS"} $pkgs \
    || { say "could not install $pkgs offline (set WHEELS=folder of wheels); stopping"; exit 3; }
fi
"$PY" -c 'import autointerp.cli' || { say "autointerp does not import with $PY; stopping"; exit 3; }
# typer < 0.12 silently drops Annotated options ("No such option: --model"): pyproject asks for >= 0.12
say "versions: $("$PY" -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("torch", "transformers", "typer", "click")))')"

# ---- corpus and model -----------------------------------------------------------------------
WORK=$OUTDIR/work
mkdir -p "$WORK"
if [ -n "${GPU_CHECK_CORPUS:-}" ]; then  # e.g. the demo corpus exported to JSONL on a machine that has it
  CORPUS=$GPU_CHECK_CORPUS
elif [ -f /usr/share/debian-reference/debian-reference.en.txt.gz ] && [ -f /usr/share/debian-reference/debian-reference.ja.txt.gz ]; then
  CORPUS=debian-reference
else  # the demo corpus is a Debian package; any text measures throughput
  CORPUS=$WORK/corpus.jsonl
  "$PY" - "$CORPUS" <<'EOF'
import json, sys, pathlib
texts = [p.read_text(errors="ignore") for p in sorted(pathlib.Path(".").glob("**/*.md")) + sorted(pathlib.Path("autointerp").glob("*.py"))]
paragraphs = [t.strip() for text in texts for t in text.split("\n\n") if len(t.strip()) > 80]
with open(sys.argv[1], "w") as f:
    for p in (paragraphs * 8)[:3000]:
        f.write(json.dumps({"text": p}) + "\n")
EOF
  say "no debian-reference package: corpus from the repo's own text ($CORPUS)"
fi
LM=${1:-runs/demo/lm/step-600}
if [ ! -f "$LM/config.json" ]; then
  say "no LM checkpoint at $LM: training the demo's model shape for 60 steps on the CPU"
  timeout 300 "$PY" -m autointerp.cli lm train --out "$WORK/lm" --train-steps 60 --steps 60 --corpus "$CORPUS" \
    >"$WORK/lm_train.log" 2>&1 || { say "lm train failed:"; tail -5 "$WORK/lm_train.log"; exit 4; }
  LM=$WORK/lm/step-60
fi
say "LM $LM, corpus $CORPUS, layer 2"

# ---- measurements (each step with its own timeout; CPU runs use smaller budgets) -------------------
"$PY" - "$LM" "$CORPUS" "$WORK" "$DEVICE" <<'EOF'
import json, signal, sys, time, subprocess, torch
lm, corpus, work, device = sys.argv[1:5]
rows = []

def cli(args, limit):
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "autointerp.cli", *args], capture_output=True, text=True,
                              timeout=limit)
    except subprocess.TimeoutExpired:
        print(f"autointerp {' '.join(args)} ran past {limit} s: stopped", flush=True)
        return None
    if proc.returncode:
        print(f"FAILED: autointerp {' '.join(args)}\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}", flush=True)
        return None
    return time.perf_counter() - started

def sae_train(dev, tokens, limit):
    out = f"{work}/sae-{dev}"
    seconds = cli(["sae", "train", "--model", lm, "--layer", "2", "--corpus", corpus, "--train-tokens", str(tokens),
                   "--device", dev, "--out", out, "--eval-docs", "50", "--force"], limit)
    if seconds is None:
        return None
    m = json.load(open(f"{out}/metrics.json"))
    rows.append((f"sae train ({dev}, fp32)", m["train_tokens"], m["train_seconds"], m["train_tokens"] / m["train_seconds"],
                 f"fvu {m.get('fvu', float('nan')):.3f}, {seconds:.0f} s with LM load + eval"))
    print(rows[-1], flush=True)
    return out

class Late(Exception):
    pass

def _late(*_):
    raise Late()

signal.signal(signal.SIGALRM, _late)

def collect(dev, sae_dir, max_docs, dtype, limit):
    signal.alarm(limit)
    try:
        _collect(dev, sae_dir, max_docs, dtype)
    except Late:
        print(f"collect ({dev}, {dtype}) ran past {limit} s: stopped", flush=True)
    except Exception as exc:
        print(f"collect ({dev}, {dtype}) failed: {type(exc).__name__}: {exc}", flush=True)
    finally:
        signal.alarm(0)

def _collect(dev, sae_dir, max_docs, dtype):
    from autointerp.lm.activations import load_lm
    from autointerp.lm.corpus import load_corpus
    from autointerp.records.collect import iter_collect
    from autointerp.sae import load_sae
    from autointerp.jsonl import write_jsonl
    docs = load_corpus(corpus, limit=max_docs)
    if max_docs is None and dev.startswith("cuda"):
        docs = docs * 8  # the demo corpus is ~150k tokens: a GPU needs more to show its rate
    model, tokenizer = load_lm(lm, device=dev)
    model = model.to(dtype)
    sae = load_sae(sae_dir, device=dev)
    tokens = [0]
    def on_batch(n_ctx, n_tok):
        tokens[0] += n_tok
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    records = iter_collect(model, tokenizer, sae, docs, 2, device=dev, on_batch=on_batch)
    n = write_jsonl(f"{work}/records-{dev}-{str(dtype).split('.')[-1]}.jsonl.zst", records)
    seconds = time.perf_counter() - started
    rows.append((f"collect ({dev}, LM {str(dtype).split('.')[-1]})", tokens[0], seconds, tokens[0] / seconds,
                 f"{n} latents, {len(docs)} docs, records written"))
    print(rows[-1], flush=True)

torch.set_num_threads(max(1, torch.get_num_threads()))
print(f"CPU threads {torch.get_num_threads()}; device {device}"
      + (f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else ""), flush=True)
cpu_sae = sae_train("cpu", 100_000, 90)
gpu_sae = sae_train(device, 2_000_000 if device == "cuda" else 100_000, 120)
sae_dir = gpu_sae or cpu_sae
if sae_dir:
    collect("cpu", sae_dir, 500, torch.float32, 90)
    collect(device, sae_dir, None, torch.float32, 80)
    if device == "cuda" and torch.cuda.is_bf16_supported():
        collect(device, sae_dir, None, torch.bfloat16, 80)
print("\n| step | tokens | seconds | tokens/s | notes |\n|---|---:|---:|---:|---|")
for name, tokens, seconds, rate, note in rows:
    print(f"| {name} | {tokens:,} | {seconds:.1f} | {rate:,.0f} | {note} |")
EOF
rc=$?
say "done (exit $rc); full log: $LOG"
exit $rc

"""Benchmark: tokens/s of this project's TopK SAE training step vs SAELens's, same data, same run.

    .venv/bin/python evals/bench_sae.py            # d_model 256, expansion 16, k 32, batch 4096

Our step runs here (main venv). SAELens's TopKTrainingSAE step (forward, loss, backward, grad
clipping, Adam, as its SAETrainer._train_step does) runs in a subprocess with the bench venv's
python (.venv-bench, where sae-lens is installed; never in the main venv) on the same
activations, saved to a temporary safetensors file. Each is timed with and without AuxK
(a quarter of the latents marked dead).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Before torch loads OpenMP: on a shared machine, spinning OpenMP threads that wait for a
# descheduled peer made both SAEs several times slower (measured, docs/sae.md). The SAELens
# subprocess inherits the same setting. Override with OMP_WAIT_POLICY=ACTIVE.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autointerp.sae import SAEConfig, TopKSAE  # noqa: E402
from autointerp.sae.train import training_loss  # noqa: E402

SAELENS_STEP = r"""
import json, statistics, sys, time
import torch
from safetensors.torch import load_file
from sae_lens import __version__
from sae_lens.saes.sae import TrainStepInput, TrainCoefficientConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
args = json.loads(sys.argv[2])
torch.set_num_threads(args["threads"])
torch.manual_seed(0)
batches = load_file(sys.argv[1])["x"]
sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args["d_model"], d_sae=args["d_sae"], k=args["k"]))
opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
coefs = {k: (v.value if isinstance(v, TrainCoefficientConfig) else v) for k, v in sae.get_coefficients().items()}
out = {"version": __version__}
for name, dead in (("no_auxk", None), ("auxk", torch.arange(args["d_sae"]) % 4 == 0)):
    times = []
    for step in range(args["warmup"] + args["steps"]):
        x = batches[step % batches.shape[0]]
        t = time.perf_counter()
        res = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefs, dead_neuron_mask=dead,
                                                       n_training_steps=step, is_logging_step=False))
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step >= args["warmup"]:
            times.append(time.perf_counter() - t)
    out[name] = x.shape[0] / statistics.median(times)
print(json.dumps(out))
"""


def ours(batches: torch.Tensor, args: dict) -> dict[str, float]:
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_model=args["d_model"], d_sae=args["d_sae"], k=args["k"]))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    out = {}
    for name, dead in (("no_auxk", None), ("auxk", torch.arange(args["d_sae"]) % 4 == 0)):
        times = []
        for step in range(args["warmup"] + args["steps"]):
            batch = batches[step % batches.shape[0]]
            t = time.perf_counter()
            x, _ = sae.preprocess(batch)
            total_variance = (x - x.mean(0)).pow(2).sum()
            loss, _ = training_loss(sae, x, total_variance, dead, 1 / 32)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            sae.remove_parallel_decoder_grad()
            opt.step()
            sae.normalize_decoder()
            if step >= args["warmup"]:
                times.append(time.perf_counter() - t)
        out[name] = batch.shape[0] / statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bench-python", default=str(ROOT / ".venv-bench" / "bin" / "python"))
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    a = parser.parse_args()
    args = {"d_model": a.d_model, "d_sae": a.d_model * a.expansion, "k": a.k, "steps": a.steps,
            "warmup": a.warmup, "threads": a.threads}
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    # 4 distinct batches of activation-like vectors (a shared offset + noise), unit norm like the paper's
    batches = torch.randn(4, a.batch, a.d_model, generator=gen) + 2 * torch.randn(a.d_model, generator=gen)
    batches = batches / batches.norm(dim=-1, keepdim=True)

    print(f"TopK SAE training step, d_model {a.d_model}, {args['d_sae']} latents, k {a.k}, batch {a.batch}, "
          f"{a.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, median of {a.steps} steps")
    results = {"config": args, "autointerp": ours(batches, args)}
    if Path(a.bench_python).exists():
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "acts.safetensors"
            save_file({"x": batches.contiguous()}, str(path))
            proc = subprocess.run([a.bench_python, "-c", SAELENS_STEP, str(path), json.dumps(args)],
                                  capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            print("SAELens run failed:\n" + proc.stderr[-2000:])
        else:
            results["saelens"] = json.loads(proc.stdout.strip().splitlines()[-1])
    else:
        print(f"SAELens not measured: {a.bench_python} missing (create .venv-bench, see docs/sae.md)")

    print(f"{'':22}{'no AuxK':>12}{'AuxK (25% dead)':>18}")
    print(f"{'autointerp':22}{results['autointerp']['no_auxk']:>10,.0f}/s{results['autointerp']['auxk']:>16,.0f}/s")
    if "saelens" in results:
        s = results["saelens"]
        print(f"{'SAELens ' + s['version']:22}{s['no_auxk']:>10,.0f}/s{s['auxk']:>16,.0f}/s")
        ratio = {m: results["autointerp"][m] / s[m] for m in ("no_auxk", "auxk")}
        results["ratio"] = ratio
        print(f"{'ratio (ours/SAELens)':22}{ratio['no_auxk']:>11.2f}x{ratio['auxk']:>17.2f}x")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""torchrun with 2 gloo processes on CPU: each rank's language model sees about half the
tokens, and `collect` (per-rank top-k merged on rank 0) and SAE training (activations
exchanged, gradients all-reduced) give exactly what one process gives."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from autointerp.lm import train as lm
from autointerp.sae import SAEConfig, TopKSAE, TrainConfig, save_sae, train_sae

LAYER = 1
TEXTS = ["The package manager resolves dependencies between packages.",
         "パッケージ管理システムは依存関係を解決します。",
         "Use apt to install a package and dpkg to inspect it.",
         "設定ファイルは /etc にあります。",
         "The kernel boots, then systemd starts the services.",
         "ネットワークの設定を確認してください。"]
DOCS = [f"{TEXTS[i % len(TEXTS)]} ({i})" for i in range(100)]  # 4 batches of 32: ranks take 0, 2 and 1, 3

SCRIPT = """
import json, sys, torch, torch.distributed as dist
from safetensors.torch import save_file
sys.path.insert(0, {tests!r})
from test_distributed import run_both_stages
dist.init_process_group("gloo")
out = run_both_stages({folder!r})
rank = dist.get_rank()
json.dump({{"collect_tokens": out["collect_tokens"], "train_tokens": out["train_tokens"],
           "n_records": len(out["records"])}}, open({folder!r} + f"/rank{{rank}}.json", "w"))
if rank == 0:
    json.dump(out["records"], open({folder!r} + "/records.json", "w"))
    save_file({{k: v.contiguous() for k, v in out["sae"].state_dict().items()}}, {folder!r} + "/sae.safetensors")
from autointerp.distributed import leave
leave()
"""


def train_configs() -> tuple[SAEConfig, TrainConfig]:
    return SAEConfig(d_model=32, d_sae=64, k=4), TrainConfig(batch_size=256, lr=3e-3, dead_tokens=512,
                                                             buffer_tokens=1024, auxk_alpha=0.5, seed=3)


def run_both_stages(folder: str) -> dict:
    """collect and SAE training on the tiny model in `folder`, counting the tokens the LM runs on."""
    from autointerp.lm.activations import load_lm
    from autointerp.records.collect import iter_collect
    from autointerp.sae import load_sae
    from autointerp.sae.cli import activation_chunks

    torch.set_num_threads(1)
    model, tokenizer = load_lm(f"{folder}/lm")
    seen = [0]
    model.register_forward_pre_hook(lambda _m, _a, kw: seen.__setitem__(0, seen[0] + int(kw["attention_mask"].sum())),
                                    with_kwargs=True)
    records = [r.to_dict() for r in iter_collect(model, tokenizer, load_sae(f"{folder}/sae"), DOCS, LAYER, top_k=3,
                                                 batch_size=8, n_similar=2, n_random=3, n_same_token=1)]
    collect_tokens, seen[0] = seen[0], 0
    sae_cfg, train_cfg = train_configs()
    sae, result = train_sae(activation_chunks(model, tokenizer, DOCS, LAYER, 24, 1, shard=True), sae_cfg, train_cfg)
    assert result.steps >= 3
    return {"records": records, "sae": sae, "collect_tokens": collect_tokens, "train_tokens": seen[0]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    tokenizer = lm.train_tokenizer(DOCS, vocab_size=300)
    model = lm.build_model(lm.TrainConfig(d_model=32, layers=2, heads=2, seed=1), tokenizer).eval()
    model.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    save_sae(TopKSAE(SAEConfig(d_model=32, d_sae=48, k=3, layer=LAYER), seed=2), root / "sae")
    return root


def test_two_ranks_split_the_tokens_and_equal_one_process(folder, one_thread):
    script = folder / "ddp.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(Path(__file__).resolve().parent), folder=str(folder))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]

    single = run_both_stages(str(folder))
    for stage in ("collect_tokens", "train_tokens"):
        per_rank = [r[stage] for r in ranks]
        assert sum(per_rank) == single[stage]  # every token once, on one rank
        assert all(0.3 < n / single[stage] < 0.7 for n in per_rank), (stage, per_rank, single[stage])
    assert ranks[1]["n_records"] == 0  # rank 0 writes the merged records
    records = json.loads((folder / "records.json").read_text())
    assert records == json.loads(json.dumps(single["records"]))  # the same contexts, negatives, counts
    assert sum(len(r["contexts"]) for r in records) > 50
    ddp = load_file(str(folder / "sae.safetensors"))
    for name, value in single["sae"].state_dict().items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")

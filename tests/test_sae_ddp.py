"""Data-parallel training (torchrun, 2 CPU processes, gloo) equals a single-process run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from autointerp.sae import SAEConfig, TrainConfig, train_sae

SCRIPT = """
import sys, torch, torch.distributed as dist
from safetensors.torch import save_file
from autointerp.sae import SAEConfig, TrainConfig, train_sae
sys.path.insert(0, {tests!r})
from test_sae_ddp import data, configs
dist.init_process_group("gloo")
sae_cfg, train_cfg = configs()
sae, result = train_sae(data(), sae_cfg, train_cfg)
if dist.get_rank() == 0:
    save_file({{k: v.contiguous() for k, v in sae.state_dict().items()}}, sys.argv[1])
    print("steps", result.steps, "dead", result.dead_fraction)
from autointerp.distributed import leave
leave()
"""


def data() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(300, 16, generator=gen) + torch.randn(16, generator=gen) for _ in range(20)]


def configs() -> tuple[SAEConfig, TrainConfig]:
    # dead_tokens small so that AuxK (and the all-reduced dead-latent counts) take part
    return SAEConfig(d_model=16, d_sae=96, k=4), TrainConfig(batch_size=512, lr=3e-3, dead_tokens=1024,
                                                             buffer_tokens=2048, auxk_alpha=0.5, seed=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training_equals_single_process(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(Path(__file__).resolve().parent))))
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps" in proc.stdout

    sae_cfg, train_cfg = configs()
    single, result = train_sae(data(), sae_cfg, train_cfg)
    assert result.steps == 11 and result.dead_fraction < 1.0
    ddp = load_file(str(out))
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # and the run really moved away from its initialisation
    assert not torch.allclose(single.W_enc, single.W_dec)

"""A tiny bilingual Llama trained from scratch, with checkpoints at log-spaced steps.

It stands in for LLM-jp-3-1.8B's training checkpoints on a machine with no GPU and no
model hub: a byte-level BPE tokenizer and a LlamaForCausalLM are trained on the
English/Japanese Debian Reference, and OUT/step-N/ holds a Hugging Face checkpoint
(save_pretrained model + tokenizer) after N optimizer steps:

    OUT/tokenizer/            the tokenizer, trained once (a rerun reuses it)
    OUT/step-N/               config.json, model.safetensors, tokenizer files,
                              trainer_state.json + optimizer.pt (to resume from here)
    OUT/last/                 the newest resume point between checkpoints (same files)
    OUT/train_log.json        config + train/eval loss at each checkpoint

Training is deterministic: the seed fixes the initial weights, and the batch of step s is
a pure function of (seed, s), so a resumed run ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import typer
from rich.console import Console
from rich.table import Table

from autointerp.lm.corpus import Document, load_corpus
from autointerp.errors import UserError
from autointerp import options as O
from autointerp.progress import progress_bar

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
EVAL_EVERY_DOC = 20  # every 20th en/ja document pair is held out (5%)


@dataclass
class TrainConfig:
    steps: int = 600
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    seq_len: int = 64
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    vocab_size: int = 8192
    checkpoints: list[int] = field(default_factory=list)  # empty: 10, 100, 1000, ... below steps
    warmup: int = 30
    weight_decay: float = 0.1
    save_every: int = 100  # resume point (OUT/last/) between checkpoints
    corpus: str = "debian-reference"
    corpus_limit: int | None = None
    eval_every_doc: int = EVAL_EVERY_DOC  # document pairs: every Nth is held out for the eval loss

    def checkpoint_steps(self) -> list[int]:
        """The steps saved as OUT/step-N: the named ones (or powers of 10) and the final step."""
        named = self.checkpoints or [10 ** i for i in range(1, 10) if 10 ** i < self.steps]
        return sorted({s for s in named if 0 < s <= self.steps} | {self.steps})

    def resume_key(self) -> dict:
        """Settings a resumed run must share with the run it continues (all but the bookkeeping)."""
        d = asdict(self)
        d.pop("save_every")
        d["checkpoints"] = self.checkpoint_steps()
        return d


TINY = TrainConfig(steps=30, d_model=32, layers=2, heads=2, seq_len=32, batch_size=8, lr=1e-2,
                   vocab_size=512, warmup=3, corpus_limit=200, save_every=10, checkpoints=[10, 20])
"""A test-sized configuration: trains in seconds."""


# ---- tokenizer ---------------------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab_size: int = 8192):
    """Byte-level BPE over the texts, wrapped as a transformers PreTrainedTokenizerFast.

    Encoding adds BOS in front (like Llama tokenizers), so documents start from a fixed token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=1 << 20)


# ---- data --------------------------------------------------------------------------------

def is_eval_doc(doc: Document, every: int = EVAL_EVERY_DOC) -> bool:
    """Held out for evaluation (LM loss, SAE metrics): whole en/ja pairs, so both languages are measured."""
    return (doc.doc_id // 2) % every == every - 1


def token_stream(tokenizer, docs: list[Document]) -> torch.Tensor:
    """All documents as one id stream: BOS text EOS BOS text EOS ..."""
    ids = tokenizer([d.text for d in docs])["input_ids"]
    return torch.tensor([i for doc in ids for i in (*doc, tokenizer.eos_token_id)], dtype=torch.long)


def batch_for_step(stream: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """The [batch, seq_len] training batch of step `step` (0-based): a pure function of its arguments.

    Each epoch cuts the stream into windows at a fresh random offset and visits them in a
    fresh random order, both drawn from a generator seeded by (seed, epoch).
    """
    windows = (len(stream) - seq_len) // seq_len
    if windows < batch_size:
        raise UserError(f"corpus too small: {len(stream)} tokens give {windows} windows of {seq_len}, "
                        f"fewer than one batch of {batch_size}")
    per_epoch = windows // batch_size
    epoch, index = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    offset = int(torch.randint(seq_len, (1,), generator=g))
    order = torch.randperm(windows, generator=g)[index * batch_size:(index + 1) * batch_size]
    starts = offset + order * seq_len
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def eval_batches(stream: torch.Tensor, seq_len: int, batch_size: int, max_windows: int = 128) -> list[torch.Tensor]:
    if len(stream) < seq_len:  # a tiny held-out set: one short window
        return [stream.unsqueeze(0)]
    windows = stream[: (len(stream) // seq_len) * seq_len].view(-1, seq_len)[:max_windows]
    return list(windows.split(batch_size))


@torch.no_grad()
def eval_loss(model, batches: list[torch.Tensor]) -> float:
    model.eval()
    total = sum(float(model(input_ids=b, labels=b).loss) * len(b) for b in batches)
    model.train()
    return total / sum(len(b) for b in batches)


# ---- model, schedule, checkpoints ---------------------------------------------------------

def build_model(config: TrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    if config.d_model % config.heads:
        raise UserError(f"--d-model {config.d_model} is not divisible by --heads {config.heads}")
    torch.manual_seed(config.seed)
    llama = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.d_model, intermediate_size=4 * config.d_model,
        num_hidden_layers=config.layers, num_attention_heads=config.heads,
        num_key_value_heads=config.heads, max_position_embeddings=max(2048, config.seq_len),
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(llama)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, config: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=config.lr, betas=(0.9, 0.95))


def save_checkpoint(directory: Path, model, tokenizer, optimizer, config: TrainConfig, step: int,
                    train_loss: float | None, elapsed_s: float = 0.0) -> None:
    """Model + tokenizer + resume state, written to a temporary folder and renamed into place."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    state = {"step": step, "train_loss": train_loss, "elapsed_s": round(elapsed_s, 1),
             "config": config.resume_key(), "torch_rng": torch.get_rng_state().tolist()}
    (tmp / STATE_FILE).write_text(json.dumps(state))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def latest_resume_point(out: Path) -> Path | None:
    """The saved state with the highest step under OUT (a step-N/ checkpoint or last/)."""
    best, best_step = None, -1
    for d in [*out.glob("step-*"), out / "last"]:
        state = d / STATE_FILE
        if state.is_file() and (step := json.loads(state.read_text())["step"]) > best_step:
            best, best_step = d, step
    return best


# ---- training loop -----------------------------------------------------------------------

ProgressFn = Callable[[int, float], None]


def train(config: TrainConfig, out: str | Path, on_step: ProgressFn | None = None,
          console: Console | None = None, on_checkpoint: Callable[[int, object], None] | None = None) -> dict:
    """Train (or resume) into `out`; returns the train log (also written to OUT/train_log.json).

    `on_step(step, mean recent loss)` runs after every step, `on_checkpoint(step, model)` after
    each step-N/ save.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is enough
    out = Path(out)
    console = console or Console(stderr=True, quiet=True)
    if config.steps < 1:
        raise UserError(f"--train-steps must be at least 1, got {config.steps}")
    docs = load_corpus(config.corpus, limit=config.corpus_limit)
    train_docs = [d for d in docs if not is_eval_doc(d, config.eval_every_doc)]
    held_out = [d for d in docs if is_eval_doc(d, config.eval_every_doc)] or docs[-2:]

    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    else:
        t0 = time.time()
        tokenizer = train_tokenizer([d.text for d in train_docs], config.vocab_size)
        tokenizer.save_pretrained(tok_dir)
        console.print(f"tokenizer: {len(tokenizer)} tokens, trained in {time.time() - t0:.1f}s")
    stream = token_stream(tokenizer, train_docs)
    evals = eval_batches(token_stream(tokenizer, held_out), config.seq_len, config.batch_size)

    log_path = out / "train_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    resume = latest_resume_point(out)
    if resume is not None:
        state = json.loads((resume / STATE_FILE).read_text())
        if state["config"] != config.resume_key():
            changed = sorted(k for k, v in config.resume_key().items() if state["config"].get(k) != v)
            raise UserError(f"{out} holds a run with other settings ({', '.join(changed)}); "
                            "rerun with the same flags to resume, or give a new --out")
        model = LlamaForCausalLM.from_pretrained(resume, dtype=torch.float32)
        optimizer = make_optimizer(model, config)
        optimizer.load_state_dict(torch.load(resume / OPTIMIZER_FILE, weights_only=True))
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        start, elapsed0 = state["step"], state.get("elapsed_s", 0.0)
        console.print(f"{out} is already trained to step {start}" if start >= config.steps
                      else f"resuming from {resume} (step {start})")
    else:
        model = build_model(config, tokenizer)
        optimizer = make_optimizer(model, config)
        start, elapsed0 = 0, 0.0
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log.update(config=config.resume_key(), parameters=n_params,
               tokens_per_step=config.batch_size * config.seq_len, train_tokens=len(stream))
    entries = {e["step"]: e for e in log.get("checkpoints", [])}
    if start == 0:
        entries[0] = {"step": 0, "train_loss": None, "eval_loss": round(eval_loss(model, evals), 4), "elapsed_s": 0.0}
    save_at = set(config.checkpoint_steps())

    def write_log() -> None:
        log["checkpoints"] = [entries[s] for s in sorted(entries)]
        log_path.write_text(json.dumps(log, indent=2))

    recent: list[float] = []
    t0 = time.time()
    # An interrupted run loses at most the steps since the last save (OUT/last/ or a step-N/).
    for step in range(start, config.steps):
        batch = batch_for_step(stream, step, config.batch_size, config.seq_len, config.seed)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-20:]
        done = step + 1
        if on_step:
            on_step(done, sum(recent) / len(recent))
        if done in save_at:
            train_loss = sum(recent) / len(recent)
            elapsed = elapsed0 + time.time() - t0
            save_checkpoint(out / f"step-{done}", model, tokenizer, optimizer, config, done, train_loss, elapsed)
            entries[done] = {"step": done, "train_loss": round(train_loss, 4),
                             "eval_loss": round(eval_loss(model, evals), 4), "elapsed_s": round(elapsed, 1)}
            write_log()
            if on_checkpoint:
                on_checkpoint(done, model)
        elif done % config.save_every == 0:
            save_checkpoint(out / "last", model, tokenizer, optimizer, config, done, None, elapsed0 + time.time() - t0)
    if config.steps in save_at and (out / "last").exists():
        shutil.rmtree(out / "last")  # the final checkpoint supersedes it
    write_log()
    return log


def log_table(log: dict) -> Table:
    table = Table(title=f"LM training ({log.get('parameters', 0):,} parameters, "
                        f"{log.get('tokens_per_step', 0)} tokens/step)")
    for col in ("step", "train loss", "eval loss", "elapsed s"):
        table.add_column(col, justify="right")
    for e in log.get("checkpoints", []):
        tl = "-" if e["train_loss"] is None else f"{e['train_loss']:.3f}"
        table.add_row(str(e["step"]), tl, f"{e['eval_loss']:.3f}", f"{e['elapsed_s']:.1f}")
    return table


# ---- CLI -------------------------------------------------------------------------------

cli = typer.Typer(help="Train the tiny bilingual LM whose checkpoints the demo labels.", no_args_is_help=True)


@cli.command("train")
def train_command(
    out: Path = typer.Option(Path("runs/demo/lm"), "--out", help="Folder for step-N/ checkpoints and train_log.json."),
    steps: list[str] = O.steps_option(f"Checkpoint steps to save, {O.STEPS_HELP} (default: powers of 10 below "
                                            "--train-steps); the final step is always saved."),
    train_steps: int = typer.Option(None, "--train-steps", min=1,
                                    help=f"Optimizer steps in total (default: the last of --steps, else {TrainConfig.steps})."),
    d_model: int = typer.Option(TrainConfig.d_model, min=1, help="Residual stream width."),
    layers: int = typer.Option(TrainConfig.layers, min=1, help="Decoder layers."),
    heads: int = typer.Option(TrainConfig.heads, min=1, help="Attention heads (must divide --d-model)."),
    seq_len: int = typer.Option(TrainConfig.seq_len, min=2, help="Tokens per training sequence."),
    batch_size: int = typer.Option(TrainConfig.batch_size, min=1, help="Sequences per step."),
    lr: float = typer.Option(TrainConfig.lr, min=0.0, help="Peak AdamW learning rate (warm-up, then cosine to 10%)."),
    seed: int = O.seed_option("the weights and the data order", TrainConfig.seed),
    vocab_size: int = typer.Option(TrainConfig.vocab_size, min=1, help="Byte-level BPE vocabulary size."),
    corpus: str = O.corpus_option(),
    n_docs: int = O.docs_option(),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads for torch (0: torch's default, one per core). "
                                "On a busy machine 1 can be faster."),
    tiny: bool = typer.Option(False, "--tiny", help="Test-sized model and run (seconds); other size flags are ignored."),
) -> None:
    """Train a small Llama from scratch on the bilingual corpus, saving HF checkpoints at log-spaced steps.

    Rerunning with the same flags resumes from the last saved step.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    if tiny:
        config = TrainConfig(**{**asdict(TINY), "seed": seed, "corpus": corpus})
    else:
        total = train_steps or (max(steps) if steps else TrainConfig.steps)
        config = TrainConfig(steps=total, d_model=d_model, layers=layers, heads=heads, seq_len=seq_len,
                             batch_size=batch_size, lr=lr, seed=seed, vocab_size=vocab_size,
                             checkpoints=list(steps), corpus=corpus, corpus_limit=n_docs)
    console = Console(stderr=True)
    console.print(f"training into {out}: checkpoints at {config.checkpoint_steps()}")
    with progress_bar("{task.fields[loss]}", eta=True, console=console) as progress:
        task = progress.add_task("train", total=config.steps, loss="")

        def on_step(step: int, loss: float) -> None:
            progress.update(task, completed=step, loss=f"loss {loss:.3f}")

        resume = latest_resume_point(out) if out.exists() else None
        if resume is not None:
            progress.update(task, completed=json.loads((resume / STATE_FILE).read_text())["step"])
        log = train(config, out, on_step=on_step, console=console)
    Console().print(log_table(log))

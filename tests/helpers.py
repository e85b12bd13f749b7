"""Tiny shared fixtures: a character tokenizer and a small random GPT-2 (no network, < 1 s)."""

from __future__ import annotations

import string

import torch

EOS = "<|endoftext|>"
_CHARS = string.ascii_lowercase + string.ascii_uppercase + " .,!?'\n:;-"


def tiny_tokenizer(vocab: int = 64):
    """A character-level PreTrainedTokenizerFast; id 0 is `<|endoftext|>` (eos = bos = pad =
    unk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {EOS: 0}
    for c in _CHARS[: vocab - 1]:
        table[c] = len(table)
    tk = Tokenizer(models.WordLevel(table, unk_token=EOS))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=EOS
    )


def tiny_hf_gpt2(n_layer=2, d_model=32, n_head=4, n_ctx=32, vocab=64, seed=0, random_ln=True):
    """A random GPT2LMHeadModel (eval mode, not folded); ln weights randomised so folding
    matters."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer, n_embd=d_model, n_head=n_head, n_positions=n_ctx, vocab_size=vocab,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = GPT2LMHeadModel(cfg).eval()
    if random_ln:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".ln_" in name or name.startswith("transformer.ln_f"):
                    if name.endswith("weight"):
                        p.copy_(1.0 + 0.5 * torch.randn_like(p))
                    else:
                        p.copy_(0.3 * torch.randn_like(p))
                elif name.endswith("c_fc.bias") or name.endswith("c_proj.bias"):
                    p.copy_(0.1 * torch.randn_like(p))
    return model


def tiny_gpt2(
    n_layer=2, d_model=32, n_head=4, n_ctx=32, vocab=64, seed=0, device="cpu", dtype=torch.float32
):
    """(nnsight-wrapped folded tiny GPT-2, tokenizer)."""
    from dictionary_learning.model import load_model

    tok = tiny_tokenizer(vocab)
    hf = tiny_hf_gpt2(n_layer, d_model, n_head, n_ctx, vocab, seed)
    return load_model(hf, device=device, dtype=dtype, tokenizer=tok), tok


def random_contexts(n: int, ctx_len: int, vocab: int = 64, seed: int = 0, bos: int = 0):
    """n random LongTensor [ctx_len] contexts with BOS (id `bos`) at position 0."""
    g = torch.Generator().manual_seed(seed)
    toks_ST = torch.randint(1, vocab, (n, ctx_len), generator=g)
    toks_ST[:, 0] = bos
    return list(toks_ST)


def random_texts(n: int, seed: int = 0, min_len: int = 1, max_len: int = 40) -> list[str]:
    """n random strings over the tiny tokenizer's characters (lengths in [min_len, max_len])."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        idx = torch.randint(0, len(_CHARS), (L,), generator=g)
        out.append("".join(_CHARS[i] for i in idx))
    return out


def randomized(dictionary, seed: int, scale: float = 0.3):
    """`dictionary` with every parameter drawn from N(0, scale^2) (seeded), decoder unit-norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dictionary.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    dictionary.normalize_decoder()
    return dictionary


FAMILIES = ("gpt2", "neox_parallel", "neox_sequential", "llama", "mistral", "qwen2", "gemma2")
"""The tiny test models of every supported family (`tiny_hf_model`)."""


def tiny_hf_model(family: str, n_layer=2, d_model=32, n_ctx=32, vocab=64, seed=0):
    """A random causal LM of `family` (eval mode, not folded): d_model 32, 4 heads (2 key/value
    heads where the family has GQA), every norm weight random (and bias, for LayerNorm) so that
    folding matters, every projection bias random. Gemma-2 gets head_dim 16 (4 x 16 != 32), a
    sliding window of 6 and a final logit soft-cap of 2, so that each of them matters."""
    import transformers as tf

    if family == "gpt2":
        return tiny_hf_gpt2(n_layer, d_model, 4, n_ctx, vocab, seed)
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layer,
                  num_attention_heads=4, intermediate_size=2 * d_model,
                  max_position_embeddings=n_ctx, initializer_range=0.1, bos_token_id=0,
                  eos_token_id=0, pad_token_id=0)
    if family.startswith("neox"):
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            **common, use_parallel_residual=family == "neox_parallel"))
    elif family in ("llama", "mistral", "qwen2"):
        cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
               "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[family]
        model = cls[1](cls[0](**common, num_key_value_heads=2))
    elif family == "gemma2":
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(
            **common, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
            sliding_window=6, final_logit_softcapping=2.0))
    else:
        raise ValueError(f"unknown test family {family!r}; use one of {FAMILIES}")
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                # Gemma-2 stores its gains as offsets from 1
                p.copy_((0.0 if family == "gemma2" else 1.0) + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_((0.3 if "norm" in name else 0.1) * torch.randn_like(p))
    return model


def tiny_model(family: str, n_layer=2, d_model=32, n_ctx=32, vocab=64, seed=0,
               dtype=torch.float32):
    """(nnsight-wrapped folded tiny model of `family`, tokenizer)."""
    from dictionary_learning.model import load_model

    tok = tiny_tokenizer(vocab)
    hf = tiny_hf_model(family, n_layer, d_model, n_ctx, vocab, seed)
    return load_model(hf, dtype=dtype, tokenizer=tok), tok

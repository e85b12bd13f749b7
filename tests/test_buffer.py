import pytest
import torch

from buffer import AllActivationBuffer, DataExhaustedError
from dictionary_learning.batch import ActivationBatch
from dictionary_learning.data import token_contexts
from dictionary_learning.model import hf_model
from tests.helpers import random_contexts, random_texts, tiny_gpt2

CTX = 16
BODY = CTX - 1  # token rows per context (BOS dropped)


@pytest.fixture(scope="module")
def model():
    m, _ = tiny_gpt2(n_layer=2, d_model=32, n_ctx=CTX)
    return m


def hook_reference(model, toks_ST):
    """Activations captured with plain PyTorch hooks, BOS dropped, flattened to rows."""
    hf = hf_model(model)
    got, handles = {}, []
    blocks = hf.transformer.h
    handles.append(
        blocks[0].register_forward_pre_hook(lambda m, a: got.__setitem__("initial", a[0]))
    )
    for l, b in enumerate(blocks):
        handles += [
            b.attn.register_forward_hook(
                lambda m, a, o, l=l: got.__setitem__(f"attn_{l}", o[0])),
            b.ln_2.register_forward_pre_hook(
                lambda m, a, l=l: got.__setitem__(f"resid_{l}", a[0])),
            b.ln_2.register_forward_hook(
                lambda m, a, o, l=l: got.__setitem__(f"ln2_{l}", o)),
            b.mlp.register_forward_pre_hook(
                lambda m, a, l=l: got.__setitem__(f"mlp_in_{l}", a[0])),
            b.mlp.register_forward_hook(
                lambda m, a, o, l=l: got.__setitem__(f"mlp_out_{l}", o)),
        ]
    with torch.no_grad():
        hf(toks_ST)
    for h in handles:
        h.remove()
    return {k: v[:, 1:].reshape(-1, v.shape[-1]) for k, v in got.items()}


def drain(buf, n):
    return [next(buf) for _ in range(n)]


def cat(batches):
    return ActivationBatch(
        initial=torch.cat([b.initial for b in batches]),
        src={k: torch.cat([b.src[k] for b in batches]) for k in batches[0].src},
        tgt={k: torch.cat([b.tgt[k] for b in batches]) for k in batches[0].tgt},
        layernorm_scale={
            k: torch.cat([b.layernorm_scale[k] for b in batches])
            for k in batches[0].layernorm_scale
        },
    )


def test_matches_hooks_and_math(model):
    ctxs = random_contexts(8, CTX)
    n = 8 * BODY  # 120 rows, one fill
    buf = AllActivationBuffer(
        model, iter(ctxs), n_tokens=n, out_batch_size=20, model_batch_size=3, seed=5
    )
    assert buf.names == ["attn_0", "mlp_0", "attn_1", "mlp_1"]
    assert (buf.n_layers, buf.d_model) == (2, 32)
    got = cat(drain(buf, 6))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    ref = hook_reference(model, torch.stack(ctxs))
    torch.testing.assert_close(got.initial, ref["initial"][perm], atol=1e-6, rtol=0)
    hf = hf_model(model)
    for l in range(2):
        torch.testing.assert_close(got.src[f"attn_{l}"], ref[f"attn_{l}"][perm], atol=1e-6, rtol=0)
        torch.testing.assert_close(got.tgt[f"attn_{l}"], ref[f"attn_{l}"][perm], atol=1e-6, rtol=0)
        torch.testing.assert_close(got.src[f"mlp_{l}"], ref[f"mlp_in_{l}"][perm], atol=1e-6, rtol=0)
        torch.testing.assert_close(
            got.tgt[f"mlp_{l}"], ref[f"mlp_out_{l}"][perm], atol=1e-6, rtol=0
        )
        # sigma is what torch's LayerNorm divides by: P x / LN(x) with weight 1, bias 0
        x = ref[f"resid_{l}"][perm]
        eps = hf.transformer.h[l].ln_2.eps
        ln = torch.nn.functional.layer_norm(x, (32,), eps=eps)
        sigma_ref = ((x - x.mean(-1, keepdim=True)) / ln).median(dim=-1).values
        sigma = got.layernorm_scale[f"mlp_{l}"]
        assert sigma.shape == (n,)
        torch.testing.assert_close(sigma, sigma_ref, atol=1e-5, rtol=1e-5)
        # mlp_in = P resid_mid / sigma (ln_2 folded)
        P_x = x - x.mean(-1, keepdim=True)
        torch.testing.assert_close(got.src[f"mlp_{l}"], P_x / sigma[:, None], atol=1e-5, rtol=0)
        # resid_mid_L = x0 + sum_{l<=L} attn_out_l + sum_{l<L} mlp_out_l
        resid = got.initial + sum(got.tgt[f"attn_{j}"] for j in range(l + 1))
        resid = resid + sum((got.tgt[f"mlp_{j}"] for j in range(l)), torch.zeros_like(resid))
        torch.testing.assert_close(resid, x, atol=1e-4, rtol=0)


def test_one_fill_serves_each_token_once_and_memory_bound(model):
    ctxs = random_contexts(20, CTX, seed=1)
    # n_tokens = 70 -> 4 contexts (60 rows) per fill, 7 batches of 8 (56 rows), 4 rows discarded
    buf = AllActivationBuffer(model, iter(ctxs), n_tokens=70, out_batch_size=8, model_batch_size=3)
    ref = hook_reference(model, torch.stack(ctxs))
    got = cat(drain(buf, 7))
    assert buf.peak_stored_tokens <= 70
    # every served row is a distinct row of the first fill (tag rows by their x0 + attn_0 values)
    def key(b_x0, b_a):
        return torch.cat([b_x0, b_a], dim=1)

    served = key(got.initial, got.src["attn_0"])
    fill = key(ref["initial"][:60], ref["attn_0"][:60])
    dist = torch.cdist(served, fill)
    match = dist.argmin(dim=1)
    assert torch.all(dist.min(dim=1).values < 1e-3)  # distinct rows are ~0.1 apart
    assert match.unique().numel() == 56
    drain(buf, 7 * 4)  # the remaining 4 fills
    assert buf.peak_stored_tokens <= 70
    with pytest.raises(DataExhaustedError, match="ran out after 20 contexts"):
        next(buf)


@pytest.mark.parametrize("stop_at", [0, 3, 7, 9])
def test_exact_resume(model, stop_at):
    ctxs = random_contexts(24, CTX, seed=2)
    kw = dict(n_tokens=50, out_batch_size=7, model_batch_size=2, seed=3)
    full = drain(AllActivationBuffer(model, iter(ctxs), **kw), 14)
    buf = AllActivationBuffer(model, iter(ctxs), **kw)
    drain(buf, stop_at)
    state = buf.state_dict()
    resumed = AllActivationBuffer(model, iter(ctxs), **kw)
    resumed.load_state_dict(state)
    rest = drain(resumed, 14 - stop_at)
    for a, b in zip(full[stop_at:], rest):
        assert torch.equal(a.initial, b.initial)
        for k in a.src:
            assert torch.equal(a.src[k], b.src[k]) and torch.equal(a.tgt[k], b.tgt[k])
        for k in a.layernorm_scale:
            assert torch.equal(a.layernorm_scale[k], b.layernorm_scale[k])


def test_generator_not_reseeded(model):
    ctxs = random_contexts(4, CTX, seed=4) * 2  # the same two fills of 4 contexts
    buf = AllActivationBuffer(model, iter(ctxs), n_tokens=60, out_batch_size=60, model_batch_size=4)
    a, b = next(buf), next(buf)
    assert not torch.equal(a.initial, b.initial)  # same rows, different order
    assert torch.allclose(a.initial.sum(0), b.initial.sum(0), atol=1e-4)


def test_bf16_and_batch_to(model):
    buf = AllActivationBuffer(
        model, iter(random_contexts(4, CTX)), n_tokens=60, out_batch_size=10, dtype=torch.bfloat16
    )
    b = next(buf)
    assert b.initial.dtype == torch.bfloat16 and b.layernorm_scale["mlp_0"].dtype == torch.bfloat16
    assert b.to(dtype=torch.float32).src["mlp_1"].dtype == torch.float32


def test_with_token_contexts(model):
    from tests.helpers import tiny_tokenizer

    ctxs = token_contexts(random_texts(50, max_len=30), tiny_tokenizer(), CTX)
    buf = AllActivationBuffer(model, ctxs, n_tokens=45, out_batch_size=15)
    assert next(buf).initial.shape == (15, 32)


def test_errors(model):
    with pytest.raises(ValueError, match="no complete context"):
        AllActivationBuffer(model, iter([]), n_tokens=60, out_batch_size=10)
    with pytest.raises(ValueError, match=r"ctx_len 20 exceeds the model's n_positions=16.*<= 16"):
        AllActivationBuffer(model, iter(random_contexts(2, 20)), n_tokens=60, out_batch_size=10)
    with pytest.raises(TypeError, match="not a supported family"):
        AllActivationBuffer(
            torch.nn.Linear(2, 2), iter(random_contexts(2, 8)), n_tokens=60, out_batch_size=10
        )
    with pytest.raises(ValueError, match="out_batch_size"):
        AllActivationBuffer(model, iter(random_contexts(2, CTX)), n_tokens=20, out_batch_size=30)
    with pytest.raises(TypeError, match="item 1 is a int"):
        tokenizer = __import__("tests.helpers").helpers.tiny_tokenizer()
        ctxs = token_contexts(["hello there", 5], tokenizer, 4)
        buf = AllActivationBuffer(model, ctxs, n_tokens=60, out_batch_size=10)
        next(buf)

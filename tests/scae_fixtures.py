"""Small random suites, batches and connections for the SCAE tests."""

from __future__ import annotations

import torch

from dictionary_learning.dictionary import AutoEncoderTopK, TopKTranscoder
from dictionary_learning.suite import SCAESuite


from dictionary_learning.batch import ActivationBatch as Batch


def random_suite(n_layers=2, d=6, F=10, k=3, seed=0, dtype=torch.float64) -> SCAESuite:
    g = torch.Generator().manual_seed(seed)
    dicts = {}
    for layer in range(n_layers):
        dicts[f"attn_{layer}"] = AutoEncoderTopK(d, F, k)
        dicts[f"mlp_{layer}"] = TopKTranscoder(d, d, F, k)
    for ae in dicts.values():
        with torch.no_grad():
            for p in ae.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            ae.normalize_decoder()
    return SCAESuite(dicts).to(dtype)


def exact_sae(d: int) -> AutoEncoderTopK:
    """W_enc = [I; -I], W_dec = [I, -I], zero biases, k = d: reconstructs every input exactly."""
    ae = AutoEncoderTopK(d, 2 * d, d)
    eye = torch.eye(d)
    with torch.no_grad():
        ae.encoder.weight.copy_(torch.cat([eye, -eye]))
        ae.encoder.bias.zero_()
        ae.decoder.weight.copy_(torch.cat([eye, -eye], dim=1))
        ae.b_dec.zero_()
    return ae


def layer_norm_scale(x_BD: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return (x_BD.var(dim=-1, unbiased=False) + eps).sqrt()


def random_batch(n_layers=2, d=6, B=5, seed=1, dtype=torch.float64) -> Batch:
    """Random activations with the residual-stream structure of docs/method.md §1, §2
    (mlp_in = P r / sigma)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, d, generator=g, dtype=dtype)
    resid = x0.clone()
    src, tgt, scale = {}, {}, {}
    for layer in range(n_layers):
        attn = torch.randn(B, d, generator=g, dtype=dtype)
        src[f"attn_{layer}"] = tgt[f"attn_{layer}"] = attn
        resid = resid + attn
        sigma = layer_norm_scale(resid)
        src[f"mlp_{layer}"] = (resid - resid.mean(-1, keepdim=True)) / sigma[:, None]
        scale[f"mlp_{layer}"] = sigma
        mlp = torch.randn(B, d, generator=g, dtype=dtype)
        tgt[f"mlp_{layer}"] = mlp
        resid = resid + mlp
    return Batch(x0, src, tgt, scale)


def full_connections(suite: SCAESuite) -> dict:
    F = suite.dict_sizes
    return {
        m: {u: torch.arange(F[u]).expand(F[m], F[u]).clone() for u in suite.upstream_names(m)}
        for m in suite.transcoder_names
    }


def random_connections(suite: SCAESuite, C: int, seed=0, pad_frac=0.3) -> dict:
    """Up to C connections per feature spread over the upstream modules, with -1 padding."""
    g = torch.Generator().manual_seed(seed)
    F = suite.dict_sizes
    out = {}
    for m in suite.transcoder_names:
        ups = suite.upstream_names(m)
        out[m] = {}
        for u in ups:
            c = max(1, C // len(ups))
            idx = torch.stack([torch.randperm(F[u], generator=g)[:c] for _ in range(F[m])])
            idx[torch.rand(idx.shape, generator=g) < pad_frac] = -1
            out[m][u] = idx
    return out

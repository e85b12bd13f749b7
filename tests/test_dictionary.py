import pytest
import torch

from dictionary_learning.dictionary import (
    AutoEncoderTopK,
    Features,
    TopKTranscoder,
    build_dictionary,
)


@pytest.mark.parametrize(
    "cls_args", [(AutoEncoderTopK, (12, 40, 5)), (TopKTranscoder, (12, 10, 40, 5))]
)
def test_forward_matches_dense_formula(cls_args):
    cls, args = cls_args
    torch.manual_seed(0)
    d = cls(*args)
    with torch.no_grad():
        d.encoder.bias.normal_()
        d.b_dec.normal_()
    x = torch.randn(7, d.d_in)
    recon, feats = d(x, output_features=True)
    # no b_dec subtraction (docs/method.md §1)
    pre = torch.relu(x @ d.encoder.weight.T + d.encoder.bias)
    v, i = pre.topk(d.k, dim=-1)
    f = torch.zeros_like(pre).scatter(1, i, v)
    torch.testing.assert_close(feats.dense(d.dict_size), f)
    torch.testing.assert_close(recon, f @ d.decoder.weight.T + d.b_dec, atol=1e-5, rtol=1e-5)
    assert recon.shape == (7, d.d_out)


def test_config_roundtrip_and_unit_norm():
    for d in (AutoEncoderTopK(8, 32, 4), TopKTranscoder(8, 6, 32, 4)):
        e = build_dictionary(d.config())
        assert type(e) is type(d) and e.config() == d.config()
        torch.testing.assert_close(d.decoder.weight.norm(dim=0), torch.ones(32))
    with pytest.raises(ValueError, match="unknown dictionary class"):
        build_dictionary({"class": "Nope"})


@pytest.mark.parametrize("k", [11, 0, -3])
def test_bad_k(k):
    with pytest.raises(ValueError, match=rf"k={k}.*dict_size=10"):
        AutoEncoderTopK(6, 10, k)
    with pytest.raises(ValueError, match=rf"k={k}"):
        TopKTranscoder(6, 6, 10, k)


def test_bf16_forward():
    d = AutoEncoderTopK(8, 32, 4).to(torch.bfloat16)
    out = d(torch.randn(5, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_features_dense():
    f = Features(torch.tensor([[1.0, 2.0]]), torch.tensor([[3, 0]]))
    assert f.dense(4).tolist() == [[2.0, 0.0, 0.0, 1.0]]


@pytest.mark.parametrize("F", [40, 400])  # the dense branch of dot_at_candidates, the sampled one
def test_sparse_gradient_encoding_matches_the_dense_one(F):
    """encode_with_pre_acts under autograd: the TopK values and every gradient (encoder, decoder,
    input) equal the dense formula's, whose [B, F] gradient is zero off the chosen features."""
    torch.manual_seed(0)
    d = TopKTranscoder(12, 10, F, 5).double()
    with torch.no_grad():
        d.encoder.bias.normal_()
        d.b_dec.normal_()
    x = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    y = torch.randn(9, 10, dtype=torch.float64)

    def loss_and_grads(encode):
        for p in [*d.parameters(), x]:
            p.grad = None
        feats = encode()
        ((d.decode(feats) - y) ** 2).sum().backward()
        return feats, [p.grad.clone() for p in [*d.parameters(), x]]

    got, g_got = loss_and_grads(lambda: d.encode_with_pre_acts(x)[0])
    want, g_want = loss_and_grads(
        lambda: Features(*(x @ d.encoder.weight.T + d.encoder.bias).relu().topk(d.k))
    )
    torch.testing.assert_close(got.dense(F), want.dense(F))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b)
    # the pre-activations come back without gradient, equal to the dense product
    _, pre = d.encode_with_pre_acts(x)
    assert not pre.requires_grad
    torch.testing.assert_close(pre, x.detach() @ d.encoder.weight.T.detach() + d.encoder.bias)
    # and at any features, repeated or not, pre_acts_at reads the same entries
    idx = torch.randint(0, F, (9, 7))
    torch.testing.assert_close(d.pre_acts_at(x, idx), d.pre_acts(x).gather(1, idx))


def test_encoding_without_autograd_is_the_dense_products():
    d = AutoEncoderTopK(12, 400, 5)
    x = torch.randn(9, 12)
    with torch.no_grad():
        feats, pre = d.encode_with_pre_acts(x)
        want = d.pre_acts(x).topk(5).indices  # the TopK's choice, in no set order
    assert torch.equal(pre, d.pre_acts(x).detach())
    assert torch.equal(feats.idx_BK.sort(1).values, want.sort(1).values)
    assert torch.equal(feats.vals_BK, pre.gather(1, feats.idx_BK).relu())


def test_decoder_is_stored_feature_major_through_moves_copies_and_files(tmp_path):
    """The decoder weight [d_out, F] lives in [F, d_out] memory, so that decoding reads it without a
    transposed copy; moves, copies, files and optimiser steps keep that layout."""
    import copy

    from dictionary_learning.suite import SCAESuite
    from tests.scae_fixtures import random_suite

    def feature_major(d):
        W = d.decoder.weight
        return W.shape == (d.d_out, d.dict_size) and W.T.is_contiguous()

    d = TopKTranscoder(12, 10, 40, 5)
    assert feature_major(d) and feature_major(copy.deepcopy(d)) and feature_major(d.double())
    # the decode's table is the weight's own storage, not a copy
    assert d.decoder.weight.T.contiguous().data_ptr() == d.decoder.weight.data_ptr()
    opt = torch.optim.Adam(d.parameters())
    x = torch.randn(9, 12, dtype=torch.float64)
    d(x).sum().backward()
    assert d.decoder.weight.grad.T.is_contiguous()
    opt.step()
    assert feature_major(d)
    suite = random_suite(n_layers=1, F=20)
    suite.save_pretrained(tmp_path / "suite")
    loaded = SCAESuite.from_pretrained(tmp_path / "suite", dtype=torch.float64)
    for name, ae in loaded.dicts.items():
        assert feature_major(ae)
        torch.testing.assert_close(ae.decoder.weight, suite.dicts[name].decoder.weight,
                                   rtol=0, atol=0)

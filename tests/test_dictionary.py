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

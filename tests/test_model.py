import copy

import pytest
import torch

from dictionary_learning.model import (
    ModelInfo,
    check_supported,
    fold_mlp_norm,
    hf_model,
    load_model,
    model_info,
    module_names,
)
from tests.helpers import random_contexts, tiny_gpt2, tiny_hf_gpt2, tiny_tokenizer


def test_fold_preserves_logits_and_sets_identity():
    hf = tiny_hf_gpt2(n_layer=3)
    toks = torch.stack(random_contexts(4, 32))
    assert not torch.allclose(hf.transformer.h[0].ln_2.weight, torch.ones(32))
    with torch.no_grad():
        before = hf(toks).logits
        fold_mlp_norm(hf)
        after = hf(toks).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    for b in hf.transformer.h:
        assert torch.equal(b.ln_2.weight, torch.ones_like(b.ln_2.weight))
        assert torch.equal(b.ln_2.bias, torch.zeros_like(b.ln_2.bias))
    state = copy.deepcopy(hf.state_dict())
    fold_mlp_norm(hf)  # idempotent
    for k, v in hf.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_load_model_from_object_and_info():
    model, tok = tiny_gpt2()
    info = model_info(model)
    assert isinstance(info, ModelInfo)
    assert (info.n_layers, info.d_model, info.n_ctx, info.vocab_size) == (2, 32, 32, 64)
    assert info.ln_eps == pytest.approx(1e-5)
    assert module_names(2) == ["attn_0", "mlp_0", "attn_1", "mlp_1"]
    assert model_info(hf_model(model)) == info
    ln = hf_model(model).transformer.h[1].ln_2
    assert torch.equal(ln.weight, torch.ones_like(ln.weight))


def test_save_pretrained_round_trip(tmp_path):
    hf, tok = tiny_hf_gpt2(), tiny_tokenizer()
    toks = torch.stack(random_contexts(2, 16))
    with torch.no_grad():
        ref = hf(toks).logits
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    with torch.no_grad():
        out = hf_model(model)(toks).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert model.tokenizer.eos_token_id == 0


def test_bf16_load():
    hf, tok = tiny_hf_gpt2(), tiny_tokenizer()
    model = load_model(hf, dtype=torch.bfloat16, tokenizer=tok)
    assert hf_model(model).transformer.h[0].mlp.c_fc.weight.dtype == torch.bfloat16


def test_unknown_name_error():
    with pytest.raises(ValueError, match="unknown model"):
        load_model("/definitely/not/a/dir")
    with pytest.raises(ValueError, match="save_pretrained"):
        load_model("no-such-org/no-such-model-xyz")


def test_non_gpt2_error():
    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="Fake .* is not a supported family"):
        check_supported(Fake())
    with pytest.raises(TypeError, match="Fake .* is not a supported family"):
        fold_mlp_norm(Fake())


def test_model_without_tokenizer_error():
    with pytest.raises(ValueError, match="tokenizer"):
        load_model(tiny_hf_gpt2())

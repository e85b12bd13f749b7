"""The end-to-end KL term of finetuning (docs/method.md §5) against a plain reference."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F_

from dictionary_learning.metrics import next_token_kl
from dictionary_learning.model import hf_model
from dictionary_learning.unembed import Unembed
from find_top_connections import collect_activations, top_connections
from tests.test_scae_trainer import suite_for, tiny_buffer
from trainers.scae import SCAETrainerConfig, TrainerSCAESuite


def test_next_token_kl_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    clean_BV, other_BV = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    p_BV, q_BV = clean_BV.softmax(-1), other_BV.softmax(-1)
    plain = (p_BV * (p_BV.log() - q_BV.log())).sum(-1).mean()
    torch.testing.assert_close(next_token_kl(clean_BV, other_BV), plain)
    assert next_token_kl(clean_BV, clean_BV + 3.0) == pytest.approx(0.0, abs=1e-6)  # shift-free


def test_final_residual_is_what_the_head_reads():
    """x0 + every module's true output = the input of ln_f (forward hook), per token row."""
    buf = tiny_buffer()
    model = hf_model(buf.model)
    toks_ST = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    toks_ST[:, 0] = 0
    seen = {}
    handle = model.transformer.ln_f.register_forward_hook(
        lambda mod, args, out: seen.setdefault("r", args[0]))
    try:
        with torch.no_grad():
            model(input_ids=toks_ST)
    finally:
        handle.remove()
    from dictionary_learning.batch import ActivationBatch, trace_activations

    acts = trace_activations(buf.model, toks_ST)
    batch = ActivationBatch.from_trace(
        {k: v.reshape(-1, *v.shape[2:]) for k, v in acts.items()}, buf.n_layers)
    torch.testing.assert_close(batch.final_residual(), seen["r"].reshape(-1, 32),
                               rtol=0, atol=1e-5)


def kl_trainer(buf, kl_chunk, kl_coeff=1.0, connections=None):
    suite = suite_for(buf)
    if connections is None:
        connections = top_connections(suite, collect_activations(suite, buf, 512), C=8)
    suite.set_connections(connections)
    cfg = SCAETrainerConfig(total_steps=10, lr=1e-3, warmup_steps=1, n_threshold=8,
                            kl_coeff=kl_coeff, kl_chunk=kl_chunk)
    return TrainerSCAESuite(suite, cfg, unembed=Unembed.from_model(buf.model))


def test_kl_term_equals_plain_reference_in_value_and_gradient():
    """The trainer's KL = mean over tokens of KL(softmax(head(r_true)) || softmax(head(x0 + attn
    reconstructions + pruned transcoder reconstructions))); its gradient equals autograd through
    that plain formula, whether the tokens go in one chunk or in chunks of 37."""
    buf = tiny_buffer()
    batch = next(buf)
    head = hf_model(buf.model)
    tr = kl_trainer(buf, 37)
    params = dict(tr.suite.named_parameters())

    tr.suite.zero_grad(set_to_none=True)
    van = tr.suite.vanilla_forward(batch)
    pr = tr.suite.pruned_forward(batch, van, mode="candidates", n_threshold=8,
                                 pruned_top=tr.cfg.pruned_top)
    r_BD = batch.initial + sum(pr[n].recon_BD if n in pr else van[n].recon_BD for n in tr.names)
    r_true_BD = batch.initial + sum(batch.tgt.values())
    with torch.no_grad():
        logp_true = F_.log_softmax(head.lm_head(head.transformer.ln_f(r_true_BD)), -1)
    logp = F_.log_softmax(head.lm_head(head.transformer.ln_f(r_BD)), -1)
    plain = (logp_true.exp() * (logp_true - logp)).sum(-1).mean()
    plain.backward()
    expected = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    assert expected

    for chunk in (37, 10_000):
        tr.cfg = replace(tr.cfg, kl_chunk=chunk)
        tr.suite.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        losses, metrics, _ = tr.losses(batch)
        torch.testing.assert_close(metrics["kl"], plain.detach(), rtol=1e-5, atol=1e-7)
        losses["kl"].backward()
        for n, g in expected.items():
            torch.testing.assert_close(params[n].grad, g, rtol=1e-4, atol=1e-8, msg=n)
        assert all(p.grad is None for p in tr.unembed.parameters())  # the head is never trained
        assert all(p.grad is None for p in head.parameters())


def test_kl_finetuning_lowers_the_kl_and_needs_the_head():
    """With the transcoders' FVU terms off, training with the KL term ends with a lower KL on a
    held-out batch than training without it (same start, connections, batches and steps)."""
    buf = tiny_buffer()
    batches = [next(buf) for _ in range(5)]
    held_out = batches.pop()
    conns = kl_trainer(buf, 128).suite.connections
    kls = {}
    for kl_coeff in (0.0, 100.0):
        tr = kl_trainer(buf, 128, kl_coeff=kl_coeff, connections=conns)
        tr.cfg = replace(tr.cfg, coeff=0.0, loss="pruned", auxk_alpha=0.0)
        for step in range(20):
            tr.update(step, batches[step % 4])
        with torch.no_grad():
            van = tr.suite.vanilla_forward(held_out)
            kls[kl_coeff] = float(tr._kl(held_out, van, tr.suite.pruned_forward(held_out, van)))
    assert kls[100.0] < 0.9 * kls[0.0], kls
    with pytest.raises(ValueError, match="kl_coeff=1.0 needs the model's head"):
        TrainerSCAESuite(tr.suite, SCAETrainerConfig(kl_coeff=1.0))

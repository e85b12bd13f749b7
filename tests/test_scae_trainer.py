"""Finetuning through the pruned pass, and the suite on a real (tiny) model's activations."""

import pytest
import torch

from buffer import AllActivationBuffer
from dictionary_learning.dictionary import TopKTranscoder
from find_top_connections import collect_activations, top_connections
from tests.helpers import random_contexts, tiny_gpt2
from tests.scae_fixtures import exact_sae, full_connections, random_suite
from dictionary_learning.suite import SCAESuite
from trainers.scae import SCAETrainerConfig, TrainerSCAESuite


def tiny_buffer(n_layer=2, d=32, n_tokens=2048, batch=256, seed=0):
    model, _ = tiny_gpt2(n_layer=n_layer, d_model=d, n_ctx=32)
    ctxs = random_contexts(400, 17, seed=seed)
    return AllActivationBuffer(model, iter(ctxs), n_tokens=n_tokens, out_batch_size=batch,
                               model_batch_size=32, seed=seed)


def test_exact_attention_sae_on_real_activations_gives_vanilla_mlp0_pre():
    """docs/method.md §3: r_0 = x0 + attn_out_0 is resid_mid_0 when attn_0 is exact, so
    pruned == vanilla."""
    buf = tiny_buffer(n_layer=1)
    batch = next(buf).to(dtype=torch.float64)
    suite = SCAESuite({"attn_0": exact_sae(32), "mlp_0": TopKTranscoder(32, 32, 64, 8)}).double()
    suite.set_connections(full_connections(suite))
    van = suite.vanilla_forward(batch)
    pr = suite.pruned_forward(batch, van, mode="all")
    # the tolerance is that of the fp32 model
    torch.testing.assert_close(pr["mlp_0"].pre_BF, van["mlp_0"].pre_BF, rtol=1e-5, atol=1e-5)


def suite_for(buf, F=64, k=4):
    suite = random_suite(n_layers=buf.n_layers, d=buf.d_model, F=F, k=k, dtype=torch.float32)
    with torch.no_grad():  # start from a sensible scale: encoders read their decoders
        for ae in suite.dicts.values():
            ae.encoder.weight.copy_(ae.decoder.weight.T)
            ae.encoder.bias.zero_()
    return suite


def test_finetuning_lowers_pruned_fvu_and_resumes_exactly():
    buf = tiny_buffer()
    suite = suite_for(buf)
    acts = collect_activations(suite, buf, 1024)
    suite.set_connections(top_connections(suite, acts, C=8))
    cfg = SCAETrainerConfig(total_steps=40, kl_coeff=0.0, lr=3e-3, warmup_steps=2, n_threshold=8,
                            n_random=4, act_coeff=0.1)
    tr = TrainerSCAESuite(suite, cfg)
    batches = [next(buf) for _ in range(8)]
    first = tr.update(0, batches[0])
    for step in range(1, 40):
        last = tr.update(step, batches[step % 8])
    for m in suite.transcoder_names:
        assert last[f"{m}/fvu_pruned"] < 0.8 * first[f"{m}/fvu_pruned"], m
        assert f"{m}/penalty" in last and f"{m}/act_diff" in last
    for ae in suite.dicts.values():
        torch.testing.assert_close(ae.decoder.weight.norm(dim=0), torch.ones(ae.dict_size))

    # state_dict round trip: two more steps from a restored copy equal two more steps here
    state = {k: v for k, v in tr.state_dict().items()}
    import copy

    twin = TrainerSCAESuite(copy.deepcopy(suite), cfg)
    twin.load_state_dict(copy.deepcopy(state))
    twin.load_local_state_dict(copy.deepcopy(tr.local_state_dict()))
    for step in (40, 41):
        tr.update(step, batches[step % 8])
        twin.update(step, batches[step % 8])
    for n in suite.names:
        twin_values = twin.dicts[n].state_dict().values()
        for (pn, a), b in zip(tr.dicts[n].state_dict().items(), twin_values):
            assert torch.equal(a, b), (n, pn)


def test_pruned_only_loss_drops_transcoder_vanilla_term():
    suite = random_suite(n_layers=2, d=6, F=12, k=2, dtype=torch.float32)
    from tests.scae_fixtures import random_batch, random_connections as rc

    suite.set_connections(rc(suite, C=4))
    batch = random_batch(2, 6, B=16, dtype=torch.float32)
    common = dict(total_steps=1, n_threshold=2, n_random=0, auxk_alpha=0, kl_coeff=0.0)
    both = TrainerSCAESuite(suite, SCAETrainerConfig(**common))
    losses_both, m, _ = both.losses(batch)
    only = TrainerSCAESuite(suite, SCAETrainerConfig(**common, loss="pruned"))
    losses_only, _, _ = only.losses(batch)
    for n in suite.transcoder_names:
        torch.testing.assert_close(losses_both[n] - losses_only[n], m[f"{n}/fvu"])
    for n in ["attn_0", "attn_1"]:
        torch.testing.assert_close(losses_both[n], losses_only[n])





@pytest.mark.parametrize("F", [12, 400])  # the dense and the sampled pre_acts_at
def test_activation_difference_and_its_gradient_match_the_dense_formula(F):
    """The act loss reads the vanilla activations at the top-k candidates with gradient
    (pre_acts_at), though the vanilla pass keeps its [B, F] pre-activations without: value and
    encoder gradient equal the formula on the dense pre-activations."""
    from tests.scae_fixtures import random_batch, random_connections as rc

    suite = random_suite(n_layers=2, d=6, F=F, k=2, dtype=torch.float64)
    suite.set_connections(rc(suite, C=4))
    batch = random_batch(2, 6, B=16, dtype=torch.float64)
    cfg = SCAETrainerConfig(total_steps=1, n_threshold=3, n_random=2, auxk_alpha=0,
                            kl_coeff=0.0, act_coeff=1.0)
    tr = TrainerSCAESuite(suite, cfg, dtype=torch.float64)
    _, metrics, _ = tr.losses(batch)
    m, d = "mlp_1", suite.dicts["mlp_1"]
    x, _ = tr.io(m, batch)
    van = {n: suite.vanilla_one(n, batch, 3, 2, torch.Generator().manual_seed(0))
           for n in suite.names}
    cand = van[m].cand_BN
    pr = suite.pruned_forward(batch, van, mode="candidates", n_threshold=3, n_random=2)[m]

    def reference():
        f_BM = d.pre_acts(x).gather(1, cand[:, :5]).relu()  # dense, with gradient
        f_BM = torch.cat([f_BM[:, :2], torch.zeros_like(f_BM[:, 2:])], dim=1)
        vals, sel = pr.pre_BN[:, :5].topk(2, dim=1)
        f_pr = torch.zeros_like(f_BM).scatter(1, sel, vals.relu())
        return ((f_BM - f_pr).pow(2).sum() / f_BM.detach().pow(2).sum()).float()

    got, want = tr._activation_difference(d, x, van[m], pr), reference()
    torch.testing.assert_close(got, want)
    w = d.encoder.weight
    torch.testing.assert_close(torch.autograd.grad(got, w, retain_graph=True)[0],
                               torch.autograd.grad(want, w, retain_graph=True)[0])
    assert metrics[f"{m}/act_diff"] > 0


def test_trainer_rejects_too_many_candidates_and_missing_connections():
    suite = random_suite(n_layers=1, d=6, F=12, k=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="connections"):
        TrainerSCAESuite(suite, SCAETrainerConfig(total_steps=1))
    from tests.scae_fixtures import random_connections as rc

    suite.set_connections(rc(suite, C=4))
    with pytest.raises(ValueError, match=r"mlp_0: k \+ n_threshold \+ n_random"):
        TrainerSCAESuite(suite, SCAETrainerConfig(total_steps=1, n_threshold=8, n_random=4))

"""losses.py: every divergence against a float64 brute force written with the math module, plus gradients
(finite differences, chunking, float64 autograd), the generic autograd path against the hand-derived one,
a divergence registered here, and the sampled estimator's gradient against the exact reverse-KL gradient."""
import math

import pytest
import torch

import losses
from losses import (LOSSES, check_divergence, divergence, divergence_loss, divergence_sum, head_divergence_loss,
                    head_divergence_sum, per_token_divergence, sampled_token_loss)


def brute(s_row, t_row, loss, beta, temp):
    """One position, plain Python floats: the definitions, term by term."""
    def softmax(z):
        z = [v / temp for v in z]
        m = max(z)
        e = [math.exp(v - m) for v in z]
        return [v / sum(e) for v in e]
    ps, pt = softmax(s_row), softmax(t_row)
    kl = lambda p, q: sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)
    mix = lambda a, p, q: [a * x + (1 - a) * y for x, y in zip(p, q)]
    if loss == "fkl":
        return kl(pt, ps)
    if loss == "rkl":
        return kl(ps, pt)
    if loss == "skew_fkl":
        return kl(pt, mix(beta, pt, ps))
    if loss == "skew_rkl":
        return kl(ps, mix(beta, ps, pt))
    if loss == "fkl_rkl":
        return beta * kl(pt, ps) + (1 - beta) * kl(ps, pt)
    m = mix(beta, pt, ps)
    return beta * kl(pt, m) + (1 - beta) * kl(ps, m)


DIVS = [name for name in LOSSES if name != "sampled"]  # every registered divergence


def rand_case(seed, B=3, T=7, V=6, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[0, 0] = True
    return s, t, mask


@pytest.mark.parametrize("loss,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9),
                                       ("skew_fkl", 0.1), ("skew_fkl", 0.0), ("skew_rkl", 0.1), ("skew_rkl", 0.7),
                                       ("fkl_rkl", 0.3), ("fkl_rkl", 1.0)])
@pytest.mark.parametrize("temp", [1.0, 0.7, 2.0])
def test_matches_float64_brute_force(loss, beta, temp):
    s, t, mask = rand_case(0)
    n = 11.0  # any normaliser: the loss is a sum over masked tokens / n
    got = divergence_loss(s, t, mask, loss, n, beta=beta, temperature=temp)
    want = sum(brute(s[b, i].tolist(), t[b, i].tolist(), loss, beta, temp)
               for b in range(s.size(0)) for i in range(s.size(1)) if mask[b, i]) / n
    assert abs(got.item() - want) < 1e-10 * max(1.0, abs(want))
    # fp32 inputs agree with the float64 result to fp32 precision
    got32 = divergence_loss(s.float(), t.float(), mask, loss, n, beta=beta, temperature=temp)
    assert abs(got32.item() - want) < 1e-4 * max(1.0, abs(want))


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd"])
def test_chunking_gives_same_value_and_gradient(loss):
    s, t, mask = rand_case(1, B=4, T=9)
    out = []
    for chunk in (0, 1, 3, 1000):
        x = s.clone().requires_grad_(True)
        val = divergence_loss(x, t, mask, loss, 13.0, beta=0.3, temperature=1.3, chunk_size=chunk)
        val.backward()
        out.append((val.detach(), x.grad))
    for val, grad in out[1:]:
        torch.testing.assert_close(val, out[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, out[0][1], rtol=1e-12, atol=1e-12)
    assert (out[0][1][~mask] == 0).all()  # masked-out positions get no gradient


def test_zero_iff_identical_and_jsd_symmetric():
    s, t, mask = rand_case(2)
    for loss in DIVS:
        assert abs(divergence_loss(s, s.clone(), mask, loss, 1.0).item()) < 1e-12
        assert divergence_loss(s, t, mask, loss, 1.0).item() > 1e-3
    a = per_token_divergence(s.flatten(0, 1), t.flatten(0, 1), "jsd", beta=0.5)
    b = per_token_divergence(t.flatten(0, 1), s.flatten(0, 1), "jsd", beta=0.5)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert (a <= math.log(2) + 1e-12).all()  # JSD(0.5) is bounded by log 2
    c = per_token_divergence(s.flatten(0, 1), t.flatten(0, 1), "jsd", beta=0.2)
    d = per_token_divergence(t.flatten(0, 1), s.flatten(0, 1), "jsd", beta=0.8)
    torch.testing.assert_close(c, d, rtol=1e-12, atol=1e-12)  # swapping roles swaps beta


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd"])
def test_gradcheck(loss):
    # the analytic student gradient against finite differences (the teacher's logits are constants)
    for seed, scale in ((3, 1.5), (4, 8.0)):
        s, t, mask = rand_case(seed, B=2, T=3, V=4, scale=scale)
        s.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a: divergence_loss(a, t, mask, loss, 5.0, beta=0.3, temperature=0.8,
                                                                  chunk_size=2), (s,))


@pytest.mark.parametrize("loss", DIVS)
def test_identical_distributions_give_exactly_zero_gradient(loss):
    s, _, mask = rand_case(5, V=23)
    for dtype in (torch.float32, torch.float64):
        x = s.to(dtype).requires_grad_(True)
        val = divergence_loss(x, x.detach().clone(), mask, loss, 3.0, beta=0.37, temperature=0.9)
        val.backward()
        assert val.item() == 0.0 and (x.grad == 0).all()
    h, w, _, _, mask = head_case(5)
    a = [v.clone().requires_grad_(True) for v in (h, w)]
    val, _ = head_divergence_loss(a[0], a[1], h, w, mask, loss, 3.0, beta=0.37, temperature=0.9, chunk_size=4)
    val.backward()
    assert val.item() == 0.0 and (a[0].grad == 0).all() and (a[1].grad == 0).all()


def test_extreme_logits_stay_finite():
    s, t, mask = rand_case(6, scale=60.0)
    for loss in DIVS:
        x = s.float().requires_grad_(True)
        val = divergence_loss(x, t.float(), mask, loss, 1.0, beta=0.1)
        val.backward()
        assert torch.isfinite(val) and torch.isfinite(x.grad).all()


def test_bad_names_and_beta():
    s, t, mask = rand_case(4)
    for name in ("kl", "sampled"):  # sampled is a loss on sampled tokens, not a divergence
        with pytest.raises(ValueError, match="unknown loss"):
            divergence_loss(s, t, mask, name, 1.0)
        with pytest.raises(ValueError, match="unknown loss"):
            check_divergence(name, 0.5)
    bad = {"jsd": (0.0, 1.0, -0.1, 1.5), "skew_fkl": (1.0, -0.1), "skew_rkl": (1.0, 1.5), "fkl_rkl": (-0.1, 1.1)}
    for loss, betas in bad.items():
        for beta in betas:
            with pytest.raises(ValueError, match=f"{loss} needs beta"):
                divergence_loss(s, t, mask, loss, 1.0, beta=beta)
            with pytest.raises(ValueError, match=f"{loss} needs beta"):
                check_divergence(loss, beta)
    for loss, beta in (("fkl", 5.0), ("rkl", -1.0), ("jsd", 0.5), ("skew_fkl", 0.0), ("skew_rkl", 0.9),
                       ("fkl_rkl", 0.0), ("fkl_rkl", 1.0)):
        check_divergence(loss, beta)
    assert LOSSES[:4] == ("fkl", "rkl", "jsd", "sampled")  # train.py's --loss choices, the old ones first
    assert set(LOSSES) == set(losses.DIVERGENCES) | {"sampled"} and len(set(LOSSES)) == len(LOSSES)


def test_skew_and_mix_ends_are_the_plain_kls():
    s, t, mask = rand_case(8)
    d = lambda loss, beta: divergence_loss(s, t, mask, loss, 1.0, beta=beta, temperature=0.8, chunk_size=4)
    for a, b in ((d("skew_fkl", 0.0), d("fkl", 0.5)), (d("skew_rkl", 0.0), d("rkl", 0.5)),
                 (d("fkl_rkl", 1.0), d("fkl", 0.5)), (d("fkl_rkl", 0.0), d("rkl", 0.5))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert d("skew_fkl", 0.5) < d("skew_fkl", 0.1) < d("fkl", 0.5)  # skewing towards p_T shrinks it


def test_sampled_estimator_gradient_is_reverse_kl_gradient_in_expectation():
    g = torch.Generator().manual_seed(0)
    V = 4
    theta = torch.randn(V, generator=g, dtype=torch.float64)
    t_logp = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    # exact reverse KL gradient
    x = theta.clone().requires_grad_(True)
    lp = torch.log_softmax(x, -1)
    (lp.exp() * (lp - t_logp)).sum().backward()
    exact = x.grad.clone()
    # the estimator on many samples x ~ p_S (old policy = current policy)
    n = 200_000
    x = theta.clone().requires_grad_(True)
    lp = torch.log_softmax(x, -1)
    tok = torch.multinomial(lp.detach().exp(), n, replacement=True, generator=g)
    s_lp = lp[tok]
    loss = sampled_token_loss(s_lp, s_lp.detach(), t_logp[tok], torch.ones(n, dtype=torch.float64), n)
    loss.backward()
    # value: the Monte Carlo reverse-KL estimate
    kl = (lp.exp() * (lp - t_logp)).sum().item()
    assert abs(loss.item() - kl) < 0.05 * max(kl, 0.1)
    torch.testing.assert_close(x.grad, exact, rtol=0, atol=0.03 * exact.abs().max().item() + 1e-3)
    # and the exact expectation (weights p_S instead of samples) equals it to round-off
    x2 = theta.clone().requires_grad_(True)
    lp2 = torch.log_softmax(x2, -1)
    w = lp2.detach().exp()
    all_tok = torch.arange(V)
    per = -torch.exp(lp2[all_tok] - lp2[all_tok].detach()) * (t_logp - lp2.detach())
    (w * per).sum().backward()
    torch.testing.assert_close(x2.grad, exact, rtol=1e-12, atol=1e-12)


def test_token_logprobs_in_blocks_match_log_softmax_in_float64():
    """Value and gradient of the blockwise token_logprobs against autograd through F.log_softmax, on a
    non-contiguous slice of the logits (as the student's [:, :-1] view), for block sizes down to one row."""
    import torch.nn.functional as F
    from losses import token_logprobs
    g = torch.Generator().manual_seed(4)
    full = torch.randn(5, 8, 11, generator=g, dtype=torch.float64) * 3
    tok = torch.randint(0, 11, (5, 7), generator=g)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    ref_x = full.clone().requires_grad_(True)
    ref = F.log_softmax(ref_x[:, :-1], -1).gather(-1, tok[..., None]).squeeze(-1)
    (ref * w).sum().backward()
    for chunk in (0, 1, 7, 15, 10_000):  # 1 and 7: one batch row per block; 15: two rows
        x = full.clone().requires_grad_(True)
        got = token_logprobs(x[:, :-1], tok, chunk)
        (got * w.float()).sum().backward()
        torch.testing.assert_close(got, ref.float(), rtol=0, atol=1e-6)
        torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("loss", DIVS)
def test_divergence_keeps_nothing_of_size_positions_by_vocab_for_backward(loss):
    """What autograd saves between forward and backward is the logits themselves (and the small position
    index), never a softmax or gradient copy of size [positions, V]."""
    s, t, mask = rand_case(2, B=4, T=9, V=50)
    x, t32 = s.float().requires_grad_(True), t.float()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda a: saved.append(a) or a, lambda a: a):
        val = divergence_loss(x, t32, mask, loss, 7.0, chunk_size=5)
    val.backward()
    inputs = {x.untyped_storage().data_ptr(), t32.untyped_storage().data_ptr()}
    assert any(a.untyped_storage().data_ptr() in inputs for a in saved)
    extra = sum(a.numel() for a in saved if a.untyped_storage().data_ptr() not in inputs)
    assert extra < mask.sum().item() * 50 / 10, [a.shape for a in saved]  # the position index, not logits


def test_divergence_sum_equals_per_token_divergence_sum():
    from losses import divergence_sum
    s, t, mask = rand_case(3, B=3, T=6)
    want = per_token_divergence(s[mask], t[mask], "rkl").sum()
    for chunk in (0, 1, 4):
        torch.testing.assert_close(divergence_sum(s, t, mask, "rkl", chunk_size=chunk), want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------- the output head fused with the loss

def head_case(seed, B=3, T=7, d=8, V=11):
    g = torch.Generator().manual_seed(seed)
    h_s, h_t = torch.randn(B, T, d, generator=g), torch.randn(B, T, d, generator=g)
    w_s, w_t = torch.randn(V, d, generator=g), torch.randn(V, d, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[0, 0] = True
    return h_s, w_s, h_t, w_t, mask


@pytest.mark.parametrize("loss,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.3), ("skew_fkl", 0.1), ("fkl_rkl", 0.3)])
@pytest.mark.parametrize("chunk", [0, 1, 4])
def test_fused_head_divergence_equals_the_unfused_loss_and_gradients(loss, beta, chunk):
    """The loss from hidden states and head weights, the logits a chunk at a time, against divergence_loss
    of the whole logits h W^T: the value, the gradients of h_s and W_s, and the reverse-KL metric."""
    from losses import divergence_sum, head_divergence_loss
    h_s, w_s, h_t, w_t, mask = head_case(3)
    on = torch.tensor([True, False, True])[:, None].expand_as(mask)
    a = [x.clone().requires_grad_(True) for x in (h_s, w_s)]
    b = [x.clone().requires_grad_(True) for x in (h_s, w_s)]
    fused, rkl = head_divergence_loss(a[0], a[1], h_t, w_t, mask, loss, 5.0, beta, 1.3, chunk, metric=on)
    fused.backward()
    s_logits = b[0] @ b[1].T
    ref = divergence_loss(s_logits, h_t @ w_t.T, mask, loss, 5.0, beta, 1.3)
    ref.backward()
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-6)
    assert a[1].grad.abs().sum() > 0
    torch.testing.assert_close(rkl, divergence_sum(s_logits.detach(), h_t @ w_t.T, mask & on, "rkl"), rtol=1e-5,
                               atol=1e-6)


def test_compiled_chunk_divergence_equals_eager():
    """--compile: each chunk's divergence and gradient compiled with dynamic shapes (chunks of 4 and a last one
    of another length, one compile) equal the eager ones, for the hand-derived divergences, with the metric."""
    from losses import head_divergence_loss
    h_s, w_s, h_t, w_t, mask = head_case(7, B=3, T=9, d=8, V=37)
    on = torch.tensor([True, False, True])[:, None].expand_as(mask)
    for loss in ("fkl", "rkl", "jsd"):
        out = []
        for compile in (False, True):
            a = [x.clone().requires_grad_(True) for x in (h_s, w_s)]
            val, rkl = head_divergence_loss(a[0], a[1], h_t, w_t, mask, loss, 5.0, 0.3, 1.3, 4, metric=on,
                                            compile=compile)
            val.backward()
            out.append((val, rkl, a[0].grad, a[1].grad))
        assert mask.sum() % 4 and out[0][2].abs().sum() > 0
        for x, y in zip(*out):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, 2])
def test_fused_head_token_logprobs_equal_the_unfused_ones_and_gradients(chunk):
    from losses import head_token_logprobs, token_logprobs
    h, w, _, _, mask = head_case(4)
    tokens = torch.randint(w.size(0), mask.shape, generator=torch.Generator().manual_seed(0))
    a = [x.clone().requires_grad_(True) for x in (h, w)]
    b = [x.clone().requires_grad_(True) for x in (h, w)]
    weights = torch.randn(mask.shape)
    lp = head_token_logprobs(a[0], a[1], tokens, mask, chunk)
    (lp * weights).sum().backward()
    ref = token_logprobs(b[0] @ b[1].T, tokens) * mask
    (ref * weights).sum().backward()
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-6)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["rkl", "skew_fkl"])  # hand-derived and autograd
def test_fused_head_keeps_nothing_of_size_positions_by_vocab(name):
    """Between forward and backward only the hidden states, head weights and small indices are saved: no
    logits (which never exist whole), softmax or gradient of size [positions, V]."""
    from losses import head_divergence_loss, head_token_logprobs
    h_s, w_s, h_t, w_t, mask = head_case(5, B=4, T=9, d=4, V=500)
    h_s.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda a: saved.append(a) or a, lambda a: a):
        loss, _ = head_divergence_loss(h_s, w_s, h_t, w_t, mask, name, 7.0, beta=0.1, chunk_size=3)
        lp = head_token_logprobs(h_s, w_s, torch.zeros_like(mask, dtype=torch.long), mask, chunk_size=3)
    (loss + lp.sum()).backward()
    n = mask.sum().item()
    assert saved and all(a.numel() < n * 500 / 4 for a in saved), [a.shape for a in saved]


# ------------------------------------------------------------------- the registry: any divergence, every path

@pytest.fixture
def registry(monkeypatch):
    """The registry, copied, for a test to register into (the module's own comes back after)."""
    monkeypatch.setattr(losses, "DIVERGENCES", dict(losses.DIVERGENCES))
    return losses.DIVERGENCES


def run_paths(loss, beta, temp=0.7):
    """The loss and its gradients through every path, chunks of 1, 4 and all positions (the masked counts,
    19 and 13, are not multiples of 4), masks with holes: [(value, gradient w.r.t. the student logits)] of
    divergence_loss in float64, [(value, dh_s, dW_s)] of head_divergence_loss in fp32, and the no-grad sums."""
    s, t, mask = rand_case(9, B=3, T=9, V=13)
    h_s, w_s, h_t, w_t, hmask = head_case(10)
    assert mask.sum() == 19 and hmask.sum() == 13
    chunked, fused = [], []
    for chunk in (1, 4, 0):
        x = s.clone().requires_grad_(True)
        val = divergence_loss(x, t, mask, loss, 7.0, beta, temp, chunk)
        val.backward()
        chunked.append((val.detach(), x.grad))
        a = [v.clone().requires_grad_(True) for v in (h_s, w_s)]
        val, _ = head_divergence_loss(a[0], a[1], h_t, w_t, hmask, loss, 5.0, beta, temp, chunk)
        val.backward()
        fused.append((val.detach(), a[0].grad, a[1].grad))
    sums = (per_token_divergence(s[mask], t[mask], loss, beta, temp).sum(),
            divergence_sum(s, t, mask, loss, beta, temp, chunk_size=4),
            head_divergence_sum(h_s, w_s, h_t, w_t, hmask, loss, beta, temp, chunk_size=4))
    return chunked, fused, sums


def reference_paths(ref, temp=0.7):
    """run_paths' numbers from ref(s_logits, t_logits, temp) -> [N], a float64 definition differentiated
    by plain autograd on the whole logits (the fused ones from h W^T in float64)."""
    s, t, mask = rand_case(9, B=3, T=9, V=13)
    h_s, w_s, h_t, w_t, hmask = head_case(10)
    x = s.clone().requires_grad_(True)
    val = ref(x[mask], t[mask], temp).sum() / 7.0
    val.backward()
    a = [v.double().requires_grad_(True) for v in (h_s, w_s)]
    t_logits = h_t.double() @ w_t.double().T
    hval = ref((a[0] @ a[1].T)[hmask], t_logits[hmask], temp).sum() / 5.0
    hval.backward()
    return (val.detach(), x.grad), (hval.detach(), a[0].grad, a[1].grad), (val.detach() * 7.0, hval.detach() * 5.0)


def assert_paths_match(got, want):
    """run_paths' numbers against the same from another path or a reference: float64 to round-off, the
    fp32 head-fused path to fp32 precision."""
    chunked, fused, sums = got
    w_chunked, w_fused, w_sums = want
    close64 = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    close32 = lambda a, b: torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6)
    for val, grad in chunked:
        close64(val, w_chunked[0])
        close64(grad, w_chunked[1])
    for val, gh, gw in fused:
        for a, b in zip((val, gh, gw), w_fused):
            close32(a, b)
    close64(sums[0], w_sums[0])
    close64(sums[1], w_sums[0])
    close32(sums[2], w_sums[1])


@pytest.mark.parametrize("loss,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.3), ("jsd", 0.8)])
def test_autograd_path_equals_the_hand_derived_one(loss, beta, registry):
    """fkl / rkl / jsd's registered function under a name with no hand-derived gradient goes through the
    generic path (autograd inside each chunk, recomputed in backward): the same values and gradients as
    the analytic path, chunked, head-fused (h and W) and summed."""
    calls = []
    registry["plain"] = lambda *args: calls.append(1) or registry[loss](*args)
    chunked, fused, sums = run_paths(loss, beta)
    assert not calls  # the analytic path does not call the registered function
    assert_paths_match(run_paths("plain", beta), (chunked[0], fused[0], (sums[0], sums[2])))
    assert calls and fused[0][2].abs().sum() > 0


def reference(loss, beta):
    """The float64 definition of a registered divergence: probabilities, the mixtures as sums of them,
    the logarithms taken last."""
    def ref(s, t, temp):
        ps, pt = torch.softmax(s / temp, -1), torch.softmax(t / temp, -1)
        kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)
        return {"skew_fkl": lambda: kl(pt, beta * pt + (1 - beta) * ps),
                "skew_rkl": lambda: kl(ps, beta * ps + (1 - beta) * pt),
                "fkl_rkl": lambda: beta * kl(pt, ps) + (1 - beta) * kl(ps, pt)}[loss]()
    return ref


@pytest.mark.parametrize("loss,beta", [("skew_fkl", 0.1), ("skew_fkl", 0.6), ("skew_rkl", 0.1), ("skew_rkl", 0.6),
                                       ("fkl_rkl", 0.3)])
def test_skew_kl_and_kl_mix_match_float64_autograd(loss, beta):
    assert_paths_match(run_paths(loss, beta), reference_paths(reference(loss, beta)))


def test_a_divergence_registered_here_runs_on_every_path(registry):
    """Registering a function is all it takes: total variation (no beta) and Amari's alpha divergence
    (alpha = beta) through divergence_loss, head_divergence_loss and the sums, against float64 autograd."""
    @divergence("tv")
    def total_variation(log_ps, log_pt, beta):
        return 0.5 * (log_ps.exp() - log_pt.exp()).abs().sum(-1)

    @divergence("alpha")
    def alpha_divergence(log_ps, log_pt, beta):  # (1 - sum p_T^a p_S^(1-a)) / (a (1-a)), a = beta
        return -torch.expm1(torch.logsumexp(beta * log_pt + (1 - beta) * log_ps, -1)) / (beta * (1 - beta))

    def tv_ref(s, t, temp):
        return 0.5 * (torch.softmax(s / temp, -1) - torch.softmax(t / temp, -1)).abs().sum(-1)

    def alpha_ref(s, t, temp, a=0.3):
        ps, pt = torch.softmax(s / temp, -1), torch.softmax(t / temp, -1)
        return (1 - (pt ** a * ps ** (1 - a)).sum(-1)) / (a * (1 - a))

    assert_paths_match(run_paths("tv", 0.5), reference_paths(tv_ref))
    assert_paths_match(run_paths("alpha", 0.3), reference_paths(alpha_ref))
    s, _, mask = rand_case(11)
    x = s.clone().requires_grad_(True)
    val = divergence_loss(x, s.clone(), mask, "alpha", 1.0, beta=0.3)
    val.backward()
    assert val.item() == 0.0 and (x.grad == 0).all()
    check_divergence("tv", 0.5)

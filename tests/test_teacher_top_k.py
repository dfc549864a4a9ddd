"""--teacher-top-k: the divergence over the teacher's K most probable tokens and one bucket for the rest,
against a float64 reference written from probabilities (the teacher's order by Python's sorted, the rest's
mass a plain sum), on the chunked logits path and the head-fused one; K >= V against the full loss; the
flag's checks and its way through train.py's distill objective."""
import os

import pytest
import torch

import train
import test_losses
from conftest import ROOT, tiny_model
from losses import DIVERGENCES, distill_objective, divergence_loss, head_divergence_loss, per_token_divergence
from model import GradKV, forward_from
from rollout import Batch
from teacher import head_weight, hidden


def binned(p, order, k):
    """The [K+1] bins of one position's probabilities p [V]: p at the first k ids of order, then the rest's
    sum (no bucket when k covers the vocabulary)."""
    top, rest = order[:k], order[k:]
    return torch.stack([p[j] for j in top] + ([p[rest].sum()] if rest else []))


def divergence_of(loss, beta):
    """A divergence of two probability vectors, from its definition."""
    kl = lambda p, q: (p * (p.log() - q.log())).sum()
    return {"fkl": lambda ps, pt: kl(pt, ps),
            "rkl": lambda ps, pt: kl(ps, pt),
            "jsd": lambda ps, pt: (beta * kl(pt, beta * pt + (1 - beta) * ps)
                                   + (1 - beta) * kl(ps, beta * pt + (1 - beta) * ps)),
            "skew_fkl": lambda ps, pt: kl(pt, beta * pt + (1 - beta) * ps)}[loss]


def reference(s, t, k, loss, beta, temp):
    """[N, V] float64 logits -> [N] the divergence over the teacher's top-k bins and the rest, differentiable
    in s by plain autograd."""
    ps, pt = torch.softmax(s / temp, -1), torch.softmax(t / temp, -1)
    div, out = divergence_of(loss, beta), []
    for i in range(len(s)):
        order = sorted(range(s.size(1)), key=lambda j: -pt[i, j].item())
        out.append(div(binned(ps[i], order, k), binned(pt[i], order, k)))
    return torch.stack(out)


def rand_case(seed, V=13):
    return test_losses.rand_case(seed, V=V)


CASES = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.3), ("skew_fkl", 0.1)]  # skew_fkl: a divergence with no hand gradient


@pytest.mark.parametrize("loss,beta", CASES)
@pytest.mark.parametrize("k", [1, 4, 12])
@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_chunked_path_matches_the_float64_reference(loss, beta, k, temp):
    s, t, mask = rand_case(0)
    want_x = s.clone().requires_grad_(True)
    want = reference(want_x[mask], t[mask], k, loss, beta, temp).sum() / 11.0
    want.backward()
    for chunk in (1, 4, 0):
        x = s.clone().requires_grad_(True)
        got = divergence_loss(x, t, mask, loss, 11.0, beta, temp, chunk, top_k=k)
        got.backward()
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(x.grad, want_x.grad, rtol=1e-9, atol=1e-13)
    full = divergence_loss(s, t, mask, loss, 11.0, beta, temp)
    if k < s.size(-1) - 1:  # two or more tokens share the bucket: information is lost, the value moves
        assert abs(got.item() - full.item()) > 1e-6
    else:  # a bucket of one token is that token: the full loss
        torch.testing.assert_close(got, full, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss,beta", CASES)
@pytest.mark.parametrize("chunk", [1, 4, 0])
def test_head_fused_path_matches_the_float64_reference(loss, beta, chunk):
    """From hidden states and head weights (fp32, the logits a chunk at a time): the value and the
    gradients of h_s and W_s against the reference on h W^T in float64."""
    g = torch.Generator().manual_seed(3)
    B, T, d, V, k = 3, 7, 8, 11, 3
    h_s, h_t = torch.randn(B, T, d, generator=g), torch.randn(B, T, d, generator=g)
    w_s, w_t = torch.randn(V, d, generator=g), torch.randn(V, d, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.6
    a = [v.clone().requires_grad_(True) for v in (h_s, w_s)]
    got, _ = head_divergence_loss(a[0], a[1], h_t, w_t, mask, loss, 5.0, beta, 1.3, chunk, top_k=k)
    got.backward()
    b = [v.double().requires_grad_(True) for v in (h_s, w_s)]
    want = reference((b[0] @ b[1].T)[mask], (h_t.double() @ w_t.double().T)[mask], k, loss, beta, 1.3).sum() / 5.0
    want.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-6)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-4, atol=1e-6)
    assert a[1].grad.abs().sum() > 0


@pytest.mark.parametrize("loss", sorted(DIVERGENCES))
def test_top_k_of_the_whole_vocabulary_is_the_full_loss(loss):
    """K = V (and above): the vocabulary in the teacher's order, no bucket: the full loss to round-off,
    value and gradient, chunked (float64) and head-fused (fp32)."""
    beta = 0.3
    s, t, mask = rand_case(1, V=9)
    ref_x = s.clone().requires_grad_(True)
    ref = divergence_loss(ref_x, t, mask, loss, 7.0, beta, 0.8, 4)
    ref.backward()
    g = torch.Generator().manual_seed(2)
    h_s, w_s, h_t, w_t = (torch.randn(*shape, generator=g) for shape in ((3, 7, 5), (9, 5), (3, 7, 5), (9, 5)))
    hs_ref = [v.clone().requires_grad_(True) for v in (h_s, w_s)]
    href, _ = head_divergence_loss(hs_ref[0], hs_ref[1], h_t, w_t, mask, loss, 7.0, beta, 0.8, 4)
    href.backward()
    for k in (9, 14):
        x = s.clone().requires_grad_(True)
        val = divergence_loss(x, t, mask, loss, 7.0, beta, 0.8, 4, top_k=k)
        val.backward()
        torch.testing.assert_close(val, ref.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-10, atol=1e-14)
        hs = [v.clone().requires_grad_(True) for v in (h_s, w_s)]
        hval, _ = head_divergence_loss(hs[0], hs[1], h_t, w_t, mask, loss, 7.0, beta, 0.8, 4, top_k=k)
        hval.backward()
        torch.testing.assert_close(hval, href.detach(), rtol=1e-5, atol=1e-7)
        for a, b in zip(hs, hs_ref):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_identical_distributions_give_exactly_zero():
    s, _, mask = rand_case(4)
    for dtype in (torch.float32, torch.float64):
        for loss, beta in CASES:
            x = s.to(dtype).requires_grad_(True)
            val = divergence_loss(x, x.detach().clone(), mask, loss, 3.0, beta, 0.9, top_k=3)
            val.backward()
            assert val.item() == 0.0 and (x.grad == 0).all()


def test_a_tail_below_fp32_resolution_is_kept():
    """A teacher whose top 2 hold all but ~1e-12 of the mass, a student with a third of its mass elsewhere:
    1 - (sum of the top 2) is 0 in fp32 (log: -inf, so rkl would be infinite), the logsumexp of the rest is
    not. The fp32 loss and its gradient against the float64 reference."""
    V = 50
    t = torch.full((2, V), -30.0, dtype=torch.float64)
    t[:, :2] = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    s = torch.zeros(2, V, dtype=torch.float64)
    s[:, :2] = 3.0
    mask = torch.ones(2, dtype=torch.bool)
    assert 1 - torch.softmax(t.float(), -1)[:, :2].sum(-1).max() <= 0
    for loss, beta in CASES:
        ref_x = s.clone().requires_grad_(True)
        ref = reference(ref_x, t, 2, loss, beta, 1.0).sum()
        ref.backward()
        x = s.float().requires_grad_(True)
        val = divergence_loss(x, t.float(), mask, loss, 1.0, beta, top_k=2)
        val.backward()
        assert torch.isfinite(val) and torch.isfinite(x.grad).all()
        torch.testing.assert_close(val.double(), ref.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-6)
    assert per_token_divergence(s, t, "rkl", top_k=2).min() > 5  # the student's third is real, and costs


# ---------------------------------------------------------------------------------------------- the flag

def parse(argv):
    return train.parse_args([*argv, "--out", os.devnull])


@pytest.mark.parametrize("argv,msg", [(["--teacher-top-k", "0"], "must be >= 1"),
                                      (["--teacher-top-k", "-3"], "must be >= 1"),
                                      (["--teacher-top-k", "8", "--loss", "sampled"], "--loss sampled already"),
                                      (["--teacher-top-k", "8", "--stage", "sft"], "--stage distill")])
def test_bad_flags_fail_with_one_line(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and msg in err[-1]


def test_a_cross_tokenizer_teacher_is_refused():
    """The number-tokenizer student under the char teacher: the same flags load without --teacher-top-k."""
    base = ["--student", os.path.join(ROOT, "checkpoints", "student-num"), "--max-new-tokens", "12"]
    with pytest.raises(ValueError, match="--teacher-top-k needs the student's tokenizer"):
        train.load_models(parse(base + ["--teacher-top-k", "8"]))
    assert train.load_models(parse(base))[4]  # cross


@pytest.mark.parametrize("loss", ["rkl", "jsd"])
def test_the_distill_objective_reads_the_flag(loss):
    """train.py's distill step (losses.distill_objective as the student's head, args from train.parse_args)
    gives the top-K loss and gradient of head_divergence_loss; the logged reverse KL stays the full one."""
    student, teacher = tiny_model(seed=1), tiny_model(seed=2)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 23, (4, 9), generator=g)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    for b, n in enumerate((6, 3, 5, 1)):
        mask[b, :n] = True
    batch = Batch(tokens, valid, torch.cat([torch.zeros(4, 3, dtype=torch.bool), mask], 1), 3, torch.zeros(4, 9),
                  torch.tensor([True, True, False, True]))
    pos = batch.pos
    with torch.no_grad():
        t_h = forward_from(teacher, tokens, pos, valid, 3, hidden)
    out = {}
    for k in (None, 4):
        args = parse(["--loss", loss] + (["--teacher-top-k", str(k)] if k else []))
        run = train.Run(args, None, None, False, None, 0, 1, torch.device("cpu"), 0, 2, head_weight(teacher))
        student.zero_grad()
        val, rkl = forward_from(student, tokens, pos, valid, 3, cache_cls=GradKV,
                                head=lambda h, w: distill_objective(h, w, batch, 15, run, t_h))
        val.backward()
        out[k] = val.detach(), rkl, [p.grad.clone() for p in student.parameters()]
    with torch.no_grad():
        h_s = forward_from(student, tokens, pos, valid, 3, hidden)
        want = head_divergence_loss(h_s, student.head.weight, t_h, head_weight(teacher), mask, loss, 15, top_k=4)[0]
    torch.testing.assert_close(out[4][0], want, rtol=1e-5, atol=1e-7)
    assert abs(out[4][0] - out[None][0]) > 1e-4 and not torch.equal(out[4][2][-1], out[None][2][-1])
    torch.testing.assert_close(out[4][1], out[None][1])  # the full-vocabulary reverse KL of the on-policy rows


def test_the_bias_tool_on_the_shipped_pair(capsys):
    """tools/topk_bias.py: K >= V (the char vocabulary) is the full loss and gradient; K = 1 is not; the last
    line is one JSON object."""
    import json
    import topk_bias
    topk_bias.main(["--rows", "4", "--ks", "1,64", "--losses", "rkl,jsd"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["vocab"] < 64 and out["bytes_per_position"]["top1"] == 12
    for r in out["results"]:
        if r["k"] == 64:
            assert abs(r["rel_loss"]) < 1e-6 and r["logits"]["cos"] > 1 - 1e-9 and r["params"]["rel_norm"] < 1e-5
            assert r["teacher_tail"] == 0
        else:
            assert abs(r["rel_loss"]) > 1e-3 and r["logits"]["rel_norm"] > 1e-3 and r["teacher_tail"] > 0

"""The speed work (issue #6) must not change results: each fast path against a plain reference.

- rotary positions: q and k rotated together in the rotate-half form == the two-half formula, bitwise;
- logits only for the columns a loss reads (GPT.forward's out_from) == the full forward sliced, and the
  distillation loss and its gradients through it == those through the full forward;
- one prefill per distinct prompt (model.prefill): the same samples, logprobs and teacher logits as
  prefilling every row (and in test_fsdp, 1 process sharing == 2 processes sharing nothing);
- the one-token decode mask: covered by test_model_rollout (cached greedy decode == naive decode, cached
  sampling == full recompute fed the same noise, logprobs == a full forward of the finished rows).
"""
import pytest
import torch

from losses import divergence_loss
from model import GPT, GPTConfig, KVCache, apply_rope, distinct_rows, positions_from_valid
from rollout import left_pad, pack
from teacher import score


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(**({"vocab_size": 23, "n_layer": 3, "n_head": 2, "d_model": 32, "d_mlp": 64,
                        "max_seq_len": 48} | kw))
    return GPT(cfg)


def two_half_rope(x, pos, hd, base=10000.0):
    """The textbook form on [B, H, T, hd]: [x1 cos - x2 sin, x1 sin + x2 cos], fp32 angles as the model
    builds them."""
    inv_freq = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = pos.float()[..., None] * inv_freq  # [B, T, hd/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x.chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def test_joint_rotate_half_rope_equals_two_half_formula_bitwise():
    model = tiny()
    B, H, T, hd = 3, 2, 11, 16
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, B, H, T, hd, generator=g)
    pos = torch.randint(0, 40, (B, T), generator=g)
    cos = model.rope_cos[pos].unsqueeze(1)
    sin = model.rope_sin[pos].unsqueeze(1)
    rq, rk = apply_rope(torch.stack([q, k]), cos, sin)
    assert torch.equal(rq, two_half_rope(q, pos, hd)) and torch.equal(rk, two_half_rope(k, pos, hd))
    # and it is a rotation: norms of each pair are kept (float64 check of the reference itself)
    x1, x2 = q.double().chunk(2, -1)
    y1, y2 = rq.double().chunk(2, -1)
    assert torch.allclose(x1 ** 2 + x2 ** 2, y1 ** 2 + y2 ** 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_out_from_logits_equal_the_full_forward_sliced(padded):
    model = tiny().eval()
    g = torch.Generator().manual_seed(3)
    lengths = (9, 4, 12, 7) if padded else (12, 12, 12, 12)
    ids, valid = left_pad([torch.randint(3, 23, (n,), generator=g).tolist() for n in lengths], 0)
    pos = positions_from_valid(valid)
    full = model(ids, pos, valid)
    T = ids.size(1)
    for out_from in (1, 5, T - 1):
        part = model(ids, pos, valid, out_from=out_from)
        assert part.shape == (4, T - out_from, 23)
        torch.testing.assert_close(part, full[:, out_from:], rtol=1e-5, atol=1e-6)
        # the same through a KV cache (generate's prefill), which also fills every column's keys/values
        cache = KVCache(model.cfg, 4, T + 2)
        torch.testing.assert_close(model(ids, pos, valid, cache, out_from=out_from), full[:, out_from:],
                                   rtol=1e-5, atol=1e-6)
        assert cache.len == T
    with pytest.raises(ValueError, match="out_from"):
        model(ids, out_from=T)


@pytest.mark.parametrize("loss", ["rkl", "jsd", "fkl"])
def test_completion_only_loss_and_gradients_equal_the_full_forward(loss):
    """train.py's step: logits from column prompt_len - 1 on, masks from prompt_len on, versus the whole
    layout (logits [:, :-1], masks [:, 1:]): the same loss and the same parameter gradients."""
    student, teacher = tiny(0), tiny(1).eval()
    g = torch.Generator().manual_seed(4)
    prompts = [[1] + torch.randint(4, 23, (n,), generator=g).tolist() for n in (5, 9, 3)]
    comps = [torch.randint(4, 23, (n,), generator=g).tolist() + [2] for n in (6, 2, 10)]
    b = pack(prompts, comps, 0)
    results = []
    for c in (1, b.prompt_len):
        m = b.mask[:, c:]
        t_logits = score(teacher, b, start=c)
        s_logits = student(b.tokens, b.pos, b.valid, out_from=c - 1)[:, :-1]
        assert s_logits.shape[1] == b.tokens.size(1) - c == t_logits.shape[1]
        student.zero_grad()
        value = divergence_loss(s_logits, t_logits, m, loss, m.sum().item(), 0.5)
        value.backward()
        results.append((value.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}))
    (full_loss, full_grads), (part_loss, part_grads) = results
    torch.testing.assert_close(part_loss, full_loss, rtol=1e-5, atol=1e-7)
    for name in full_grads:
        torch.testing.assert_close(part_grads[name], full_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    assert any(bool(g.abs().sum() > 0) for g in part_grads.values())


def spp_batch(spp, seed=5):
    """Prompts of different lengths, each repeated spp times in a row (train.py's --samples-per-prompt
    layout), plus one prompt that occurs once."""
    g = torch.Generator().manual_seed(seed)
    distinct = [[1] + torch.randint(4, 23, (n,), generator=g).tolist() for n in (4, 9, 6)]
    return [p for p in distinct for _ in range(spp)] + [[1, 5, 6]]


def test_distinct_rows_groups_equal_prompts():
    ids, valid = left_pad(spp_batch(3), 0)
    first, inverse = distinct_rows(ids, valid)
    assert len(first) == 4
    assert torch.equal(ids[first][inverse], ids) and torch.equal(valid[first][inverse], valid)
    assert sorted(first.tolist()) == [0, 3, 6, 9]  # the first row of each group


@torch.no_grad()
def test_shared_prompt_prefill_samples_what_every_row_prefilled_samples():
    from rollout import generate
    model = tiny().eval()
    ids, valid = left_pad(spp_batch(4), 0)
    out = [generate(model, ids, valid, 10, 2, 0, temperature=1.0, generator=torch.Generator().manual_seed(7),
                    share_prompts=share) for share in (True, False)]
    assert torch.equal(out[0].tokens, out[1].tokens) and torch.equal(out[0].mask, out[1].mask)
    torch.testing.assert_close(out[0].logprobs, out[1].logprobs, rtol=1e-5, atol=1e-6)
    assert len({tuple(c) for c in out[0].completions()[:4]}) > 1  # the samples of one prompt differ


@torch.no_grad()
def test_shared_prompt_teacher_scores_equal_the_full_forward():
    teacher = tiny(2).eval()
    g = torch.Generator().manual_seed(8)
    ps = spp_batch(3)
    comps = [torch.randint(4, 23, (int(n),), generator=g).tolist() + [2] for n in torch.randint(0, 8, (len(ps),), generator=g)]
    b = pack(ps, comps, 0)
    P = b.prompt_len
    full = teacher(b.tokens, b.pos, b.valid)[:, P - 1:-1]
    shared = score(teacher, b, start=P)
    plain = score(teacher, b, start=P, share_prompts=False)
    assert shared.shape == full.shape == plain.shape
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, full, rtol=1e-5, atol=1e-5)

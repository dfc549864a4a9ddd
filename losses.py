"""Token-level divergences between the student's and the teacher's next-token distributions.

p_T is the teacher, p_S the student, both softmax(logits / loss_temperature) (default 1; no tau^2
rescaling). On each completion token:

    fkl      KL(p_T || p_S)                               forward, mode-covering (= supervised KD)
    rkl      KL(p_S || p_T)                               reverse, mode-seeking
    jsd      beta KL(p_T || M) + (1-beta) KL(p_S || M),   M = beta p_T + (1-beta) p_S, beta in (0, 1)
             (the GKD paper's generalized JSD; it tends to 0 at both ends, so beta=0 is not fkl)
    sampled  -exp(log p_S(x) - log p_old(x)) * A,          A = log p_T(x) - log p_old(x), detached
             the Thinking Machines estimator on the sampled token x: needs only the teacher's logprob of
             x; its value at p_S = p_old is the per-token reverse-KL estimate, its gradient in expectation
             is the gradient of KL(p_S || p_T) (see tests/test_losses.py)

One normalisation for every loss: the sum over the completion tokens of the optimizer step divided by
their count (`n_tokens`, all micro-batches and ranks), never a per-sequence mean.

Across tokenizers (teacher.align_completion cuts a completion into spans where both tokenizations have a
boundary; both models see the same text before each span):

    span_sampled   the sampled estimator with one advantage per span, A = log p_T(span) - log p_old(span),
                   on every student token of the span; sequence-level reverse KL exactly
    hybrid_uld     on spans of one token on each side: a divergence over the shared vocabulary plus ULD
                   (sorted-probability L1) over the rest (the GOLD hybrid); see hybrid_uld_loss
"""
import torch
import torch.nn.functional as F

LOSSES = ("fkl", "rkl", "jsd", "sampled")


def _divergence_and_grad(s_logits, t_logits, loss, beta, temperature):
    """Per-position divergence [N] and its gradient w.r.t. the student logits [N, V], both analytic.

    Written so that identical inputs give exactly 0 and an exactly-0 gradient (no round-off that Adam
    would amplify into a real step)."""
    dt = torch.promote_types(s_logits.dtype, torch.float32)
    log_ps = F.log_softmax(s_logits.to(dt) / temperature, -1)
    log_pt = F.log_softmax(t_logits.to(dt) / temperature, -1)
    ps = log_ps.exp()
    if loss == "fkl":
        pt = log_pt.exp()
        return (pt * (log_pt - log_ps)).sum(-1), (ps - pt) / temperature
    if loss == "rkl":
        d = log_ps - log_pt
        val = (ps * d).sum(-1)
        return val, ps * (d - val[:, None]) / temperature
    if loss == "jsd":
        if not 0 < beta < 1:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
        # log m - log p_S with m = beta p_T + (1-beta) p_S, stable for any gap d = log p_T - log p_S:
        # log1p(beta expm1(d)) when d <= 0, else d + log(beta + (1-beta) e^-d)
        d = log_pt - log_ps
        lm_s = torch.where(d <= 0, torch.log1p(beta * torch.expm1(d.clamp(max=0))),
                           d.clamp(min=0) + torch.log(beta + (1 - beta) * torch.exp(-d.clamp(min=0))))
        lm_t = lm_s - d  # log m - log p_T
        val = -beta * (log_pt.exp() * lm_t).sum(-1) - (1 - beta) * (ps * lm_s).sum(-1)
        g = -(1 - beta) * lm_s  # dJ/dp_S (the terms through m cancel), then through the softmax
        return val, ps * (g - (ps * g).sum(-1, keepdim=True)) / temperature
    raise ValueError(f"unknown loss {loss!r} (choose from {', '.join(LOSSES)})")


class _Divergence(torch.autograd.Function):
    """Sum over positions of the divergence, with the analytic gradient for the student logits only
    (the teacher's logits are constants)."""

    @staticmethod
    def forward(ctx, s_logits, t_logits, loss, beta, temperature):
        val, grad = _divergence_and_grad(s_logits.detach(), t_logits.detach(), loss, beta, temperature)
        ctx.save_for_backward(grad.to(s_logits.dtype))
        return val.sum()

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None, None, None


def per_token_divergence(s_logits, t_logits, loss, beta=0.5, temperature=1.0):
    """[N, V] student and teacher logits -> [N] divergence per position (no gradient)."""
    return _divergence_and_grad(s_logits.detach(), t_logits.detach(), loss, beta, temperature)[0]


def divergence_loss(s_logits, t_logits, mask, loss, n_tokens, beta=0.5, temperature=1.0, chunk_size=0):
    """Sum of the per-token divergence over masked positions / n_tokens, differentiable in s_logits.

    s_logits, t_logits: [..., V]; mask: [...] bool. Only the masked positions are computed. With
    chunk_size > 0 the positions go through in chunks, so the softmax intermediates of only one chunk
    are alive at a time (what is kept for backward is one [N, V] gradient)."""
    s, t = s_logits[mask], t_logits[mask]
    step = chunk_size if chunk_size > 0 else max(1, s.size(0))
    total = sum(_Divergence.apply(s[i:i + step], t[i:i + step], loss, beta, temperature)
                for i in range(0, s.size(0), step))
    return total / n_tokens


def sampled_token_loss(s_logprobs, old_logprobs, t_logprobs, mask, n_tokens):
    """The importance-sampled policy-gradient estimator of reverse KL on the sampled tokens.

    s_logprobs: log p_S(x_t) with grad; old_logprobs: at sampling time; t_logprobs: log p_T(x_t)."""
    adv = (t_logprobs - old_logprobs).detach()
    ratio = torch.exp(s_logprobs - old_logprobs.detach())
    return -(ratio * adv * mask).sum() / n_tokens


# ------------------------------------------------------------------------------------- across tokenizers

def span_sum(values, span, n_spans):
    """Sum of `values` over each span: values [B, T], span [B, T] long (span id, -1 = in no span) ->
    [B, n_spans]. A scatter_add, so differentiable in `values`; a one-token span is that value exactly."""
    idx = torch.where(span >= 0, span, n_spans)  # column n_spans collects the rest and is dropped
    out = values.new_zeros(values.size(0), n_spans + 1).scatter_add(1, idx, values)
    return out[:, :n_spans]


def span_sampled_token_loss(s_logprobs, old_logprobs, t_span_logprobs, s_span, n_tokens, mask=None):
    """The sampled-token estimator with span advantages.

        A_k   = log p_T(span k) - log p_old(span k)      (detached; span log-probs are sums over its tokens)
        loss  = -sum_t exp(log p_S(x_t) - log p_old(x_t)) * A_{span(t)} / n_tokens

    s_logprobs [B, T] student token logprobs (with grad), old_logprobs [B, T] at sampling time,
    t_span_logprobs [B, S] the teacher's span logprobs (teacher.span_logprobs), s_span [B, T] span ids
    (-1 off the completion), mask [B, T] optional: only these tokens (e.g. ~one_to_one when the one-to-one
    spans go to hybrid_uld_loss). At p_S = p_old the gradient is sum_k A_k grad log p_S(span k): the
    sequence-level reverse-KL policy gradient, exact whatever the tokenizations. With identical tokenizers
    every span is one token and this is sampled_token_loss, bit for bit."""
    adv = (t_span_logprobs - span_sum(old_logprobs, s_span, t_span_logprobs.size(1))).detach()
    adv = adv.gather(1, s_span.clamp(min=0))
    keep = s_span >= 0 if mask is None else mask & (s_span >= 0)
    ratio = torch.exp(s_logprobs - old_logprobs.detach())
    return -(ratio * adv * keep).sum() / n_tokens


def _uld(s_logits, t_logits, rest_s, rest_t, temperature):
    """Per position: sum_i |sort(p_S[rest_s])_i - sort(p_T[rest_t])_i|, both sorted descending, the shorter
    padded with zeros; p = softmax(logits / temperature) over the full vocabulary (not renormalised)."""
    dt = torch.promote_types(s_logits.dtype, torch.float32)
    ps = F.softmax(s_logits.to(dt) / temperature, -1)[:, rest_s].sort(-1, descending=True).values
    pt = F.softmax(t_logits.to(dt) / temperature, -1)[:, rest_t].sort(-1, descending=True).values
    k = max(ps.size(-1), pt.size(-1))
    ps, pt = F.pad(ps, (0, k - ps.size(-1))), F.pad(pt, (0, k - pt.size(-1)))
    return (ps - pt).abs().sum(-1)


def hybrid_uld_loss(s_logits, t_logits, shared_s, shared_t, n_tokens, loss="rkl", beta=0.5, temperature=1.0,
                    uld_weight=1.0, chunk_size=0):
    """The GOLD hybrid on positions where the two distributions predict the same text (one-to-one spans).

    s_logits [M, V_S], t_logits [M, V_T]: the student's and the teacher's logits at those positions
    (teacher.CrossBatch.pairs). shared_s, shared_t [K]: ids of the token strings both vocabularies hold
    (teacher.shared_vocab). Per position:

        D( softmax(s[shared_s] / tau) , softmax(t[shared_t] / tau) )                 shared part
      + uld_weight * sum_i |sort(p_S on the student-only ids)_i - sort(p_T on the teacher-only ids)_i|

    summed over positions / n_tokens. D is `loss` (rkl = KL(p_S || p_T) by default, or fkl / jsd) with the
    analytic gradient of divergence_loss. What is implemented and why:
    - shared part: both distributions are renormalised onto the shared strings (a softmax over the shared
      logits), so D is a proper divergence, >= 0 and exactly 0 with an exactly-0 gradient when they agree;
      TRL's GOLD instead applies its JSD to the raw (sub-stochastic) probabilities. Reverse KL by default,
      the on-policy objective.
    - ULD part: the Universal Logit Distillation distance (Wasserstein-1 under a uniform cost, which is the
      L1 between the sorted probability vectors) on the rest, with the full-vocabulary probabilities, so it
      also carries the mass split the renormalisation drops: it is >= |p_S(student-only) - p_T(teacher-only)|.
      It ignores which string a probability belongs to; that is its nature (and why the shared part exists).
    - the weights are fixed (1 and uld_weight), not TRL's vocabulary-overlap adaptive ones.
    Caveat: a shared string need not mean the same event: "1" for a number-level student is the number 1,
    for a character-level teacher any number starting with 1.
    With identical tokenizers (shared = everything, rest empty) this is divergence_loss, bit for bit."""
    V_S, V_T = s_logits.size(-1), t_logits.size(-1)
    rest_s = torch.ones(V_S, dtype=torch.bool, device=s_logits.device)
    rest_t = torch.ones(V_T, dtype=torch.bool, device=t_logits.device)
    rest_s[shared_s], rest_t[shared_t] = False, False
    use_uld = uld_weight != 0 and bool(rest_s.any() or rest_t.any())
    t_logits = t_logits.detach()
    step = chunk_size if chunk_size > 0 else max(1, s_logits.size(0))
    total = 0
    for i in range(0, s_logits.size(0), step):
        s, t = s_logits[i:i + step], t_logits[i:i + step]
        part = _Divergence.apply(s[:, shared_s], t[:, shared_t], loss, beta, temperature)
        if use_uld:
            part = part + uld_weight * _uld(s, t, rest_s, rest_t, temperature).sum()
        total = total + part
    return total / n_tokens

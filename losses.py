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
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSSES = ("fkl", "rkl", "jsd", "sampled")


def per_token_divergence(s_logits, t_logits, loss, beta=0.5, temperature=1.0):
    """[N, V] student and teacher logits -> [N] divergence per position (fp32 or the inputs' float64)."""
    dt = torch.promote_types(s_logits.dtype, torch.float32)
    log_ps = F.log_softmax(s_logits.to(dt) / temperature, -1)
    log_pt = F.log_softmax(t_logits.to(dt) / temperature, -1)
    if loss == "fkl":
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if loss == "rkl":
        return (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    if loss == "jsd":
        if not 0 < beta < 1:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
        log_m = torch.logsumexp(torch.stack([log_pt + torch.log(torch.tensor(beta, dtype=dt)),
                                             log_ps + torch.log(torch.tensor(1 - beta, dtype=dt))]), 0)
        kl_tm = (log_pt.exp() * (log_pt - log_m)).sum(-1)
        kl_sm = (log_ps.exp() * (log_ps - log_m)).sum(-1)
        return beta * kl_tm + (1 - beta) * kl_sm
    raise ValueError(f"unknown loss {loss!r} (choose from {', '.join(LOSSES)})")


def divergence_loss(s_logits, t_logits, mask, loss, n_tokens, beta=0.5, temperature=1.0, chunk_size=0):
    """Sum of the per-token divergence over masked positions / n_tokens.

    s_logits, t_logits: [..., V] (teacher's without grad); mask: [...] bool. Only the masked positions
    are computed. With chunk_size > 0 the positions go through in chunks under activation checkpointing,
    so the softmax intermediates of only one chunk are alive at a time (same value and gradient)."""
    s, t = s_logits[mask], t_logits[mask]
    if chunk_size <= 0 or s.size(0) <= chunk_size:
        return per_token_divergence(s, t, loss, beta, temperature).sum() / n_tokens
    total = s.new_zeros((), dtype=torch.promote_types(s.dtype, torch.float32))
    for i in range(0, s.size(0), chunk_size):
        part = checkpoint(per_token_divergence, s[i:i + chunk_size], t[i:i + chunk_size], loss, beta, temperature,
                          use_reentrant=False)
        total = total + part.sum()
    return total / n_tokens


def sampled_token_loss(s_logprobs, old_logprobs, t_logprobs, mask, n_tokens):
    """The importance-sampled policy-gradient estimator of reverse KL on the sampled tokens.

    s_logprobs: log p_S(x_t) with grad; old_logprobs: at sampling time; t_logprobs: log p_T(x_t)."""
    adv = (t_logprobs - old_logprobs).detach()
    ratio = torch.exp(s_logprobs - old_logprobs.detach())
    return -(ratio * adv * mask).sum() / n_tokens

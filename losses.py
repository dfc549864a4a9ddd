"""Token-level divergences between the student's and the teacher's next-token distributions.

p_T is the teacher, p_S the student, both softmax(logits / loss_temperature) (default 1; no tau^2
rescaling). On each completion token:

    fkl      KL(p_T || p_S)                               forward, mode-covering (= supervised KD)
    rkl      KL(p_S || p_T)                               reverse, mode-seeking
    jsd      beta KL(p_T || M) + (1-beta) KL(p_S || M),   M = beta p_T + (1-beta) p_S, beta in (0, 1)
             (the GKD paper's generalized JSD; it tends to 0 at both ends, so beta=0 is not fkl)
    skew_fkl KL(p_T || beta p_T + (1-beta) p_S)            DistiLLM's skew KL, beta in [0, 1) (0: fkl)
    skew_rkl KL(p_S || beta p_S + (1-beta) p_T)            DistiLLM's skew reverse KL, beta in [0, 1)
    fkl_rkl  beta fkl + (1-beta) rkl                       beta in [0, 1]
    sampled  -exp(log p_S(x) - log p_old(x)) * A,          A = log p_T(x) - log p_old(x), detached
             the Thinking Machines estimator on the sampled token x: on-policy distillation as RL, a
             policy gradient whose per-token advantage is the teacher's log-ratio (distill_advantage);
             p_old is the student at sampling time (the rollout's logprobs). It needs only the teacher's
             logprob of x; its value at p_S = p_old is the per-token reverse-KL estimate, its gradient in
             expectation is the gradient of KL(p_S || p_T) (see tests/test_losses.py)

RL (train.py --stage rl) is the same policy gradient with a sequence-level advantage from the verifier's
reward (reward_advantage) in place of the teacher's log-ratio; distillation plus reward adds the two.

One normalisation for every loss: the sum over the completion tokens of the optimizer step divided by
their count (`n_tokens`, all micro-batches and ranks), never a per-sequence mean.
Teachers with another tokenizer: crosstok.py. A new divergence is one registered function (below).

--teacher-top-k K: any divergence above over K+1 bins instead of the vocabulary, the teacher's K most
probable tokens and one bucket for the rest (top_k_bins): what a remote or very large teacher can send.
"""
import math

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------- the divergences, one function each
# A divergence is f(log_ps, log_pt, beta) -> [N]: log_ps, log_pt [N, V] fp32 log-softmax of the student's
# and the teacher's tempered logits, beta its one weight in [0, 1] (ignored where it has none). Registered
# under a name, it is a `--loss NAME --beta B` of every path below (chunked, head-fused, crosstok), which
# differentiates it by autograd one chunk at a time; fkl, rkl and jsd also have a hand-derived gradient
# (_divergence_and_grad). A beta out of range raises ValueError (check_divergence).

DIVERGENCES = {}


def divergence(name):
    """Decorator: register f(log_ps, log_pt, beta) -> [N] as the divergence `name`. f must be a
    divergence: >= 0, and 0 where p_S = p_T (the paths set it, and its gradient, to exactly 0 there)."""
    def register(f):
        DIVERGENCES[name] = f
        return f
    return register


def kl(log_p, log_q):
    """KL(p || q) per position, from log-probabilities [N, V]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def log_mix(log_p, log_q, a):
    """log(a p + (1-a) q), staying in log space: no underflow where p or q is tiny."""
    if a <= 0 or a >= 1:
        return log_p if a >= 1 else log_q
    return torch.logaddexp(log_p + math.log(a), log_q + math.log1p(-a))


def _need_beta(ok, name, beta, interval):
    if not ok:
        raise ValueError(f"{name} needs beta in {interval}, got {beta}")


@divergence("fkl")
def fkl(log_ps, log_pt, beta):
    return kl(log_pt, log_ps)


@divergence("rkl")
def rkl(log_ps, log_pt, beta):
    return kl(log_ps, log_pt)


@divergence("jsd")
def jsd(log_ps, log_pt, beta):
    _need_beta(0 < beta < 1, "jsd", beta, "(0, 1)")
    log_m = log_mix(log_pt, log_ps, beta)
    return beta * kl(log_pt, log_m) + (1 - beta) * kl(log_ps, log_m)


@divergence("skew_fkl")
def skew_fkl(log_ps, log_pt, beta):
    """DistiLLM's skew KL (Ko et al. 2024): KL(p_T || beta p_T + (1-beta) p_S); beta 0 is fkl."""
    _need_beta(0 <= beta < 1, "skew_fkl", beta, "[0, 1)")
    return kl(log_pt, log_mix(log_pt, log_ps, beta))


@divergence("skew_rkl")
def skew_rkl(log_ps, log_pt, beta):
    """DistiLLM's skew reverse KL: KL(p_S || beta p_S + (1-beta) p_T); beta 0 is rkl."""
    _need_beta(0 <= beta < 1, "skew_rkl", beta, "[0, 1)")
    return kl(log_ps, log_mix(log_ps, log_pt, beta))


@divergence("fkl_rkl")
def fkl_rkl(log_ps, log_pt, beta):
    """beta fkl + (1-beta) rkl."""
    _need_beta(0 <= beta <= 1, "fkl_rkl", beta, "[0, 1]")
    return beta * kl(log_pt, log_ps) + (1 - beta) * kl(log_ps, log_pt)


# train.py's --loss choices: the divergences registered above, after the four there always were
LOSSES = ("fkl", "rkl", "jsd", "sampled") + tuple(n for n in DIVERGENCES if n not in ("fkl", "rkl", "jsd"))


def check_divergence(loss, beta):
    """Raise ValueError if `loss` is not a registered divergence or refuses this beta (train.py's
    argument check, before any step)."""
    if loss not in DIVERGENCES:
        raise ValueError(f"unknown loss {loss!r} (choose from {', '.join(DIVERGENCES)})")
    DIVERGENCES[loss](torch.zeros(1, 2), torch.zeros(1, 2), beta)


CHUNK_ELEMENTS = 2 ** 22  # positions x vocabulary per chunk by default: 16 MB per fp32 temporary


def chunk_rows(chunk_size, vocab):
    """Positions per chunk: chunk_size, or (0) as many as fit CHUNK_ELEMENTS (with a 23-token vocabulary
    every batch is one chunk; with 152k, 27 positions)."""
    return chunk_size if chunk_size > 0 else max(1, CHUNK_ELEMENTS // vocab)


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits)[token] per position, a block of rows of the batch at a time; backward recomputes
    each block's softmax, so no [positions, V] log-softmax is kept (only the logits, alive anyway)."""

    @staticmethod
    def forward(ctx, logits, tokens, chunk_size):
        x, tok = logits.detach(), tokens.unsqueeze(-1)
        out = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)
        k = max(1, chunk_rows(chunk_size, x.size(-1)) // max(1, tokens[0].numel()))  # batch rows per block
        for i in range(0, x.size(0), k):
            out[i:i + k] = F.log_softmax(x[i:i + k].float(), -1).gather(-1, tok[i:i + k]).squeeze(-1)
        ctx.save_for_backward(logits, tokens)
        ctx.k = k
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, tokens = ctx.saved_tensors
        x, tok, g, k = logits.detach(), tokens.unsqueeze(-1), grad_out.unsqueeze(-1), ctx.k
        grad = torch.empty_like(x)
        for i in range(0, x.size(0), k):  # d/dx log softmax(x)[t] = onehot(t) - softmax(x)
            gi = -F.softmax(x[i:i + k].float(), -1) * g[i:i + k]
            grad[i:i + k] = gi.scatter_add_(-1, tok[i:i + k], g[i:i + k]).to(grad.dtype)
        return grad, None, None


def token_logprobs(logits, tokens, chunk_size=0):
    """log softmax(logits) at the given tokens: logits [B, T, V], tokens [B, T] -> [B, T] fp32,
    differentiable in logits, computed a chunk of positions at a time (see chunk_rows)."""
    return _TokenLogprobs.apply(logits, tokens, chunk_size)


HAND_DERIVED = ("fkl", "rkl", "jsd")  # the names _divergence_and_grad differentiates by hand


def top_k_bins(log_ps, log_pt, k):
    """(log_ps, log_pt) [N, V] -> both over the same [N, K+1] bins: the teacher's K most probable tokens,
    then one bucket for the rest of the vocabulary (the log of its mass). A divergence over the bins needs
    from the teacher only its top-K log-probabilities and their ids (the bucket is 1 minus their sum). K >= V:
    the vocabulary in the teacher's order, no bucket (it would be empty)."""
    top, idx = log_pt.topk(min(k, log_pt.size(-1)), -1)
    s_top = log_ps.gather(-1, idx)
    if k >= log_pt.size(-1):
        return s_top, top
    # the rest's mass as a logsumexp over it, not log1p(-sum of the top K): exact where the top K hold
    # nearly everything, and a 0 < tail however small (1 - sum in fp32 is 0 or negative below ~1e-7)
    rest = lambda lp: lp.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([s_top, rest(log_ps)], -1), torch.cat([top, rest(log_pt)], -1)


def _autograd_divergence_and_grad(f, s, log_pt, beta, temperature, grad, top_k=None):
    """_divergence_and_grad by autograd through the registered function f (over top_k_bins when top_k),
    on one chunk: the graph lives only inside this call. Where p_S = p_T exactly (the divergence's minimum)
    the value and gradient are set to exactly 0, as the hand-derived ones are: round-off there would become
    a full Adam step."""
    # backward of an autograd.Function runs without grad mode; a forward needs no graph
    with torch.enable_grad() if grad else torch.no_grad():
        x = s.detach().requires_grad_(grad)
        log_ps = F.log_softmax(x / temperature, -1)
        if top_k:
            log_ps, log_pt = top_k_bins(log_ps, log_pt, top_k)
        val = f(log_ps, log_pt, beta)
        g = torch.autograd.grad(val.sum(), x)[0] if grad else None
    same = (log_ps == log_pt).all(-1)
    return val.detach().masked_fill(same, 0), g.masked_fill(same[:, None], 0) if grad else None


def _divergence_and_grad(s_logits, t_logits, loss, beta, temperature, grad=True, top_k=None):
    """Per-position divergence [N] and its gradient w.r.t. the student logits [N, V] (None when not
    grad: a forward that recomputes it in backward need not form it): analytic for HAND_DERIVED, by
    autograd for any other registered divergence and for every one over the teacher's top_k (top_k_bins).

    Identical inputs give exactly 0 and an exactly-0 gradient (no round-off that Adam would amplify into a
    real step): the analytic formulas are written so, the autograd path masks those rows."""
    if loss not in DIVERGENCES:
        raise ValueError(f"unknown loss {loss!r} (choose from {', '.join(DIVERGENCES)})")
    dt = torch.promote_types(s_logits.dtype, torch.float32)
    log_pt = F.log_softmax(t_logits.to(dt) / temperature, -1)
    if top_k or loss not in HAND_DERIVED:
        return _autograd_divergence_and_grad(DIVERGENCES[loss], s_logits.to(dt), log_pt, beta, temperature, grad,
                                             top_k)
    log_ps = F.log_softmax(s_logits.to(dt) / temperature, -1)
    ps = log_ps.exp()
    if loss == "fkl":
        pt = log_pt.exp()
        return (pt * (log_pt - log_ps)).sum(-1), (ps - pt) / temperature if grad else None
    if loss == "rkl":
        d = log_ps - log_pt
        val = (ps * d).sum(-1)
        return val, ps * (d - val[:, None]) / temperature if grad else None
    if loss == "jsd":
        _need_beta(0 < beta < 1, "jsd", beta, "(0, 1)")
        # log m - log p_S with m = beta p_T + (1-beta) p_S, stable for any gap d = log p_T - log p_S:
        # log1p(beta expm1(d)) when d <= 0, else d + log(beta + (1-beta) e^-d)
        d = log_pt - log_ps
        lm_s = torch.where(d <= 0, torch.log1p(beta * torch.expm1(d.clamp(max=0))),
                           d.clamp(min=0) + torch.log(beta + (1 - beta) * torch.exp(-d.clamp(min=0))))
        lm_t = lm_s - d  # log m - log p_T
        val = -beta * (log_pt.exp() * lm_t).sum(-1) - (1 - beta) * (ps * lm_s).sum(-1)
        if not grad:
            return val, None
        g = -(1 - beta) * lm_s  # dJ/dp_S (the terms through m cancel), then through the softmax
        return val, ps * (g - (ps * g).sum(-1, keepdim=True)) / temperature


_compiled = {}


def chunk_divergence(loss, top_k=None, compile=False):
    """The function a chunked path calls on each chunk: _divergence_and_grad, or with compile (train.py
    --compile) and a hand-derived divergence over the vocabulary, the same compiled by inductor with
    dynamic shapes (one compile for every chunk length): its dozen passes over the chunk's [positions, V]
    become a few fused loops. Measured at vocabulary 49,152 on the CPU: jsd 4.3x, rkl and fkl 2.5x faster."""
    if not compile or top_k or loss not in HAND_DERIVED:
        return _divergence_and_grad  # the autograd path's torch.autograd.grad does not compile
    if "f" not in _compiled:
        _compiled["f"] = torch.compile(_divergence_and_grad, dynamic=True)
    return _compiled["f"]


class _Divergence(torch.autograd.Function):
    """Sum over positions of the divergence, with the gradient (_divergence_and_grad) for the student
    logits only (the teacher's logits are constants)."""

    @staticmethod
    def forward(ctx, s_logits, t_logits, loss, beta, temperature):
        val, grad = _divergence_and_grad(s_logits.detach(), t_logits.detach(), loss, beta, temperature)
        ctx.save_for_backward(grad.to(s_logits.dtype))
        return val.sum()

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None, None, None


class _MaskedDivergence(torch.autograd.Function):
    """Sum of the divergence over the positions `rows` of the flattened logits, a chunk of positions at a
    time; backward recomputes each chunk's gradient into the student logits' gradient, so no
    [positions, V] copy or gradient is kept between forward and backward."""

    @staticmethod
    def forward(ctx, s_logits, t_logits, where, loss, beta, temperature, step, top_k=None):
        s, t = s_logits.detach(), t_logits.detach()
        total = s.new_zeros((), dtype=torch.promote_types(s.dtype, torch.float32))
        for i in range(0, where.size(0), step):
            r = tuple(where[i:i + step].unbind(1))  # the chunk's positions, in row-major order
            total = total + _divergence_and_grad(s[r], t[r], loss, beta, temperature, False, top_k)[0].sum()
        ctx.save_for_backward(s_logits, t_logits, where)
        ctx.args = loss, beta, temperature, step, top_k
        return total

    @staticmethod
    def backward(ctx, grad_out):
        s_logits, t_logits, where = ctx.saved_tensors
        loss, beta, temperature, step, top_k = ctx.args
        s, t = s_logits.detach(), t_logits.detach()
        grad = torch.zeros_like(s)
        for i in range(0, where.size(0), step):
            r = tuple(where[i:i + step].unbind(1))
            g = _divergence_and_grad(s[r], t[r], loss, beta, temperature, True, top_k)[1]
            grad[r] = g.to(grad.dtype) * grad_out
        return grad, None, None, None, None, None, None, None


def per_token_divergence(s_logits, t_logits, loss, beta=0.5, temperature=1.0, top_k=None):
    """[N, V] student and teacher logits -> [N] divergence per position (no gradient)."""
    return _divergence_and_grad(s_logits.detach(), t_logits.detach(), loss, beta, temperature, False, top_k)[0]


def divergence_sum(s_logits, t_logits, mask, loss, beta=0.5, temperature=1.0, chunk_size=0, top_k=None):
    """Sum over masked positions of the per-position divergence, no gradient, a chunk at a time (for
    metrics such as the student's reverse KL on its own samples)."""
    with torch.no_grad():
        return _MaskedDivergence.apply(s_logits, t_logits, mask.nonzero(), loss, beta, temperature,
                                       chunk_rows(chunk_size, s_logits.size(-1)), top_k)


def divergence_loss(s_logits, t_logits, mask, loss, n_tokens, beta=0.5, temperature=1.0, chunk_size=0, top_k=None):
    """Sum of the per-token divergence over masked positions / n_tokens, differentiable in s_logits.

    s_logits, t_logits: [..., V]; mask: [...] bool. Only the masked positions are computed, a chunk of
    positions at a time (chunk_size, or 0: see chunk_rows), so the softmax intermediates of one chunk are
    alive at a time and nothing of size [positions, V] is kept for backward. top_k: the divergence over the
    teacher's top-K tokens and a bucket for the rest (top_k_bins); None: over the vocabulary."""
    step = chunk_rows(chunk_size, s_logits.size(-1))
    return _MaskedDivergence.apply(s_logits, t_logits, mask.nonzero(), loss, beta, temperature, step,
                                   top_k) / n_tokens


# ------------------------------------------------------------------- the output head fused with the loss
# The same losses from each model's final hidden states h [positions, d] and head weight W [V, d]: the logits
# h W^T exist one chunk of positions at a time (a divergence forms its gradients in the same pass; token
# log-probabilities, whose gradient weights are known only in backward, recompute them there), so neither
# model ever holds [positions, V] logits, their log-softmax or their gradient (Liger / cut-cross-entropy,
# in plain PyTorch). The student's part runs inside its forward (GPT.forward's head=), where FSDP holds W.

def _logits(h, w):
    return F.linear(h, w.to(h.dtype)).float()  # the matmul in the hidden states' dtype, as the head; loss in fp32


def _add_matmul(gw, a, b):
    """gw += a @ b (the head weight's fp32 gradient): in place, with no [V, d] temporary, where the dtypes agree."""
    if a.dtype == gw.dtype:
        gw.addmm_(a, b)
    else:
        gw += (a @ b).float()


class _HeadTokenLogprobs(torch.autograd.Function):
    """log softmax(h W^T)[token] per position, a chunk at a time; backward recomputes each chunk's softmax."""

    @staticmethod
    def forward(ctx, h, w, tokens, step):
        out = torch.empty(tokens.shape, dtype=torch.float32, device=h.device)
        for i in range(0, len(tokens), step):
            lp = F.log_softmax(_logits(h[i:i + step], w), -1)
            out[i:i + step] = lp.gather(-1, tokens[i:i + step, None]).squeeze(-1)
        ctx.save_for_backward(h, w, tokens)
        ctx.step = step
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, w, tokens = ctx.saved_tensors
        gh, gw = torch.empty_like(h), torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for i in range(0, len(tokens), ctx.step):
            g = grad_out[i:i + ctx.step, None]  # d/dlogits log softmax[t] = onehot(t) - softmax
            gl = (-F.softmax(_logits(h[i:i + ctx.step], w), -1) * g).scatter_add_(-1, tokens[i:i + ctx.step, None], g)
            gl = gl.to(h.dtype)
            torch.mm(gl, w.to(h.dtype), out=gh[i:i + ctx.step])
            _add_matmul(gw, gl.T, h[i:i + ctx.step])
        return gh, gw.to(w.dtype), None, None


def head_token_logprobs(h, w, tokens, mask, chunk_size=0):
    """log softmax(h W^T) at the given tokens on the masked positions: h [B, T, d], W [V, d], tokens and
    mask [B, T] -> [B, T] fp32 (0 off the mask), differentiable in h and W; = token_logprobs(h W^T, tokens)."""
    vals = _HeadTokenLogprobs.apply(h[mask], w, tokens[mask], chunk_rows(chunk_size, w.size(0)))
    return vals.new_zeros(mask.shape).masked_scatter(mask, vals)


class _HeadDivergence(torch.autograd.Function):
    """Sum over positions of the divergence between softmax(h_s W_s^T) and softmax(h_t W_t^T), a chunk at a
    time, and (metric: a bool per position, or None) the sum of the reverse KL over the marked positions.

    When h_s or W_s needs a gradient, the forward forms it too: each chunk's softmax serves its value and its
    gradient, and only the gradients of h_s [positions, d] and W_s [V, d] outlive the chunk. The loss is a sum,
    so backward only scales them by grad_out: nothing is recomputed (the logits once per chunk, not twice), and
    W_s's gradient, the one large tensor, would exist at that point of backward anyway. Backward runs once."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, loss, beta, temperature, step, metric, top_k=None, compile=False):
        grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        div = chunk_divergence(loss, top_k, compile)
        total = h_s.new_zeros((), dtype=torch.float32)
        rkl = h_s.new_zeros((), dtype=torch.float32)
        if grad:
            gh, gw = torch.empty_like(h_s), torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device)
        for i in range(0, len(h_s), step):
            s, t = _logits(h_s[i:i + step], w_s), _logits(h_t[i:i + step], w_t)
            val, gl = div(s, t, loss, beta, temperature, grad, top_k)
            total = total + val.sum()
            if metric is not None:  # the logged reverse KL is the full-vocabulary one, whatever the loss
                m = metric[i:i + step]
                same = loss == "rkl" and temperature == 1 and not top_k
                rkl = rkl + (val if same else chunk_divergence("rkl", None, compile)(
                    s, t, "rkl", 0.5, 1.0, False)[0])[m].sum()
            if grad:
                gl = gl.to(h_s.dtype)
                torch.mm(gl, w_s.to(h_s.dtype), out=gh[i:i + step])
                _add_matmul(gw, gl.T, h_s[i:i + step])
        ctx.grads = (gh, gw.to(w_s.dtype)) if grad else None
        ctx.mark_non_differentiable(rkl)
        return total, rkl

    @staticmethod
    def backward(ctx, grad_out, _):
        if ctx.grads is None:
            raise RuntimeError("_HeadDivergence: backward runs once (its gradients were formed in forward)")
        gh, gw = ctx.grads
        ctx.grads = None  # freed as soon as autograd has them
        return gh.mul_(grad_out), gw.mul_(grad_out), None, None, None, None, None, None, None, None, None


def head_divergence_loss(h_s, w_s, h_t, w_t, mask, loss, n_tokens, beta=0.5, temperature=1.0, chunk_size=0,
                         metric=None, top_k=None, compile=False):
    """divergence_loss of the logits h_s W_s^T and h_t W_t^T, from the hidden states h [B, T, d] and head
    weights W [V, d], the logits one chunk of positions at a time; differentiable in h_s and W_s.
    Returns (the loss, the full-vocabulary reverse KL summed over the positions of mask & metric (0 when
    metric is None)). compile: each chunk's divergence compiled (chunk_divergence)."""
    on = metric[mask] if metric is not None else None
    total, rkl = _HeadDivergence.apply(h_s[mask], w_s, h_t[mask].detach(), w_t.detach(), loss, beta, temperature,
                                       chunk_rows(chunk_size, w_s.size(0)), on, top_k, compile)
    return total / n_tokens, rkl


def head_divergence_sum(h_s, w_s, h_t, w_t, mask, loss, beta=0.5, temperature=1.0, chunk_size=0, top_k=None):
    """divergence_sum from hidden states and head weights, no gradient."""
    with torch.no_grad():
        return _HeadDivergence.apply(h_s[mask], w_s, h_t[mask], w_t, loss, beta, temperature,
                                     chunk_rows(chunk_size, w_s.size(0)), None, top_k)[0]


def distill_advantage(t_logprobs, old_logprobs):
    """On-policy distillation as RL: the per-token advantage log p_T(x_t) - log p_old(x_t) (detached), the
    negative of the sampled reverse-KL estimate. A reward-based advantage would take its place in RL."""
    return (t_logprobs - old_logprobs).detach()


def reward_advantage(rewards, group_size, norm="mean"):
    """RL's advantage, one per row: rewards [B] of groups of group_size consecutive rows (one prompt's
    samples). mean: the reward minus its group's mean (a baseline that costs no critic); std: that over the
    group's std as well (GRPO; a group of equal rewards gets 0); none: the reward itself (REINFORCE)."""
    if norm == "none":
        return rewards
    g = rewards.view(-1, group_size)
    a = g - g.mean(1, keepdim=True)
    if norm == "std":
        a = a / (g.std(1, keepdim=True, correction=0) + 1e-6)
    return a.flatten()


def policy_gradient_loss(s_logprobs, old_logprobs, adv, mask, n_tokens):
    """-sum_t exp(log p_S(x_t) - log p_old(x_t)) * A_t over masked tokens / n_tokens: the importance-weighted
    policy gradient (ratio 1 at p_S = p_old, where its gradient is -A_t grad log p_S(x_t))."""
    ratio = torch.exp(s_logprobs - old_logprobs.detach())
    return -(ratio * adv * mask).sum() / n_tokens


def sampled_token_loss(s_logprobs, old_logprobs, t_logprobs, mask, n_tokens):
    """The sampled reverse-KL estimator: s_logprobs log p_S(x_t) with grad, old_logprobs at sampling time,
    t_logprobs log p_T(x_t)."""
    return policy_gradient_loss(s_logprobs, old_logprobs, distill_advantage(t_logprobs, old_logprobs), mask,
                                n_tokens)


# ------------------------------------------------------------------------------ the objective of each stage
# train.py picks one by --stage, once. Each runs as the head= of the student's forward (model.forward_from):
# from its final-normed hidden states h [B, N, d] where it predicts the N completion tokens and its head
# weight W, it returns (the loss: a sum over this rank's completion tokens / n_tokens of the whole step, the
# reverse KL summed over its own samples' tokens for the log, or None). run: train.Run (args, t_head).

def sft_objective(h, w, batch, n_tokens, run, t_h=None, reward_adv=None):
    """Cross-entropy of the given completions."""
    c = batch.prompt_len
    lp = head_token_logprobs(h, w, batch.tokens[:, c:], batch.mask[:, c:], run.args.chunk_size)
    return -lp.sum() / n_tokens, None


def rl_objective(h, w, batch, n_tokens, run, t_h=None, reward_adv=None):
    """The policy gradient of the sampled estimator with the verifier's reward advantage [B] on every token of
    a row in place of the teacher's log-ratio."""
    c = batch.prompt_len
    m = batch.mask[:, c:]
    s_lp = head_token_logprobs(h, w, batch.tokens[:, c:], m, run.args.chunk_size)
    return policy_gradient_loss(s_lp, batch.logprobs[:, c:], reward_adv[:, None], m, n_tokens), None


def distill_objective(h, w, batch, n_tokens, run, t_h=None, reward_adv=None):
    """The divergence to the teacher (its hidden states t_h, head weight run.t_head) over the full
    vocabularies (--teacher-top-k: over the teacher's top K and a bucket for the rest), or the sampled
    estimator (a policy gradient with the teacher's log-ratio as advantage and the rollout's logprobs as
    p_old, plus --reward-weight x the rows' reward advantage when given; the teacher gives only log p_T of
    the sampled tokens, and the logged reverse KL is its one-sample estimate).
    --sft-mix: the off-policy rows (another task's ground truth) learn by cross-entropy instead."""
    args, c = run.args, batch.prompt_len
    tgt, m, on = batch.tokens[:, c:], batch.mask[:, c:], batch.on_policy[:, None]
    ce = 0.0
    if args.sft_mix:
        ce = -head_token_logprobs(h, w, tgt, m & ~on, args.chunk_size).sum() / n_tokens
        m = m & on
    if args.loss == "sampled":
        s_lp, old_lp = head_token_logprobs(h, w, tgt, m, args.chunk_size), batch.logprobs[:, c:]
        with torch.no_grad():
            t_lp = head_token_logprobs(t_h, run.t_head, tgt, m, args.chunk_size)
        adv = distill_advantage(t_lp, old_lp)
        if reward_adv is not None:
            adv = adv + args.reward_weight * reward_adv[:, None]
        return policy_gradient_loss(s_lp, old_lp, adv, m, n_tokens), ((old_lp - t_lp) * (m & on)).sum()
    loss, rkl = head_divergence_loss(h, w, t_h, run.t_head, m, args.loss, n_tokens, args.beta, args.loss_temperature,
                                     args.chunk_size, metric=on.expand_as(m), top_k=args.teacher_top_k,
                                     compile=args.compile)
    return loss + ce, rkl


OBJECTIVES = {"sft": sft_objective, "rl": rl_objective, "distill": distill_objective}


def gather_rows(x, rank, world):
    """The step's rows of x gathered from every rank (rank r holds global rows r::world)."""
    full = torch.zeros(len(x) * world, device=x.device)
    full[rank::world] = x
    if world > 1:
        torch.distributed.all_reduce(full)
    return full


def step_reward_advantage(reward, group_size, norm, rank, world):
    """This rank's rows' reward_advantage. A prompt's samples are consecutive global rows, so the step's
    rewards are gathered from every rank first."""
    return reward_advantage(gather_rows(reward, rank, world), group_size, norm)[rank::world]


def group_success(reward, on_policy, group_size, rank, world):
    """The share of the step's sampled prompts with at least one solved sample among their group_size: a group
    that fails in every sample has zero reward advantage, so this is the share RL can learn from."""
    solved = gather_rows(reward, rank, world).view(-1, group_size).amax(1) > 0
    sampled = gather_rows(on_policy.float(), rank, world).view(-1, group_size)[:, 0] > 0
    return solved[sampled].float().mean().item() if sampled.any() else None


def add_loss_args(p):
    """train.py's loss flags (their checks: check_loss_args)."""
    g = p.add_argument_group("the loss")
    g.add_argument("--loss", default="rkl", choices=LOSSES)
    g.add_argument("--beta", type=float, default=0.5, help="the divergence's weight: jsd's beta in (0, 1), the skew "
                   "KLs' mix in [0, 1) (DistiLLM uses 0.1), fkl_rkl's weight of fkl in [0, 1]")
    g.add_argument("--loss-temperature", type=float, default=1.0, help="softmax temperature inside the divergence")
    g.add_argument("--cross-tokenizer", default="auto", choices=["auto", "on", "off"],
                   help="span-aligned losses for a teacher with another tokenizer (auto: when the vocabularies "
                   "differ; off: refuse such a teacher)")
    g.add_argument("--uld-weight", type=float, default=1.0, help="cross-tokenizer fkl/rkl/jsd: weight of the ULD "
                   "term on the tokens the two vocabularies do not share")
    g.add_argument("--adv-norm", default="mean", choices=["mean", "std", "none"], help="the reward's advantage: "
                   "mean = reward - its prompt's group mean; std = that / the group std (GRPO); none = the reward")
    g.add_argument("--reward-weight", type=float, default=0.0, help="distill with --loss sampled: advantage = "
                   "log p_T - log p_S + this * the reward's advantage (distillation plus reward)")
    g.add_argument("--teacher-top-k", type=int, default=None, metavar="K", help="the divergence over the teacher's "
                   "K most probable tokens and one bucket for the rest, as a remote teacher can send them (default: "
                   "the whole vocabulary; K >= vocabulary is the whole vocabulary too)")
    g.add_argument("--chunk-size", type=int, default=0, help="positions per chunk in the losses and metrics "
                   "(0 = as many as fit 2^22 logits: one chunk for the char vocabulary)")


def check_loss_args(args):
    """Refuse (ValueError, one line) train.py loss flags that contradict each other or would be ignored."""
    rl = args.stage == "rl"
    if args.loss == "sampled" and args.stage == "distill" and args.lmbda != 1:
        raise ValueError("--loss sampled needs --lmbda 1: its p_old is the distribution the student sampled from, "
                         "and off-policy rows were not sampled by the student")
    if args.loss != "sampled":
        try:
            check_divergence(args.loss, args.beta)
        except ValueError as e:
            raise ValueError(f"--loss {args.loss} --beta {args.beta}: {e}")
    if args.teacher_top_k is not None:
        if args.teacher_top_k < 1:
            raise ValueError(f"--teacher-top-k must be >= 1, got {args.teacher_top_k}")
        if args.stage != "distill" or args.loss == "sampled":
            raise ValueError("--teacher-top-k applies to a divergence over the vocabulary (--stage distill, --loss "
                             "not sampled); --loss sampled already reads only the teacher's logprob of the sampled "
                             "token")
    if args.loss_temperature <= 0:
        raise ValueError(f"--loss-temperature must be > 0, got {args.loss_temperature}")
    if args.loss_temperature != 1 and (args.loss == "sampled" or args.stage != "distill"):
        raise ValueError("--loss-temperature applies to a divergence over the vocabulary (--stage distill, --loss "
                         "not sampled); here it would be ignored")
    if (args.loss == "sampled" or rl) and (args.temperature != 1 or args.top_k):
        raise ValueError(f"--{'stage rl' if rl else 'loss sampled'} needs the student's own distribution: "
                         "--temperature 1 and no --top-k")
    if args.reward_weight < 0:
        raise ValueError(f"--reward-weight must be >= 0, got {args.reward_weight}")
    if args.reward_weight and (args.stage != "distill" or args.loss != "sampled"):
        raise ValueError("--reward-weight needs --stage distill --loss sampled: it adds to that loss's per-token "
                         "advantage")
    if (rl or args.reward_weight) and args.adv_norm != "none" and args.samples_per_prompt < 2:
        raise ValueError(f"--adv-norm {args.adv_norm} compares a prompt's samples: it needs --samples-per-prompt "
                         ">= 2 (or --adv-norm none)")

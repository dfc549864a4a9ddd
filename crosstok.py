"""Distilling from a teacher with another tokenizer: align the two tokenizations into spans, score the same
text in the teacher's tokens, and train on the spans.

1. align_completion: a student completion is decoded to text, re-tokenized by the teacher, and cut into
   spans that end where both tokenizations have a boundary. Both models condition on the same text before
   every span, so each side's span log-probability (the sum of its token logprobs in the span) is exact.
2. cross_tokenizer_batch: the teacher's view of a student batch (its prompts, the same completion texts in
   its tokens), packed so teacher.score scores it in one forward, with the span ids of both sides.
3. The losses (cross_tokenizer_loss):
     span_policy_gradient  the sampled estimator with one advantage per span,
                           A_k = log p_T(span k) - log p_old(span k), on every student token of span k:
                           the per-span (discount-0) policy gradient. Its value summed over spans
                           estimates the sequence-level reverse KL; its gradient credits each span with its
                           own log-ratio only, dropping the later spans' terms of the sequence-level gradient.
     hybrid_uld            on spans of one token on each side: a divergence over the token strings both
                           vocabularies share plus ULD (sorted-probability L1) on the rest, the GOLD hybrid.
With identical tokenizers every span is one token and both equal the same-tokenizer losses (tested).
"""
import bisect
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data.countdown import CharFormat
from losses import _Divergence, distill_advantage, policy_gradient_loss, token_logprobs
from rollout import Batch, pack

# ------------------------------------------------------------------------------------------- alignment

def _special_names(tok):
    """{id: name} of the tokenizer's special tokens ([PAD] [BOS] [EOS] [UNK] here)."""
    return {i: t.content for i, t in tok.get_added_tokens_decoder().items() if t.special}


def _short(text, n=40):
    return repr(text) if len(text) <= n else repr(text[:n]) + "..."


def _align_text(ids, s_tok, t_tok, t_special):
    """One run of ordinary (non-special) student tokens -> (teacher ids, student span ids, teacher span ids,
    number of spans), span ids counted from 0 within the run. See align_completion."""
    pieces = [s_tok.id_to_token(i) for i in ids]
    if any(not p for p in pieces):
        bad = [i for i, p in zip(ids, pieces) if not p]
        raise ValueError(f"student token id(s) {bad[:3]} have no string in the student vocabulary")
    text = "".join(pieces)
    decoded = s_tok.decode(ids, skip_special_tokens=False)
    if decoded != text:
        raise ValueError(f"student tokens do not round-trip: their strings join to {_short(text)} "
                         f"but decode to {_short(decoded)}")
    enc = t_tok.encode(text, add_special_tokens=False)
    end = 0
    for i, (a, b) in zip(enc.ids, enc.offsets):
        if i in t_special:
            raise ValueError(f"teacher tokenizer maps {text[a:b]!r} (characters {a}:{b} of {_short(text)}) "
                             f"to {t_special[i]}: the teacher cannot score this text")
        if a != end or t_tok.id_to_token(i) != text[a:b]:
            raise ValueError(f"teacher tokens do not reproduce {_short(text)}: token {t_tok.id_to_token(i)!r} "
                             f"at characters {a}:{b} (expected to start at {end})")
        end = b
    if end != len(text):
        raise ValueError(f"teacher tokens cover {end} of the {len(text)} characters of {_short(text)}")
    # token boundaries (end offsets) of both sides; spans end where both have one
    s_ends = list(itertools.accumulate(len(p) for p in pieces))
    common = sorted(set(s_ends) & {b for _, b in enc.offsets})  # always holds len(text)
    # a token starting at character c lies in span #(common boundaries <= c)
    s_span = [bisect.bisect_right(common, e - len(p)) for e, p in zip(s_ends, pieces)]
    t_span = [bisect.bisect_right(common, a) for a, _ in enc.offsets]
    return list(enc.ids), s_span, t_span, len(common)


def align_completion(s_ids, s_tok, t_tok):
    """Align one student completion with the teacher's tokenization of the same text.

    s_ids: the student's completion ids (up to and including the first EOS; a truncated row has none).
    Returns (t_ids, s_span, t_span, n_spans): the teacher's ids for the same text, the span id of every
    student token and of every teacher token (0, 1, ... in order), and the number of spans.

    The text is the concatenation of the student's token strings (id_to_token: tokens are plain strings
    here). A span is a minimal piece of text that both tokenizations cut at its two ends: span k covers
    the characters between the k-th and (k+1)-th character offsets where both sides have a token boundary.
    Both models therefore condition on exactly the same text before every span, and
        log p_S(span text | prefix) = sum of the student's token logprobs in the span,
        log p_T(span text | prefix) = sum of the teacher's token logprobs in the span,
    exactly, whatever the two tokenizations inside the span.
    Special tokens are not text: [EOS] (and [PAD] / [BOS] / [UNK], should a sampler emit them) maps to the
    teacher's special token of the same name and is its own one-to-one span.

    Raises ValueError (one line) instead of ever misaligning, when: the student's token strings do not
    decode to their concatenation; the teacher maps part of the text to [UNK] or another special token,
    or its tokens do not reproduce the text exactly; a student special token has no teacher counterpart."""
    s_special = _special_names(s_tok)
    t_special = _special_names(t_tok)
    t_by_name = {name: i for i, name in t_special.items()}
    t_ids, s_span, t_span, n = [], [], [], 0
    start = 0
    for k in range(len(s_ids) + 1):
        if k < len(s_ids) and s_ids[k] not in s_special:
            continue
        if k > start:  # the run of ordinary tokens s_ids[start:k]
            ids, ss, ts, m = _align_text(s_ids[start:k], s_tok, t_tok, t_special)
            t_ids += ids
            s_span += [n + x for x in ss]
            t_span += [n + x for x in ts]
            n += m
        if k < len(s_ids):  # a special token: its own one-to-one span
            name = s_special[s_ids[k]]
            if name not in t_by_name:
                raise ValueError(f"student special token {name} has no counterpart in the teacher's vocabulary")
            t_ids.append(t_by_name[name])
            s_span.append(n)
            t_span.append(n)
            n += 1
        start = k + 1
    return t_ids, s_span, t_span, n


# ------------------------------------------------------------------------- the teacher's view of a batch

@dataclass
class CrossBatch:
    """The teacher's view of a student batch and the span alignment between the two.

    Span-id tensors are in the shifted coordinates of `score` / `token_logprobs`: column t of a
    [B, T-1] array is about token t+1 of the batch."""
    teacher: Batch            # same prompts and completion texts in teacher tokens, rollout.pack layout
    s_span: torch.Tensor      # [B, T_S-1] long: span id of each student completion token, -1 elsewhere
    t_span: torch.Tensor      # [B, T_T-1] long: span id of each teacher completion token, -1 elsewhere
    n_spans: int              # S: the most spans in a row; per-span tensors are [B, S]
    span_valid: torch.Tensor  # [B, S] bool: spans that exist in the row
    one_to_one: torch.Tensor  # [B, T_S-1] bool: student tokens whose span is one token on each side
    pairs: tuple              # (rows, s_cols, t_cols) [M] long, row-major: the one-to-one spans, as
                              # s_logits[rows, s_cols] and t_logits[rows, t_cols] (score coordinates)


def cross_tokenizer_batch(batch, problems, s_tok, t_tok, max_len=None, t_format=None):
    """Re-tokenize a student batch for the teacher and align the two (see align_completion).

    batch: the student's rollout.Batch (prompt + completions, the layout train.py trains on).
    problems: the rows' problems, (numbers, target, ...) per row, in batch order: the teacher's prompts are
    t_format.prompt_ids(numbers, target) (the teacher's Countdown format, data.countdown.countdown_format;
    default: the char format of t_tok), its completions the student's completion texts in teacher tokens.
    max_len: the teacher's context (cfg.max_seq_len); a longer teacher batch is a ValueError, not a crash
    in its forward (a finer teacher tokenizer turns N student tokens into up to N * 3 teacher tokens here).
    Raises ValueError if a row does not round-trip (see align_completion)."""
    if len(problems) != batch.tokens.size(0):
        raise ValueError(f"{len(problems)} problems for a batch of {batch.tokens.size(0)} rows")
    t_format = t_format or CharFormat(t_tok)
    rows = [align_completion(c, s_tok, t_tok) for c in batch.completions()]
    device = batch.tokens.device
    tb = pack([t_format.prompt_ids(p[0], p[1]) for p in problems], [r[0] for r in rows], t_format.pad_id, device)
    if max_len is not None and tb.tokens.size(1) > max_len:
        raise ValueError(f"teacher batch is {tb.tokens.size(1)} tokens long, over the teacher's context of "
                         f"{max_len}: lower --max-new-tokens")
    # span ids at the completion positions, row-major: the masks select exactly the completion tokens
    s_span = torch.full_like(batch.tokens[:, 1:], -1)
    t_span = torch.full_like(tb.tokens[:, 1:], -1)
    s_span[batch.mask[:, 1:]] = torch.tensor([x for r in rows for x in r[1]], dtype=torch.long, device=device)
    t_span[tb.mask[:, 1:]] = torch.tensor([x for r in rows for x in r[2]], dtype=torch.long, device=device)
    n = torch.tensor([r[3] for r in rows], dtype=torch.long, device=device)
    S = int(n.max()) if len(rows) else 0
    # tokens per span on each side; one-to-one spans have one of each
    n_s = span_sum(torch.ones_like(s_span, dtype=torch.float32), s_span, S)
    n_t = span_sum(torch.ones_like(t_span, dtype=torch.float32), t_span, S)
    o2o = (n_s == 1) & (n_t == 1)
    s_o2o = (s_span >= 0) & o2o.gather(1, s_span.clamp(min=0))
    t_o2o = (t_span >= 0) & o2o.gather(1, t_span.clamp(min=0))
    (rs, sc), (rt, tc) = s_o2o.nonzero(as_tuple=True), t_o2o.nonzero(as_tuple=True)
    assert torch.equal(rs, rt)  # both sides list the same spans in the same (row, span) order
    return CrossBatch(teacher=tb, s_span=s_span, t_span=t_span, n_spans=S,
                      span_valid=torch.arange(S, device=device)[None, :] < n[:, None],
                      one_to_one=s_o2o, pairs=(rs, sc, tc))


def span_logprobs(s_logprobs, t_logprobs, cb):
    """Per-span log-probabilities of the span texts, [B, S] each (0 on spans that do not exist).

    s_logprobs [B, T_S-1]: the student's token logprobs (token_logprobs(s_logits, batch.tokens[:, 1:]));
    differentiable, the span sums are too. t_logprobs [B, T_T-1]: the teacher's, on cb.teacher."""
    return span_sum(s_logprobs, cb.s_span, cb.n_spans), span_sum(t_logprobs, cb.t_span, cb.n_spans)


def shared_vocab(s_tok, t_tok, device=None):
    """(student ids, teacher ids) [K] long of the token strings both vocabularies hold (specials by name),
    in student-id order. With identical tokenizers both are arange(V)."""
    tv = t_tok.get_vocab()
    both = sorted((i, tv[s]) for s, i in s_tok.get_vocab().items() if s in tv)
    return (torch.tensor([a for a, _ in both], dtype=torch.long, device=device),
            torch.tensor([b for _, b in both], dtype=torch.long, device=device))


def span_sum(values, span, n_spans):
    """Sum of `values` over each span: values [B, T], span [B, T] long (span id, -1 = in no span) ->
    [B, n_spans]. A scatter_add, so differentiable in `values`; a one-token span is that value exactly."""
    idx = torch.where(span >= 0, span, n_spans)  # column n_spans collects the rest and is dropped
    out = values.new_zeros(values.size(0), n_spans + 1).scatter_add(1, idx, values)
    return out[:, :n_spans]


# ------------------------------------------------------------------------------------------------ losses

def span_policy_gradient_loss(s_logprobs, old_logprobs, t_span_logprobs, s_span, n_tokens, mask=None):
    """The per-span (discount-0) policy gradient: the sampled estimator with one advantage per span.

        A_k   = log p_T(span k) - log p_old(span k)      (detached; span log-probs are sums over its tokens)
        loss  = -sum_t exp(log p_S(x_t) - log p_old(x_t)) * A_{span(t)} / n_tokens

    s_logprobs [B, T] student token logprobs (with grad), old_logprobs [B, T] at sampling time,
    t_span_logprobs [B, S] the teacher's span logprobs (span_logprobs), s_span [B, T] span ids (-1 off the
    completion), mask [B, T] optional: only these tokens (e.g. ~one_to_one when the one-to-one spans go to
    hybrid_uld_loss). At p_S = p_old the gradient is sum_k A_k grad log p_S(span k): each span is credited
    with its own log-ratio only. The sequence-level reverse-KL gradient would credit span k with the
    log-ratios of span k and of every later span; this estimator drops those later terms (as the per-token
    `sampled` loss does for tokens). With identical tokenizers every span is one token and this is
    losses.sampled_token_loss, bit for bit."""
    adv = distill_advantage(t_span_logprobs, span_sum(old_logprobs, s_span, t_span_logprobs.size(1)))
    adv = adv.gather(1, s_span.clamp(min=0))
    keep = s_span >= 0 if mask is None else mask & (s_span >= 0)
    return policy_gradient_loss(s_logprobs, old_logprobs, adv, keep, n_tokens)


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
    (CrossBatch.pairs). shared_s, shared_t [K]: ids of the token strings both vocabularies hold
    (shared_vocab). Per position:

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


def cross_tokenizer_loss(s_logits, t_logits, batch, cb, shared, n_tokens, loss, beta=0.5, temperature=1.0,
                         uld_weight=1.0, chunk_size=0):
    """The loss across tokenizers, on a batch that cross_tokenizer_batch aligned into spans (cb).

    s_logits [B, T_S-1, V_S] predict batch.tokens[:, 1:]; t_logits [B, T_T-1, V_T] predict cb.teacher's
    tokens (teacher.score). loss "sampled": the per-span policy gradient on every completion token. fkl / rkl
    / jsd: on spans of one token on each side, the divergence over the shared vocabulary + ULD on the rest
    (hybrid_uld_loss); on the other spans, which have no token-level distribution to compare, the per-span
    policy gradient. The policy gradient needs the distribution the tokens were sampled from: it runs on
    the on-policy rows only, with p_old their rollout logprobs (batch.logprobs). Returns (loss, student
    span logprobs, teacher span logprobs), both [B, S] and detached."""
    s_lp = token_logprobs(s_logits, batch.tokens[:, 1:])
    old_lp = batch.logprobs[:, 1:]
    t_lp = token_logprobs(t_logits, cb.teacher.tokens[:, 1:])
    s_span_lp, t_span_lp = span_logprobs(s_lp, t_lp, cb)
    sampled_rows = batch.on_policy[:, None].expand_as(cb.s_span)
    if loss == "sampled":
        out = span_policy_gradient_loss(s_lp, old_lp, t_span_lp, cb.s_span, n_tokens, mask=sampled_rows)
    else:
        rows, s_cols, t_cols = cb.pairs
        out = span_policy_gradient_loss(s_lp, old_lp, t_span_lp, cb.s_span, n_tokens,
                                        mask=sampled_rows & ~cb.one_to_one)
        if rows.numel():
            out = out + hybrid_uld_loss(s_logits[rows, s_cols], t_logits[rows, t_cols], *shared, n_tokens, loss,
                                        beta, temperature, uld_weight, chunk_size)
    return out, s_span_lp.detach(), t_span_lp


def cross_distill_loss(s_logits, t_logits, batch, cb, shared, n_tokens, args):
    """train.py's distillation loss across tokenizers (cross_tokenizer_loss with the run's flags), and the
    student's reverse KL on its own samples for the log: its sequence-level sample estimate."""
    loss, s_span_lp, t_span_lp = cross_tokenizer_loss(s_logits, t_logits, batch, cb, shared, n_tokens, args.loss,
                                                      args.beta, args.loss_temperature, args.uld_weight,
                                                      args.chunk_size)
    return loss, (s_span_lp - t_span_lp)[batch.on_policy].sum()

"""The frozen teacher: load it, check it speaks the student's tokenizer, and score sequences.

The teacher never trains: eval mode, requires_grad off, no optimizer state, every call under no_grad.
One forward pass scores a whole batch (prompt + completion) in the shared layout of rollout.Batch, with
the same positions the student used when sampling (two when rows share prompts: each distinct prompt
once, then the completions over its cached keys and values; see score).

Across tokenizers (student and teacher vocabularies differ), the student's completions are decoded to
text, re-tokenized by the teacher and aligned into spans (see align_completion); cross_tokenizer_batch
packs the teacher's view of the batch so the same `score` scores it in one forward pass.
"""
import bisect
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data.countdown import PAD, prompt_ids
from losses import span_sum
from model import distinct_rows, load_pretrained, load_tokenizer_for, prefill, resolve_checkpoint
from rollout import Batch, pack


def load_teacher(path, device="cpu", default_tokenizer=None):
    """(model, tokenizer) of a frozen teacher checkpoint. Raises CheckpointError/ValueError with one line."""
    path = resolve_checkpoint(path)
    tok = load_tokenizer_for(path, default_tokenizer)
    model = load_pretrained(path, device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tok


def check_same_tokenizer(student_tok, teacher_tok):
    """Token-level losses compare distributions id by id: the vocabularies must be identical."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        diff = sorted(set(sv.items()) ^ set(tv.items()))[:3]
        raise ValueError(f"teacher and student tokenizers differ (vocab {len(tv)} vs {len(sv)}, e.g. {diff}); "
                         "same-tokenizer losses need identical vocabularies")


@torch.no_grad()
def score(teacher, batch, autocast=False, start=1, share_prompts=True):
    """Teacher logits (fp32) predicting tokens start..T-1: [B, T-start, V], row i scores
    batch.tokens[:, start + i]. start=batch.prompt_len scores only the completion region (all a
    same-tokenizer loss reads; the forward skips the rest where it can, see GPT.forward's out_from).

    There, when rows share a prompt (--samples-per-prompt > 1) and share_prompts is on, each distinct
    prompt runs once into a KV cache (model.prefill) and the completions run on their copies of it:
    the same logits up to float rounding, with the prompt's compute divided by the samples per prompt."""
    P, T = batch.prompt_len, batch.tokens.size(1)
    with torch.autocast(batch.tokens.device.type, torch.bfloat16, enabled=autocast):
        if start == P and share_prompts and P > 1:
            groups = distinct_rows(batch.tokens[:, :P], batch.valid[:, :P])
            if len(groups[0]) < len(batch.tokens):
                pos = batch.pos
                last, cache = prefill(teacher, batch.tokens[:, :P], pos[:, :P], batch.valid[:, :P], T, groups)
                rest = teacher(batch.tokens[:, P:], pos[:, P:], batch.valid[:, P:], cache)
                return torch.cat([last[:, None], rest[:, :-1]], 1).float()
        logits = teacher(batch.tokens, batch.pos, batch.valid, out_from=start - 1)
    return logits[:, :-1].float()


def token_logprobs(logits, tokens):
    """log softmax(logits) at the given tokens: logits [B, T, V], tokens [B, T] -> [B, T] fp32."""
    return F.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

# ------------------------------------------------------------------------------ cross-tokenizer alignment

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


def cross_tokenizer_batch(batch, problems, s_tok, t_tok, max_len=None):
    """Re-tokenize a student batch for the teacher and align the two (see align_completion).

    batch: the student's rollout.Batch (prompt + completions, the layout train.py trains on).
    problems: the rows' problems, (numbers, target, ...) per row, in batch order: the teacher's prompts are
    prompt_ids(t_tok, numbers, target), its completions the student's completion texts in teacher tokens.
    max_len: the teacher's context (cfg.max_seq_len); a longer teacher batch is a ValueError, not a crash
    in its forward (a finer teacher tokenizer turns N student tokens into up to N * 3 teacher tokens here).
    Raises ValueError if a row does not round-trip (see align_completion)."""
    if len(problems) != batch.tokens.size(0):
        raise ValueError(f"{len(problems)} problems for a batch of {batch.tokens.size(0)} rows")
    rows = [align_completion(c, s_tok, t_tok) for c in batch.completions()]
    device = batch.tokens.device
    tb = pack([prompt_ids(t_tok, p[0], p[1]) for p in problems], [r[0] for r in rows],
              t_tok.token_to_id(PAD), device)
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

"""KV-cached batched sampling, and the one batch layout every stage shares. The one-token decode step runs
eager or compiled over a static cache (--compile), and a teacher can correct the samples as they are drawn
(speculative KD, --rollout skd).

A batch is a left-padded block of prompts followed by a completion region:

    tokens  [B, P+N]   [pad pad BOS 3 _ 7 ... :][7 * 1 3 = 9 1 , ... EOS pad pad]
    valid   [B, P+N]   real tokens (False on left padding and after the first EOS)
    mask      [B, P+N]   completion tokens up to and including the first EOS (what losses train)
    logprobs  [B, P+N]   log p_student(token) at sampling time on the mask of on-policy rows, 0 elsewhere
    on_policy [B]        True for rows the student sampled, False for given ones (ground truth, teacher
                         samples): metrics and the sampled estimator select rows by it, never by position
    kept      [B, P+N]   speculative KD only: the completion tokens that are the student's own, kept by the
                         teacher (None otherwise)

Positions come from `valid` (model.positions_from_valid), so a row scores the same at any padding.
Rollouts and given completions are packed together into one batch by `pack`.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import StaticKVCache, distinct_rows, positions_from_valid, prefill


@dataclass
class Batch:
    tokens: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor
    prompt_len: int
    logprobs: torch.Tensor
    on_policy: torch.Tensor
    kept: torch.Tensor = None  # speculative KD rollouts: the student's proposals the teacher kept [B, P+N]

    @property
    def pos(self):
        return positions_from_valid(self.valid)

    def completions(self):
        """Completion token ids of each row (the masked ones: up to and including the first EOS), as lists."""
        out = []
        for row, m in zip(self.tokens[:, self.prompt_len:].tolist(), self.mask[:, self.prompt_len:].tolist()):
            out.append([t for t, keep in zip(row, m) if keep])
        return out

    def completion_logprobs(self):
        """The sampling-time logprobs of each row's completion tokens, as lists (aligned with completions)."""
        return self.completion_values(self.logprobs)

    def completion_values(self, t):
        """t [B, P+N] at each row's completion tokens, as lists (aligned with completions)."""
        out = []
        for row, m in zip(t[:, self.prompt_len:].tolist(), self.mask[:, self.prompt_len:].tolist()):
            out.append([x for x, keep in zip(row, m) if keep])
        return out


def left_pad(seqs, pad_id, device=None):
    """List of id lists -> (ids [B, P], valid [B, P]) aligned on the right."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    valid = torch.zeros(len(seqs), P, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        valid[i, P - len(s):] = True
    return ids.to(device), valid.to(device)


def pack(prompts, completions, pad_id, device=None, logprobs=None, on_policy=None, kept=None):
    """Prompts (id lists, left-padded) + completions (id lists up to and including EOS, right-padded).

    logprobs: per row, the sampling-time logprobs of its completion tokens (a list of floats), or None for
    a given row; on_policy: per row, whether the student sampled it (default: no row); kept: per row, which
    of its completion tokens were kept student proposals (speculative KD), or None."""
    ids, pvalid = left_pad(prompts, pad_id)
    B, N = len(prompts), max(len(c) for c in completions)
    comp = torch.full((B, N), pad_id, dtype=torch.long)
    cmask = torch.zeros(B, N, dtype=torch.bool)
    lps = torch.zeros(B, ids.size(1) + N)
    kmask = torch.zeros(B, ids.size(1) + N, dtype=torch.bool)
    P = ids.size(1)
    for i, c in enumerate(completions):
        comp[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        cmask[i, :len(c)] = True
        if logprobs is not None and logprobs[i] is not None:
            lps[i, P:P + len(c)] = torch.tensor(logprobs[i])
        if kept is not None and kept[i] is not None:
            kmask[i, P:P + len(c)] = torch.tensor(kept[i], dtype=torch.bool)
    flags = torch.tensor([False] * B if on_policy is None else list(on_policy), dtype=torch.bool)
    return Batch(tokens=torch.cat([ids, comp], 1).to(device), valid=torch.cat([pvalid, cmask], 1).to(device),
                 mask=torch.cat([torch.zeros_like(pvalid), cmask], 1).to(device), prompt_len=P,
                 logprobs=lps.to(device), on_policy=flags.to(device),
                 kept=kmask.to(device) if kept is not None else None)


def sample_token(logits, temperature, top_k=None, generator=None, noise=None):
    """logits [B, V] -> token ids [B]. temperature 0 is greedy (and ignores the generator).

    Sampling is Gumbel-max: argmax(logits / temperature + Gumbel noise) draws from
    softmax(logits / temperature) exactly. `noise` [B, V] is uniform(0, 1); when it is not given it is
    drawn from `generator`. Passing the noise lets a caller make a row's sample depend only on the row's
    own slice of one global draw, not on which other rows share its batch (see `generate`)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if noise is None:
        noise = torch.rand(logits.shape, generator=generator, device=logits.device)
    return (logits - torch.log(-torch.log(noise))).argmax(-1)


def decode_step(model, tok, pos, live, cache):
    """One token per row [B, 1] through the model, appended to the cache: the next-token logits [B, V]."""
    return model(tok, pos, live, cache)[:, -1]


_compiled, _static_caches = {}, {}


def compiled_decode_step(device_type):
    """decode_step compiled for fixed shapes (a StaticKVCache): inductor on CPU; on CUDA, CUDA graphs
    ("reduce-overhead"), so a step is one graph replay instead of a few hundred kernel launches. Compiled
    once per process and device type; a new batch size or cache length compiles again."""
    if device_type not in _compiled:
        mode = "reduce-overhead" if device_type == "cuda" else None
        _compiled[device_type] = torch.compile(decode_step, mode=mode, dynamic=False, fullgraph=True)
    return _compiled[device_type]


def static_cache(model, cache):
    """A prefilled KVCache copied into the StaticKVCache kept for this model and shape (allocated once, reused
    by every later rollout of that shape: the addresses CUDA graphs replay on)."""
    key = (id(model), tuple(cache.k.shape), cache.k.dtype, cache.k.device)
    if key not in _static_caches:
        _static_caches[key] = StaticKVCache(cache.k.shape, cache.max_len, cache.k.dtype, cache.k.device)
    return _static_caches[key].load(cache)


def start_decoding(model, ids, pos, valid, cache_len, groups, compile):
    """Prefill the prompts: (the last column's logits [B, V], a function (tok, pos, live) -> the next
    logits that appends one token per row to the model's cache)."""
    logits, cache = prefill(model, ids, pos, valid, cache_len, groups)
    if not compile:
        return logits, lambda tok, p, live: decode_step(model, tok, p, live, cache)
    cache, step = static_cache(model, cache), compiled_decode_step(ids.device.type)
    # a CUDA graph's output is overwritten by the next replay of any graph of the pool (the teacher's step,
    # with speculative KD): copy it out
    return logits, lambda tok, p, live: step(model, tok, p, live, cache).clone()


def speculative_choice(proposal, t_logits, top_k, temperature, noise):
    """Speculative KD (Xu et al. 2024): keep the student's proposal where it is among the teacher's top_k
    tokens (ties at the k-th logit count as inside), else take a token drawn from the teacher's top_k at
    the same temperature. top_k = vocabulary keeps every proposal (plain on-policy sampling); top_k = 1
    takes the teacher's greedy token at every position. Returns (tokens [B], kept [B])."""
    inside = t_logits >= torch.topk(t_logits, top_k, dim=-1).values[:, -1:]  # one top-k for both uses
    kept = inside.gather(-1, proposal[:, None]).squeeze(-1)
    own = sample_token(t_logits.masked_fill(~inside, float("-inf")), temperature, noise=noise)
    return torch.where(kept, proposal, own), kept


@torch.no_grad()
def generate(model, prompt_ids, prompt_valid, max_new_tokens, eos_id, pad_id, temperature=1.0, top_k=None,
             generator=None, rows=None, n_rows=None, share_prompts=True, compile=False, cache_len=None,
             teacher=None, skd_top_k=None, teacher_generator=None):
    """Sample completions for left-padded prompts with a preallocated KV cache.

    rows / n_rows: these B prompts are rows `rows` (a LongTensor [B]) of a global batch of n_rows
    (default: the whole batch, in order). Each decode step draws one [n_rows, V] block of uniform noise
    from `generator` and row i uses row rows[i] of it, so a row's sample depends only on the seed and its
    global row index, not on which rows share its batch: split over the ranks of a torchrun job (every
    rank seeding the same generator), N processes sample exactly what one process samples.

    The prompts are prefilled once (a prompt that several rows share, once: model.prefill; share_prompts=False
    runs every row); then one token per step for every row, until every row has emitted
    EOS or max_new_tokens is reached. eos_id: one id, or a list of ids (chat models end a turn with any of
    several; a row stops at the first of any). Under torch.distributed with several ranks, every rank runs
    the same number of steps (an all-reduce of "anyone still running" per step), as FSDP's collectives
    require.
    compile: decode with compiled_decode_step over a StaticKVCache of cache_len slots (default P +
    max_new_tokens; give the longest prompt + max_new_tokens, so batches of shorter prompts reuse the
    compiled step). The same tokens as the eager step, given the same noise, up to float rounding.
    teacher, skd_top_k, teacher_generator: speculative KD. The teacher (same tokenizer) decodes beside the
    model with its own cache; at each position the model's sample is a proposal that the teacher keeps or
    replaces (speculative_choice), drawing its replacements' noise from teacher_generator (so that keeping
    every proposal samples exactly what plain decoding samples), and both models continue from the chosen
    token. Batch.kept marks the kept proposals.
    Returns a Batch whose logprobs are log-softmax of the model's (untempered) logits at the sampled tokens."""
    B, P = prompt_ids.shape
    device = prompt_ids.device
    pos = positions_from_valid(prompt_valid)
    groups = distinct_rows(prompt_ids, prompt_valid) if share_prompts else None
    if cache_len is not None and cache_len < P + max_new_tokens:
        raise ValueError(f"cache_len {cache_len} < prompt {P} + max_new_tokens {max_new_tokens}")
    logits, step = start_decoding(model, prompt_ids, pos, prompt_valid, cache_len or P + max_new_tokens, groups,
                                  compile)
    if teacher is not None:
        t_logits, t_step = start_decoding(teacher, prompt_ids, pos, prompt_valid, cache_len or P + max_new_tokens,
                                          groups, compile)
        kept = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
    next_pos = pos[:, -1] + 1  # the last prompt column is real in every row (left padding)
    toks = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lps = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
    live = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
    running = torch.ones(B, dtype=torch.bool, device=device)
    sync = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if n_rows is None:
        n_rows, rows = B, None
    elif rows is not None:
        rows = torch.as_tensor(rows, dtype=torch.long, device=device)
    V = logits.size(-1)
    stops = torch.tensor(eos_id, dtype=torch.long, device=device) if isinstance(eos_id, (list, tuple)) else None
    n = 0
    for t in range(max_new_tokens):
        noise = None
        if temperature > 0:
            noise = torch.rand(n_rows, V, generator=generator, device=device)
            noise = noise if rows is None else noise[rows]
        tok = sample_token(logits, temperature, top_k, noise=noise)
        if teacher is not None:
            t_noise = None
            if temperature > 0:
                t_noise = torch.rand(n_rows, V, generator=teacher_generator, device=device)
                t_noise = t_noise if rows is None else t_noise[rows]
            tok, kept[:, t] = speculative_choice(tok, t_logits, skd_top_k, temperature, t_noise)
            kept[:, t] &= running
        tok = torch.where(running, tok, pad_id)
        lp = F.log_softmax(logits.float(), -1).gather(-1, tok[:, None]).squeeze(-1)
        toks[:, t], lps[:, t], live[:, t] = tok, torch.where(running, lp, 0.0), running
        running = running & (tok != eos_id if stops is None else ~torch.isin(tok, stops))
        n = t + 1
        if sync:
            flag = running.any().float()
            dist.all_reduce(flag)
            if flag.item() == 0:
                break
        elif not bool(running.any()):
            break
        if t + 1 < max_new_tokens:
            logits = step(tok[:, None], (next_pos + t)[:, None], live[:, t:t + 1])
            if teacher is not None:
                t_logits = t_step(tok[:, None], (next_pos + t)[:, None], live[:, t:t + 1])
    toks, lps, live = toks[:, :n], lps[:, :n], live[:, :n]
    zeros = torch.zeros_like(prompt_valid)
    return Batch(tokens=torch.cat([prompt_ids, toks], 1), valid=torch.cat([prompt_valid, live], 1),
                 mask=torch.cat([zeros, live], 1), prompt_len=P,
                 logprobs=torch.cat([torch.zeros(B, P, device=device), lps], 1),
                 on_policy=torch.ones(B, dtype=torch.bool, device=device),
                 kept=torch.cat([zeros, kept[:, :n]], 1) if teacher is not None else None)

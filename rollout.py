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
    teacher_hidden [B, P+N, d]  speculative KD only: at each completion token of an on-policy row, the teacher's
                         final-normed hidden state that predicted it while decoding (what teacher.score with
                         hidden_states=True returns there), 0 elsewhere; the step's loss reads it instead of
                         running the teacher again (teacher.teacher_scores). None otherwise

Positions come from `valid` (model.positions_from_valid), so a row scores the same at any padding.
Rollouts and given completions are packed together into one batch by `pack`.

A training step's batch (the end of this file): its rows (step_rows: the first lambda x batch on-policy,
the rest off-policy), the on-policy rows' completions made by the --rollout scheme (ROLLOUTS: the
student samples, or speculative KD), the off-policy rows' given answers or teacher samples (make_batch).
A new rollout scheme is one function in ROLLOUTS; train.py's --rollout choices are its keys.
"""
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import longest_prompt
from data.countdown import augment
from distributed import any_rank, compute_dtype, decoding, full_parameters
from flops import flops_generate
from lora import merge, scale_of
from model import GPT, StaticKVCache, distinct_rows, positions_from_valid, prefill


@dataclass
class Batch:
    tokens: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor
    prompt_len: int
    logprobs: torch.Tensor
    on_policy: torch.Tensor
    kept: torch.Tensor = None  # speculative KD rollouts: the student's proposals the teacher kept [B, P+N]
    teacher_hidden: torch.Tensor = None  # speculative KD rollouts: the teacher's hidden states [B, P+N, d]

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

    def select(self, rows):
        """Rows `rows` (a slice) as a batch of their own (a micro-batch), cut after the last column they use."""
        T = max(self.prompt_len + 1, int(self.valid[rows].any(0).nonzero().max()) + 1)
        cut = lambda t: None if t is None else t[rows, :T]  # noqa: E731
        return Batch(cut(self.tokens), cut(self.valid), cut(self.mask), self.prompt_len, cut(self.logprobs),
                     self.on_policy[rows], cut(self.kept), cut(self.teacher_hidden))

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


def pack(prompts, completions, pad_id, device=None, logprobs=None, on_policy=None, kept=None, teacher_hidden=None):
    """Prompts (id lists, left-padded) + completions (id lists up to and including EOS, right-padded).

    logprobs: per row, the sampling-time logprobs of its completion tokens (a list of floats), or None for
    a given row; on_policy: per row, whether the student sampled it (default: no row); kept: per row, which
    of its completion tokens were kept student proposals (speculative KD), or None; teacher_hidden: per row,
    the teacher's hidden states that predicted its completion tokens [len, d] (speculative KD), or None."""
    ids, pvalid = left_pad(prompts, pad_id)
    B, N = len(prompts), max(len(c) for c in completions)
    comp = torch.full((B, N), pad_id, dtype=torch.long)
    cmask = torch.zeros(B, N, dtype=torch.bool)
    lps = torch.zeros(B, ids.size(1) + N)
    kmask = torch.zeros(B, ids.size(1) + N, dtype=torch.bool)
    P = ids.size(1)
    hidden = None
    if teacher_hidden is not None:
        some = next(h for h in teacher_hidden if h is not None)
        hidden = torch.zeros(B, P + N, some.size(-1), dtype=some.dtype, device=some.device)
    for i, c in enumerate(completions):
        comp[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        cmask[i, :len(c)] = True
        if logprobs is not None and logprobs[i] is not None:
            lps[i, P:P + len(c)] = torch.tensor(logprobs[i])
        if kept is not None and kept[i] is not None:
            kmask[i, P:P + len(c)] = torch.tensor(kept[i], dtype=torch.bool)
        if teacher_hidden is not None and teacher_hidden[i] is not None:
            hidden[i, P:P + len(c)] = teacher_hidden[i]
    flags = torch.tensor([False] * B if on_policy is None else list(on_policy), dtype=torch.bool)
    return Batch(tokens=torch.cat([ids, comp], 1).to(device), valid=torch.cat([pvalid, cmask], 1).to(device),
                 mask=torch.cat([torch.zeros_like(pvalid), cmask], 1).to(device), prompt_len=P,
                 logprobs=lps.to(device), on_policy=flags.to(device),
                 kept=kmask.to(device) if kept is not None else None,
                 teacher_hidden=hidden.to(device) if hidden is not None else None)


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


def decode_step(model, tok, pos, live, cache, head=None):
    """One token per row [B, 1] through the model, appended to the cache: the next-token logits [B, V] (or
    head(h, W) of its hidden state, as GPT.forward)."""
    return model(tok, pos, live, cache, head=head)[:, -1]


def hidden_and_logits(h, w):
    """A forward's head= that returns the final-normed hidden states and the logits side by side [..., d + V]:
    one tensor, which the decode step (and its CUDA graph) returns as it returns the logits. The speculative
    KD teacher decodes with it, so the step's loss can reuse its hidden states (Batch.teacher_hidden)."""
    return torch.cat([h, F.linear(h, w)], -1)


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


def start_decoding(model, ids, pos, valid, cache_len, groups, compile, head=None):
    """Prefill the prompts: (the last column's logits [B, V], a function (tok, pos, live) -> the next
    logits that appends one token per row to the model's cache). head: as GPT.forward's, in place of the
    logits."""
    logits, cache = prefill(model, ids, pos, valid, cache_len, groups, head=head)
    if not compile:
        return logits, lambda tok, p, live: decode_step(model, tok, p, live, cache, head)
    cache, step = static_cache(model, cache), compiled_decode_step(ids.device.type)
    if ids.device.type != "cuda":
        return logits, lambda tok, p, live: step(model, tok, p, live, cache, head)
    # a CUDA graph's output is overwritten by the next replay of any graph of the pool (the teacher's step,
    # with speculative KD): copy it out
    return logits, lambda tok, p, live: step(model, tok, p, live, cache, head).clone()


SKD_REPLACE = ("full", "top_k")  # --skd-replace: where a rejected proposal's replacement is drawn from


def speculative_choice(proposal, t_logits, top_k, temperature, noise, replace="full"):
    """Speculative KD (Xu et al. 2024, Algorithm 1): keep the student's proposal where it is among the
    teacher's top_k tokens (ties at the k-th logit count as inside), else replace it by a token drawn from
    the teacher at the same temperature: from its whole distribution (replace="full", the paper's rule) or
    from its top_k only (replace="top_k"). top_k = vocabulary keeps every proposal (plain on-policy
    sampling); top_k = 1 keeps only the teacher's greedy token, and "top_k" then replaces every other
    proposal by it (the teacher's greedy decoding). Returns (tokens [B], kept [B])."""
    if replace not in SKD_REPLACE:
        raise ValueError(f"speculative KD replace must be one of {SKD_REPLACE}, got {replace!r}")
    inside = t_logits >= torch.topk(t_logits, top_k, dim=-1).values[:, -1:]  # one top-k for both uses
    kept = inside.gather(-1, proposal[:, None]).squeeze(-1)
    pool = t_logits if replace == "full" else t_logits.masked_fill(~inside, float("-inf"))
    own = sample_token(pool, temperature, noise=noise)
    return torch.where(kept, proposal, own), kept


@torch.no_grad()
def generate(model, prompt_ids, prompt_valid, max_new_tokens, eos_id, pad_id, temperature=1.0, top_k=None,
             generator=None, rows=None, n_rows=None, share_prompts=True, compile=False, cache_len=None,
             teacher=None, skd_top_k=None, teacher_generator=None, skd_replace="full"):
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
    teacher, skd_top_k, teacher_generator, skd_replace: speculative KD. The teacher (same tokenizer) decodes
    beside the model with its own cache; at each position the model's sample is a proposal that the teacher
    keeps or replaces (speculative_choice, skd_replace: from its whole distribution or its top k), drawing its
    replacements' noise from teacher_generator (so that keeping every proposal samples exactly what plain
    decoding samples), and both models continue from the chosen token. Batch.kept marks the kept proposals,
    Batch.teacher_hidden holds the teacher's hidden state that predicted each completion token.
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
        t_out, t_step = start_decoding(teacher, prompt_ids, pos, prompt_valid, cache_len or P + max_new_tokens,
                                       groups, compile, head=hidden_and_logits)
        d = teacher.cfg.d_model  # t_out is [hidden d | logits V]
        kept = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
        t_hidden = torch.zeros(B, max_new_tokens, d, dtype=t_out.dtype, device=device)
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
            t_hidden[:, t] = torch.where(running[:, None], t_out[:, :d], 0)
            tok, kept[:, t] = speculative_choice(tok, t_out[:, d:], skd_top_k, temperature, t_noise, skd_replace)
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
                t_out = t_step(tok[:, None], (next_pos + t)[:, None], live[:, t:t + 1])
    toks, lps, live = toks[:, :n], lps[:, :n], live[:, :n]
    zeros = torch.zeros_like(prompt_valid)
    return Batch(tokens=torch.cat([prompt_ids, toks], 1), valid=torch.cat([prompt_valid, live], 1),
                 mask=torch.cat([zeros, live], 1), prompt_len=P,
                 logprobs=torch.cat([torch.zeros(B, P, device=device), lps], 1),
                 on_policy=torch.ones(B, dtype=torch.bool, device=device),
                 kept=torch.cat([zeros, kept[:, :n]], 1) if teacher is not None else None,
                 teacher_hidden=torch.cat([t_hidden.new_zeros(B, P, d), t_hidden[:, :n]], 1)
                 if teacher is not None else None)


# ---------------------------------------------------------------------- a training step's rows and completions

@dataclass
class Row:
    prompt: list          # prompt token ids
    answer: list          # ground-truth completion ids (off-policy rows), None for on-policy rows
    on_policy: bool       # the student samples this row's completion
    problem: tuple        # (numbers, target, solution): the verifier's input; a cross-tokenizer teacher's prompt


def step_rows(problems, step, args, n_on, fmt, rank, world, mix=None):
    """This rank's rows of step `step`: the global batch is drawn by a generator seeded with (seed, step), its
    first n_on rows on-policy (n_on / spp problems, each spp times in a row), the rest off-policy; rank r
    takes rows r::world (n_on is a multiple of world, so every rank gets the same share of each kind).
    mix: (problems, format) of --sft-mix's task, which the off-policy rows then come from."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    idx = torch.randint(len(problems), (args.batch_size,), generator=g).tolist()
    probs = [problems[i] for i in idx]
    if args.augment:
        rng = random.Random(args.seed * 1_000_003 + step)
        probs = [augment(p, rng) for p in probs]
    n_prompts = n_on // args.samples_per_prompt
    on = [p for p in probs[:n_prompts] for _ in range(args.samples_per_prompt)]
    off, off_fmt = probs[n_prompts:n_prompts + args.batch_size - n_on], fmt
    if mix is not None:
        off, off_fmt = [mix[0][i] for i in torch.randint(len(mix[0]), (len(off),), generator=g).tolist()], mix[1]
    rows = ([Row(fmt.prompt_ids(n, t), None, True, (n, t, a)) for n, t, a in on] +
            [Row(off_fmt.prompt_ids(n, t), off_fmt.answer_ids(a), False, (n, t, a)) for n, t, a in off])
    return rows[rank::world]


def rollout_seed(seed, step, stream):
    return (seed * 1_000_003 + step) * 2 + stream


def sample(model, prompts, run, step, stream, teacher=None):
    """(completions, their logprobs, the FLOPs it took, which tokens were kept proposals or None) as lists,
    sampled from `model` for this rank's share of the step's rows of a stream (0: the student's on-policy
    rows, 1: the teacher's seq-KD rows): sample_batch's batch as lists."""
    batch, flops = sample_batch(model, prompts, run, step, stream, teacher)
    kept = batch.completion_values(batch.kept) if teacher is not None else None
    return batch.completions(), batch.completion_logprobs(), flops, kept


def sample_batch(model, prompts, run, step, stream, teacher=None):
    """(rollout.generate's Batch, the FLOPs it took) of `model`'s samples for this rank's share of the step's
    rows of a stream. Seeded by (seed, step, stream) on every rank and drawn per global row, so N processes
    sample what one does. teacher: speculative KD, the teacher keeping or replacing each of the model's
    proposals (speculative_choice, --skd-top-k, --skd-replace), its noise from its own seed.
    run: train.Run (reads args, pad, eos, rank, world, device, cache_len)."""
    args = run.args
    g = torch.Generator(run.device).manual_seed(rollout_seed(args.seed, step, stream))
    ids, valid = left_pad(prompts, run.pad, run.device)
    n_rows = len(prompts) * run.world  # every rank holds the same number of this stream's rows
    decoder = decode_replica(model, run.device) if args.compile else model
    skd = {}
    if teacher is not None:
        skd = dict(teacher=decode_replica(teacher, run.device) if args.compile else teacher,
                   skd_top_k=args.skd_top_k, skd_replace=args.skd_replace,
                   teacher_generator=torch.Generator(run.device).manual_seed(
                       rollout_seed(args.seed, step, stream) + (1 << 48)))  # no step's stream seed
    with decoding(decoder), decoding(skd.get("teacher")):
        batch = generate(decoder, ids, valid, args.max_new_tokens, run.eos, run.pad, temperature=args.temperature,
                         top_k=args.top_k or None, generator=g, rows=range(run.rank, n_rows, run.world),
                         n_rows=n_rows, compile=args.compile, cache_len=run.cache_len, **skd)
    P, K = ids.size(1), len(distinct_rows(ids, valid)[0])
    flops = flops_generate(model.cfg, len(ids), P, batch.tokens.size(1) - P, K)
    if teacher is not None:
        flops += flops_generate(teacher.cfg, len(ids), P, batch.tokens.size(1) - P, K)
    return batch, flops


_replicas = {}  # id(model) -> its decode replica


def decode_replica(model, device):
    """--compile: a plain, unsharded GPT holding model's current weights in the compute dtype, for the compiled
    decode step (FSDP's hooks do not compile). One per model, kept across steps and refreshed in place while
    the model trains (a frozen teacher's once), so its weights stay at the addresses CUDA graphs replay on.
    Costs a whole copy of the model per rank (and, while refreshing, its fp32 weights gathered whole); FSDP
    holds every block whole while decoding anyway."""
    replica = _replicas.get(id(model))
    if replica is not None and not any(p.requires_grad for p in model.parameters()):
        return replica
    if replica is None:
        replica = GPT(model.cfg).to(device, compute_dtype(device)).requires_grad_(False)
        _replicas[id(model)] = replica
    weights = full_parameters(model)
    if scale_of(model):  # LoRA: the replica decodes with the merged weights, W + (alpha / r) B A
        weights, _ = merge(weights, scale_of(model))
    with torch.no_grad():
        for name, p in replica.named_parameters():
            p.copy_(weights[name])
    return replica


def student_rollout(model, teacher, prompts, run, step):
    """On-policy rows: the student samples (stream 0)."""
    return *sample(model, prompts, run, step, 0), None


def skd_rollout(model, teacher, prompts, run, step):
    """Speculative KD (Xu et al. 2024): the student proposes each token, the teacher keeps it when it is in
    the teacher's top --skd-top-k and replaces it otherwise by a draw from its whole distribution, or from
    its top k with --skd-replace top_k (rollout.speculative_choice). The teacher's hidden states from
    decoding come along, so the step need not run the teacher again (teacher.teacher_scores)."""
    batch, flops = sample_batch(model, prompts, run, step, 0, teacher)
    hidden = [h[batch.prompt_len:][m[batch.prompt_len:]] for h, m in zip(batch.teacher_hidden, batch.mask)]
    return (batch.completions(), batch.completion_logprobs(), flops, batch.completion_values(batch.kept),
            hidden)


# --rollout NAME -> fn(student, teacher, prompts, run, step) -> (completions, logprobs, FLOPs, kept or None,
# the teacher's hidden states or None): per row, lists aligned with the completion tokens (hidden: [len, d])
ROLLOUTS = {"student": student_rollout, "skd": skd_rollout}


def add_rollout_args(p):
    """train.py's rollout flags (their checks: check_rollout_args)."""
    g = p.add_argument_group("rollouts")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of rollouts")
    g.add_argument("--top-k", type=int, default=0, help="sample from the top k tokens (0 = all)")
    g.add_argument("--max-new-tokens", type=int, default=24, help="rollout budget in tokens (eval: at least 24); a "
                   "chat model's <answer> needs more: 64-256")
    g.add_argument("--rollout", default="student", choices=list(ROLLOUTS), help="how the on-policy rows' "
                   "completions are made (rollout.ROLLOUTS): the student samples (student), or speculative KD: the "
                   "teacher keeps each student token that is in its top --skd-top-k and replaces the others (skd)")
    g.add_argument("--skd-top-k", type=int, default=5, help="--rollout skd: a proposal in the teacher's top k is "
                   "kept (vocabulary = plain on-policy sampling)")
    g.add_argument("--skd-replace", default="full", choices=SKD_REPLACE, help="--rollout skd: a rejected proposal's "
                   "replacement is drawn from the teacher's whole distribution (full, Xu et al.'s Algorithm 1) or "
                   "from its top --skd-top-k (top_k; with --skd-top-k 1 the teacher's greedy decoding)")
    g.add_argument("--compile", action="store_true", help="rollouts decode with a compiled one-token step over a "
                   "static KV cache (torch.compile; CUDA graphs on GPU), and the fused loss's per-chunk divergence is "
                   "compiled (losses.chunk_divergence); the first step pays the compiles")


def check_rollout_args(args):
    """Refuse (ValueError, one line) --rollout flags that cannot work together."""
    if args.rollout == "skd" and (args.stage != "distill" or args.loss == "sampled"):
        raise ValueError("--rollout skd needs --stage distill and a full-vocabulary loss: the sampled estimator's "
                         "p_old is the student's distribution, and a teacher-corrected token was not drawn from it")
    if args.rollout == "skd" and args.skd_top_k < 1:
        raise ValueError(f"--skd-top-k must be >= 1, got {args.skd_top_k}")


def make_batch(step, rows, model, teacher, run):
    """(the step's batch, the FLOPs its sampling took): the on-policy rows' completions by the --rollout scheme
    (they come first), then the off-policy rows': ground truth, or the teacher's samples with --seq-kd."""
    on, off = [r for r in rows if r.on_policy], [r for r in rows if not r.on_policy]
    completions, logprobs, flops, kept, hidden = [], [], 0, None, None
    if on:
        completions, logprobs, flops, kept, hidden = ROLLOUTS[run.args.rollout](model, teacher,
                                                                                [r.prompt for r in on], run, step)
    if off and run.args.seq_kd:
        t_completions, _, t_flops, _ = sample(teacher, [r.prompt for r in off], run, step, 1)
        completions, flops = completions + t_completions, flops + t_flops
    else:
        completions += [r.answer for r in off]
    batch = pack([r.prompt for r in on + off], completions, run.pad, run.device,
                 logprobs=logprobs + [None] * len(off), on_policy=[True] * len(on) + [False] * len(off),
                 kept=kept + [None] * len(off) if kept is not None else None,
                 teacher_hidden=hidden + [None] * len(off) if hidden is not None else None)
    return batch, flops


def check_context(fmt, t_fmt, cfg, t_cfg, max_new_tokens, task="countdown"):
    """Refuse (ValueError) a --max-new-tokens whose longest rollout would not fit the student's or the
    teacher's context (max_seq_len: a Hugging Face model's max_position_embeddings). Across tokenizers
    (t_fmt is not fmt) the teacher needs at most one token per character of the completion (+ EOS), and a
    student token is at most `chars` characters."""
    tok = fmt.tok
    n = longest_prompt(fmt, task) + max_new_tokens
    # with one tokenizer the teacher scores the student's sequences as they are
    contexts = {"student": cfg.max_seq_len} | ({"teacher": t_cfg.max_seq_len} if t_fmt is fmt else {})
    for who, context in contexts.items():
        if n > context:
            raise ValueError(f"--max-new-tokens {max_new_tokens}: the longest prompt + completion is {n} tokens, "
                             f"over the {who}'s context of {context}")
    if t_fmt is not fmt:
        special = set(tok.get_added_tokens_decoder())
        chars = max(len(t) for t, i in tok.get_vocab().items() if i not in special)
        n = longest_prompt(t_fmt) + max_new_tokens * chars + 1
        if n > t_cfg.max_seq_len:
            raise ValueError(f"--max-new-tokens {max_new_tokens}: a completion of up to {max_new_tokens * chars} "
                             f"characters needs up to {n} teacher tokens with its prompt, over the teacher's "
                             f"context of {t_cfg.max_seq_len}")


def shared_prompts(batch):
    """distinct_rows of the batch's prompts when some rows share one on any rank (--samples-per-prompt > 1,
    or repeats by chance), else None: the forwards then run each distinct prompt once (model.forward_from).
    Agreed across ranks, so every rank runs the same FSDP forwards whatever its rows."""
    P = batch.prompt_len
    groups = distinct_rows(batch.tokens[:, :P], batch.valid[:, :P]) if P > 1 else None
    repeat = groups is not None and len(groups[0]) < len(batch.tokens)
    return groups if any_rank(repeat, batch.tokens.device) else None

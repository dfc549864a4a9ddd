"""rollout.py on tiny random models (CPU, fp32): the KV-cached sampler against naive references (greedy
decode recomputing the whole sequence, full recompute fed the same Gumbel noise, the exact tempered
softmax), the batch layout and masks, and the shared-prompt prefill against prefilling every row."""
import pytest
import torch
import torch.nn.functional as F

from conftest import random_prompts, spp_prompts, tiny_model
from rollout import generate, left_pad, pack

EOS, PAD = 2, 0


def naive_greedy(model, prompt, n):
    """One row, no padding, no cache: recompute the whole sequence for every new token."""
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0, -1]
        seq.append(int(logits.argmax()))
        if seq[-1] == EOS:
            break
    return seq[len(prompt):]


@torch.no_grad()
def test_cached_greedy_equals_naive_decode():
    model = tiny_model().eval()
    ps = random_prompts()
    ids, valid = left_pad(ps, PAD)
    batch = generate(model, ids, valid, 12, EOS, PAD, temperature=0.0)
    for i, p in enumerate(ps):
        assert batch.completions()[i] == naive_greedy(model, p, 12)


@torch.no_grad()
def test_cached_sampling_equals_full_recompute_with_the_same_noise():
    """Temperature 1, rows stopping at different steps, prompts repeated (a shared prefill): the cached
    rollout samples the tokens a loop that recomputes every row from scratch samples from the same
    uniform draws (one [B, V] block per step, Gumbel-max)."""
    model = tiny_model(5).eval()
    for p in model.parameters():  # a freshly initialised model is nearly uniform: the noise alone would
        p.mul_(4.0)               # decide the samples, whatever the cache held; sharpen it
    model.head.weight[EOS] += 0.3 * model.head.weight.std() * torch.randn_like(model.head.weight[EOS]).sign()
    ps = [p for p in random_prompts(5, lengths=(2, 6, 4)) for _ in range(2)] + random_prompts(6, lengths=(8,))
    ids, valid = left_pad(ps, PAD)
    B, N, V = len(ps), 12, model.cfg.vocab_size
    b = generate(model, ids, valid, N, EOS, PAD, temperature=1.0, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    seqs, done = [list(p) for p in ps], [False] * B
    for _ in range(N):
        noise = torch.rand(B, V, generator=g)
        if all(done):
            break
        for i in range(B):
            if not done[i]:
                logits = model(torch.tensor([seqs[i]]))[0, -1]
                seqs[i].append(int((logits - torch.log(-torch.log(noise[i]))).argmax()))
                done[i] = seqs[i][-1] == EOS
    assert b.completions() == [s[len(p):] for s, p in zip(seqs, ps)]
    assert any(done) and not all(len(c) == N for c in b.completions())


@torch.no_grad()
def test_same_seed_same_samples_and_greedy_ignores_seed():
    model = tiny_model(2).eval()
    ids, valid = left_pad(random_prompts(2), PAD)
    run = lambda temp, seed: generate(model, ids, valid, 10, EOS, PAD, temperature=temp, top_k=None,
                                      generator=torch.Generator().manual_seed(seed)).tokens
    assert torch.equal(run(1.0, 7), run(1.0, 7))
    assert not torch.equal(run(1.0, 7), run(1.0, 8))
    assert torch.equal(run(0.0, 7), run(0.0, 8))


@torch.no_grad()
def test_mask_and_logprobs_are_right():
    model = tiny_model(3).eval()
    # make EOS likely so that rows stop at different steps
    model.head.weight[EOS] += 0.6 * model.head.weight.std() * torch.randn_like(model.head.weight[EOS]).sign()
    ids, valid = left_pad(random_prompts(3, lengths=(2, 6, 4, 3, 8, 5, 1, 7)), PAD)
    g = torch.Generator().manual_seed(0)
    b = generate(model, ids, valid, 15, EOS, PAD, temperature=1.0, generator=g)
    P = b.prompt_len
    assert not b.mask[:, :P].any()
    n_eos = 0
    for row, m in zip(b.tokens[:, P:].tolist(), b.mask[:, P:].tolist()):
        # the mask is a prefix: every sampled token up to and including the first EOS, nothing after
        if EOS in row:
            n_eos += 1
            k = row.index(EOS) + 1
            assert m == [True] * k + [False] * (len(row) - k)
            assert all(t == PAD for t in row[k:])
        else:
            assert all(m)
    assert n_eos > 0 and len(set(b.mask.sum(1).tolist())) > 1  # rows stopped at different steps
    # logprobs equal a fresh full forward's log-softmax at the sampled tokens; 0 off the mask
    logits = model(b.tokens, b.pos, b.valid)
    ref = F.log_softmax(logits[:, :-1].double(), -1).gather(-1, b.tokens[:, 1:, None]).squeeze(-1)
    m = b.mask[:, 1:]
    torch.testing.assert_close(b.logprobs[:, 1:][m].double(), ref[m], rtol=1e-5, atol=1e-5)
    assert (b.logprobs[:, 1:][~m] == 0).all()


@torch.no_grad()
def test_top_k_restricts_samples():
    model = tiny_model(4).eval()
    ids, valid = left_pad(random_prompts(4), PAD)
    b = generate(model, ids, valid, 8, EOS, PAD, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    greedy = generate(model, ids, valid, 8, EOS, PAD, temperature=0.0)
    assert torch.equal(b.tokens, greedy.tokens)


def test_pack_layout_matches_generate_layout():
    model = tiny_model(5).eval()
    ps = random_prompts(5)
    ids, valid = left_pad(ps, PAD)
    with torch.no_grad():
        b = generate(model, ids, valid, 10, EOS, PAD, temperature=1.0, generator=torch.Generator().manual_seed(0))
    p = pack(ps, b.completions(), PAD)
    n = p.tokens.size(1)
    assert torch.equal(p.tokens, b.tokens[:, :n]) and torch.equal(p.mask, b.mask[:, :n])
    assert torch.equal(p.valid, b.valid[:, :n]) and not b.mask[:, n:].any()


def test_sampler_draws_from_the_tempered_softmax():
    """Gumbel-max with top-k against the exact distribution: empirical frequencies of 200k draws."""
    from rollout import sample_token
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 7, generator=g, dtype=torch.float64).float() * 1.5
    for temp, k in ((1.0, None), (0.7, None), (1.3, 4)):
        n = 200_000
        toks = sample_token(logits.expand(n, 7), temp, k, generator=g)
        freq = torch.bincount(toks, minlength=7).double() / n
        z = logits[0].double() / temp
        if k is not None:
            z = z.masked_fill(z < z.topk(k).values[-1], float("-inf"))
        p = torch.softmax(z, -1)
        # 5 standard errors of a binomial proportion; exactly 0 outside the top k
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (temp, k, freq, p)


@torch.no_grad()
def test_rows_of_a_global_batch_sample_the_same_anywhere():
    """Rows split over two 'ranks' (rows 0::2 and 1::2) sample exactly what the whole batch samples."""
    model = tiny_model(6).eval()
    model.head.weight[EOS] += 0.6 * model.head.weight.std() * torch.randn_like(model.head.weight[EOS]).sign()
    ps = random_prompts(6, lengths=(2, 6, 4, 3, 8, 5))
    ids, valid = left_pad(ps, PAD)
    whole = generate(model, ids, valid, 12, EOS, PAD, temperature=1.0, generator=torch.Generator().manual_seed(3))
    for r in range(2):
        part = ps[r::2]
        pids, pvalid = left_pad(part, PAD)
        b = generate(model, pids, pvalid, 12, EOS, PAD, temperature=1.0, generator=torch.Generator().manual_seed(3),
                     rows=list(range(r, 6, 2)), n_rows=6)
        # the split batch may stop earlier (all its rows done); compare the completions
        assert b.completions() == whole.completions()[r::2]


@torch.no_grad()
def test_shared_prompt_prefill_samples_what_every_row_prefilled_samples():
    model = tiny_model(n_layer=3).eval()
    ids, valid = left_pad(spp_prompts(4), 0)
    out = [generate(model, ids, valid, 10, 2, 0, temperature=1.0, generator=torch.Generator().manual_seed(7),
                    share_prompts=share) for share in (True, False)]
    assert torch.equal(out[0].tokens, out[1].tokens) and torch.equal(out[0].mask, out[1].mask)
    torch.testing.assert_close(out[0].logprobs, out[1].logprobs, rtol=1e-5, atol=1e-6)
    assert len({tuple(c) for c in out[0].completions()[:4]}) > 1  # the samples of one prompt differ


@torch.no_grad()
def test_static_cache_decodes_what_the_growing_cache_decodes():
    """The StaticKVCache step (tensor slot, attention over every slot, the unfilled ones masked), eager: the
    same logits as the KVCache step, token after token, on left-padded prompts."""
    from model import StaticKVCache, positions_from_valid, prefill
    model = tiny_model(3, n_layer=2).eval()
    ids, valid = left_pad(random_prompts(7, lengths=(2, 6, 4)), PAD)
    pos = positions_from_valid(valid)
    _, cache = prefill(model, ids, pos, valid, ids.size(1) + 9)
    static = StaticKVCache(cache.k.shape, cache.max_len, cache.k.dtype, "cpu").load(cache)
    tok, nxt = ids[:, -1:], pos[:, -1:] + 1
    for t in range(8):
        a = model(tok, nxt + t, None, cache)[:, -1]
        b = model(tok, nxt + t, None, static)[:, -1]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        tok = a.argmax(-1, keepdim=True)
    assert int(static.slot) == cache.len and torch.equal(static.valid, cache.valid)
    k = torch.stack(static.k)
    torch.testing.assert_close(k[:, :, :, :cache.len], cache.k[:, :, :, :cache.len], rtol=1e-5, atol=1e-6)
    assert not k[:, :, :, cache.len:].any()  # the slots past the last written one stay empty


@torch.no_grad()
def test_compiled_decode_samples_what_eager_decode_samples():
    """--compile: the decode step compiled (inductor) over a StaticKVCache longer than needed samples the
    eager rollout's tokens from the same noise, on a sharpened model with left-padded, repeated prompts and
    rows stopping early; a second batch of the same shape reuses the compiled step (no new graph)."""
    from torch._dynamo.utils import counters
    model = tiny_model(5).eval()
    for p in model.parameters():
        p.mul_(4.0)
    model.head.weight[EOS] += 0.3 * model.head.weight.std() * torch.randn_like(model.head.weight[EOS]).sign()
    for i, seed in enumerate((3, 4)):
        ps = [p for p in random_prompts(seed, lengths=(2, 6, 4)) for _ in range(2)] + random_prompts(6, lengths=(7,))
        ids, valid = left_pad(ps, PAD)
        run = lambda compile: generate(model, ids, valid, 12, EOS, PAD, temperature=1.0, compile=compile,  # noqa: E731
                                       cache_len=24, generator=torch.Generator().manual_seed(seed))
        eager, compiled = run(False), run(True)
        assert torch.equal(eager.tokens, compiled.tokens) and torch.equal(eager.mask, compiled.mask)
        torch.testing.assert_close(eager.logprobs, compiled.logprobs, rtol=1e-5, atol=1e-5)
        assert any(len(c) < 12 for c in eager.completions())
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs > 0


def sharp(model):
    for p in model.parameters():  # nearly uniform fresh models would let the noise alone decide
        p.mul_(4.0)
    model.head.weight[EOS] += 0.3 * model.head.weight.std() * torch.randn_like(model.head.weight[EOS]).sign()
    return model


@pytest.mark.parametrize("replace,K", [("full", 5), ("full", 1), ("top_k", 5), ("top_k", 1)])
@torch.no_grad()
def test_speculative_rollout_equals_full_recompute(replace, K):
    """Speculative KD, top K of 23: every row recomputed from scratch by both models, the student proposing
    from the generator's noise and the teacher replacing proposals outside its top K with a draw from its
    whole distribution (full) or its top K (top_k), its own noise, gives the cached rollout's tokens, kept
    flags, student logprobs and the teacher's hidden states (those of a full teacher forward)."""
    student, teacher = sharp(tiny_model(5).eval()), sharp(tiny_model(8, n_layer=3).eval())
    ps = [p for p in random_prompts(5, lengths=(2, 6, 4)) for _ in range(2)] + random_prompts(6, lengths=(7,))
    ids, valid = left_pad(ps, PAD)
    B, N, V = len(ps), 10, 23
    b = generate(student, ids, valid, N, EOS, PAD, temperature=1.0, generator=torch.Generator().manual_seed(3),
                 teacher=teacher, skd_top_k=K, teacher_generator=torch.Generator().manual_seed(4), skd_replace=replace)
    g, tg = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    seqs, done = [list(p) for p in ps], [False] * B
    kept, lps, hid = [[] for _ in ps], [[] for _ in ps], [[] for _ in ps]
    for _ in range(N):
        noise, t_noise = torch.rand(B, V, generator=g), torch.rand(B, V, generator=tg)
        for i in range(B):
            if done[i]:
                continue
            s_logits = student(torch.tensor([seqs[i]]))[0, -1]
            t_h = teacher(torch.tensor([seqs[i]]), head=lambda h, w: h)[0, -1]
            t_logits = t_h @ teacher.head.weight.T
            proposal = int((s_logits - torch.log(-torch.log(noise[i]))).argmax())
            top = set(torch.topk(t_logits, K).indices.tolist())
            pool = t_logits if replace == "full" else t_logits.masked_fill(
                t_logits < torch.topk(t_logits, K).values[-1], float("-inf"))
            tok = proposal if proposal in top else int((pool - torch.log(-torch.log(t_noise[i]))).argmax())
            seqs[i].append(tok)
            kept[i].append(proposal in top)
            lps[i].append(float(F.log_softmax(s_logits, -1)[tok]))
            hid[i].append(t_h)
            done[i] = tok == EOS
    assert b.completions() == [s[len(p):] for s, p in zip(seqs, ps)]
    assert b.completion_values(b.kept) == kept and 0 < sum(map(sum, kept)) < sum(map(len, kept))
    for got, want in zip(b.completion_logprobs(), lps):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
    P = b.prompt_len
    for i in range(B):
        n = len(hid[i])
        torch.testing.assert_close(b.teacher_hidden[i, P:P + n], torch.stack(hid[i]), rtol=1e-5, atol=1e-5)
        assert not b.teacher_hidden[i, :P].any() and not b.teacher_hidden[i, P + n:].any()  # 0 off the mask
    if K == 1 and replace == "full":  # some replacements were not the teacher's greedy token
        greedy = [[int(teacher(torch.tensor([s[:len(p) + j]]))[0, -1].argmax()) for j in range(len(s) - len(p))]
                  for s, p in zip(seqs, ps)]
        assert any(t != g for s, p, gr in zip(seqs, ps, greedy) for t, g in zip(s[len(p):], gr))


@torch.no_grad()
def test_speculative_rollout_ends():
    """Top k = the vocabulary keeps every proposal: plain sampling, token for token (either replacement).
    Top 1 with top_k replacement takes the teacher's greedy token everywhere, whatever the student proposes."""
    student, teacher = sharp(tiny_model(5).eval()), sharp(tiny_model(8, n_layer=3).eval())
    ids, valid = left_pad(random_prompts(5, lengths=(2, 6, 4, 3)), PAD)
    run = lambda **kw: generate(student, ids, valid, 10, EOS, PAD, temperature=1.0,  # noqa: E731
                                generator=torch.Generator().manual_seed(3), **kw)
    skd = lambda k, replace: run(teacher=teacher, skd_top_k=k, skd_replace=replace,  # noqa: E731
                                 teacher_generator=torch.Generator().manual_seed(4))
    plain = run()
    for replace in ("full", "top_k"):
        every = skd(23, replace)
        assert torch.equal(plain.tokens, every.tokens) and torch.equal(every.kept, every.mask)
        torch.testing.assert_close(plain.logprobs, every.logprobs, rtol=0, atol=0)
    greedy = generate(teacher, ids, valid, 10, EOS, PAD, temperature=0.0)
    one = skd(1, "top_k")
    assert torch.equal(one.tokens, greedy.tokens) and not torch.equal(one.tokens, plain.tokens)
    assert 0 < one.kept.sum() < one.mask.sum()  # some proposals were the teacher's greedy token
    with pytest.raises(ValueError, match="replace must be one of"):
        skd(3, "topk")


@torch.no_grad()
def test_compiled_speculative_rollout_decodes_what_eager_decodes():
    """--compile with speculative KD: both models' compiled steps (the teacher's returning its hidden states
    beside its logits) give the eager rollout's tokens, kept flags and teacher hidden states."""
    student, teacher = sharp(tiny_model(5).eval()), sharp(tiny_model(8, n_layer=3).eval())
    ps = [p for p in random_prompts(5, lengths=(2, 6, 4)) for _ in range(2)] + random_prompts(6, lengths=(7,))
    ids, valid = left_pad(ps, PAD)  # the shapes of the plain compiled test: the student's step compiles once
    run = lambda compile: generate(student, ids, valid, 10, EOS, PAD, temperature=1.0, compile=compile,  # noqa: E731
                                   cache_len=24, generator=torch.Generator().manual_seed(3), teacher=teacher,
                                   skd_top_k=3, teacher_generator=torch.Generator().manual_seed(4))
    eager, compiled = run(False), run(True)
    assert torch.equal(eager.tokens, compiled.tokens) and torch.equal(eager.kept, compiled.kept)
    assert 0 < eager.kept.sum() < eager.mask.sum()
    torch.testing.assert_close(eager.teacher_hidden, compiled.teacher_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager.logprobs, compiled.logprobs, rtol=1e-5, atol=1e-5)


def test_speculative_choice_draws_rejected_proposals_from_the_teacher():
    """speculative_choice against the exact distributions, 200k rows of one teacher distribution over 7
    tokens: a proposal inside the top K is kept; one outside is replaced by a draw from the teacher's whole
    tempered softmax (full; Xu et al.'s Algorithm 1: tokens outside the top K too) or from its top K only
    (top_k). At K = 1 only the argmax proposal is kept."""
    from rollout import speculative_choice
    g = torch.Generator().manual_seed(0)
    t_logits = torch.randn(1, 7, generator=g, dtype=torch.float64).float() * 1.5
    order = t_logits[0].argsort(descending=True).tolist()
    n = 200_000
    for temp, K, replace in ((1.0, 1, "full"), (0.7, 3, "full"), (1.0, 3, "top_k"), (1.3, 1, "top_k")):
        inside, outside = order[K - 1], order[K]  # the k-th best token, and the best one outside the top K
        for proposal in (inside, outside):
            toks, kept = speculative_choice(torch.full((n,), proposal), t_logits.expand(n, 7), K, temp,
                                            torch.rand(n, 7, generator=g), replace)
            if proposal == inside:
                assert kept.all() and (toks == proposal).all()
                continue
            assert not kept.any()
            z = t_logits[0].double() / temp
            if replace == "top_k":
                z = z.masked_fill(z < z.topk(K).values[-1], float("-inf"))
            p = torch.softmax(z, -1)
            freq = torch.bincount(toks, minlength=7).double() / n
            assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (temp, K, replace, freq, p)
            if replace == "full":
                assert freq[order[K:]].sum() > 0.01  # the paper's rule reaches outside the top K


def test_a_rollout_scheme_registered_in_rollouts_is_a_train_flag_and_makes_the_batch(monkeypatch):
    """A new way to make the on-policy rows' completions is one function in rollout.ROLLOUTS: --rollout
    accepts its name and make_batch packs what it returns (here: the student's greedy decode)."""
    import os
    import rollout
    import train
    from data.countdown import CharFormat, load_split, load_tokenizer

    def greedy_rollout(model, teacher, prompts, run, step):
        ids, valid = left_pad(prompts, run.pad)
        b = generate(model, ids, valid, run.args.max_new_tokens, run.eos, run.pad, temperature=0.0)
        return b.completions(), b.completion_logprobs(), 0, None, None
    monkeypatch.setitem(rollout.ROLLOUTS, "greedy", greedy_rollout)
    args = train.parse_args(["--rollout", "greedy", "--lmbda", "0.5", "--batch-size", "4", "--max-new-tokens", "5",
                             "--out", os.devnull])
    fmt = CharFormat(load_tokenizer())
    run = train.Run(args, fmt, fmt, False, None, 0, 1, torch.device("cpu"), fmt.pad_id, fmt.eos_ids, None)
    rows = rollout.step_rows(load_split("train"), 0, args, 2, fmt, 0, 1)
    model = tiny_model(seed=3)
    batch, _ = rollout.make_batch(0, rows, model, None, run)
    ids, valid = left_pad([r.prompt for r in rows[:2]], fmt.pad_id)
    want = generate(model, ids, valid, 5, fmt.eos_ids, fmt.pad_id, temperature=0.0).completions()
    assert batch.completions()[:2] == want and batch.on_policy.tolist() == [True, True, False, False]
    assert batch.completions()[2:] == [r.answer for r in rows[2:]]

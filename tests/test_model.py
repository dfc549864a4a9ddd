"""model.py on tiny random models (CPU, fp32): RoPE against the two-half formula, the KV cache and
out_from against a full forward, distinct_rows, and the shared-prompt prefill as teacher.score uses it
against a full forward; the Llama, Qwen2 and Qwen3 families and SmolLM2-135M-Instruct against
transformers on the same weights."""
import pytest
import torch

from checkpoint import load_pretrained
from conftest import hf_logits, make_hf_model, random_prompts, spp_prompts, tiny_model
from losses import divergence_loss
from model import KVCache, apply_rope, distinct_rows, positions_from_valid
from rollout import generate, left_pad, pack, shared_prompts
from teacher import score

PAD = 0


def two_half_rope(x, pos, hd, base=10000.0):
    """The textbook form on [B, H, T, hd]: [x1 cos - x2 sin, x1 sin + x2 cos], fp32 angles as the model
    builds them."""
    inv_freq = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = pos.float()[..., None] * inv_freq  # [B, T, hd/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x.chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def test_rotate_half_rope_equals_two_half_formula_bitwise():
    model = tiny_model(n_layer=3)
    B, H, T, hd = 3, 2, 11, 16
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, B, H, T, hd, generator=g)
    pos = torch.randint(0, 40, (B, T), generator=g)
    cos, sin = model.rope(pos, torch.float32)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    assert torch.equal(rq, two_half_rope(q, pos, hd)) and torch.equal(rk, two_half_rope(k, pos, hd))
    # and it is a rotation: norms of each pair are kept (float64 check of the reference itself)
    x1, x2 = q.double().chunk(2, -1)
    y1, y2 = rq.double().chunk(2, -1)
    assert torch.allclose(x1 ** 2 + x2 ** 2, y1 ** 2 + y2 ** 2, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_cached_logits_match_full_forward_with_left_padding():
    model = tiny_model(1).eval()
    ps = random_prompts(1)
    ids, valid = left_pad(ps, PAD)
    B, P = ids.shape
    g = torch.Generator().manual_seed(0)
    cont = torch.randint(4, 23, (B, 6), generator=g)
    # cached: prefill, then feed the continuation one token at a time
    cache = KVCache(model.cfg, B, P + 6)
    pos = positions_from_valid(valid)
    step_logits = [model(ids, pos, valid, cache)[:, -1]]
    for t in range(5):
        step_logits.append(model(cont[:, t:t + 1], (pos[:, -1] + 1 + t)[:, None], None, cache)[:, -1])
    cached = torch.stack(step_logits, 1)  # logits predicting cont[:, 0..5]
    # reference 1: the padded batch in one full forward
    full_ids, full_valid = torch.cat([ids, cont], 1), torch.cat([valid, torch.ones(B, 6, dtype=torch.bool)], 1)
    full = model(full_ids, positions_from_valid(full_valid), full_valid)[:, P - 1:P + 5]
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    # reference 2: each row alone, unpadded, default positions
    for i, p in enumerate(ps):
        alone = model(torch.tensor([p + cont[i, :5].tolist()]))[0, len(p) - 1:]
        torch.testing.assert_close(cached[i], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_out_from_logits_equal_the_full_forward_sliced(padded):
    model = tiny_model(n_layer=3).eval()
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
    student, teacher = tiny_model(0, n_layer=3), tiny_model(1, n_layer=3).eval()
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


def test_distinct_rows_groups_equal_prompts():
    ids, valid = left_pad(spp_prompts(3), 0)
    first, inverse = distinct_rows(ids, valid)
    assert len(first) == 4
    assert torch.equal(ids[first][inverse], ids) and torch.equal(valid[first][inverse], valid)
    assert sorted(first.tolist()) == [0, 3, 6, 9]  # the first row of each group


@torch.no_grad()
def test_shared_prompt_teacher_scores_equal_the_full_forward():
    """teacher.score with rows sharing prompts (one prefill per distinct prompt) and without sharing, against
    a full forward of the packed batch."""
    teacher = tiny_model(2, n_layer=3).eval()
    g = torch.Generator().manual_seed(8)
    ps = spp_prompts(3)
    comps = [torch.randint(4, 23, (int(n),), generator=g).tolist() + [2] for n in torch.randint(0, 8, (len(ps),), generator=g)]
    b = pack(ps, comps, 0)
    P = b.prompt_len
    full = teacher(b.tokens, b.pos, b.valid)[:, P - 1:-1]
    groups = shared_prompts(b)
    assert groups is not None and len(groups[0]) < len(b.tokens)
    shared = score(teacher, b, start=P, groups=groups)
    plain = score(teacher, b, start=P)
    assert shared.shape == full.shape == plain.shape
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, full, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------- Hugging Face families against transformers

def naive_greedy(logits_of, ids, n):
    """Greedy decoding by full recompute, one row at a time (no padding, no cache): the reference."""
    for _ in range(n):
        ids = torch.cat([ids, logits_of(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_hf_family_matches_transformers(tmp_path, family, tied):
    """Llama (GQA, llama3 RoPE scaling), Qwen2 (q/k/v biases), Qwen3 (q/k norms, head_dim != width / heads),
    tied and untied, saved by transformers' save_pretrained: the same fp32 logits on a left-padded batch,
    and the same greedy tokens through our KV cache as transformers' full recompute."""
    ref = make_hf_model(tmp_path / "m", family, tied)
    ours = load_pretrained(str(tmp_path / "m"))
    assert ours.cfg.arch == family and ours.cfg.tie_embeddings == tied
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (5, 11, 8, 1)]
    ids, valid = left_pad(seqs, 0)
    with torch.no_grad():
        diff = (hf_logits(ref, ids, valid) - ours(ids, positions_from_valid(valid), valid))[valid].abs().max()
    assert diff < 1e-5, diff
    out = generate(ours, ids, valid, 10, eos_id=-1, pad_id=0, temperature=0.0)
    for i, s in enumerate(seqs):
        want = naive_greedy(lambda x: ref(x).logits, torch.tensor([s]), 10)[0, len(s):]
        assert out.tokens[i, ids.size(1):].tolist() == want.tolist()


@pytest.mark.slow  # ~45 s; the converter's tests check the same logits against transformers' GGUF load
@torch.no_grad()
def test_smollm2_matches_transformers(smollm2_dir, smollm2_transformers):
    """SmolLM2-135M-Instruct (converted from the GGUF): the same fp32 logits as transformers on a left-padded
    batch of chat prompts, and the same greedy reply through the KV cache."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(f"{smollm2_dir}/tokenizer.json")
    chat = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    prompts = ["What is the capital of France?", "Using the numbers 3, 7, 13, make 88.", "Say hi."]
    seqs = [tok.encode(f"{chat}<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n").ids for p in prompts]
    ids, valid = left_pad(seqs, 2)
    ours = load_pretrained(smollm2_dir)
    diff = (hf_logits(smollm2_transformers, ids, valid) - ours(ids, positions_from_valid(valid), valid))[valid]
    assert diff.abs().max() < 1e-4, diff.abs().max()
    out = generate(ours, ids, valid, 16, eos_id=2, pad_id=2, temperature=0.0)
    want = naive_greedy(lambda x: smollm2_transformers(x).logits, torch.tensor([seqs[0]]), 16)[0, len(seqs[0]):]
    got = out.completions()[0]
    assert got == want.tolist()[:len(got)] and tok.decode(got).startswith("The capital of France is Paris")


@pytest.mark.slow  # ~60 s of compiling; test_train_distributed's compiled test runs them in train.py too (slow)
def test_compiled_blocks_equal_eager_over_lengths_and_compile_once():
    """GPT.compile_blocks (train.py --compile): the student's loss and every gradient, and the teacher's
    no-grad scores, equal eager ones for batches of three lengths (left-padded, with a shared-prompt cache
    forward) on a grouped-query SwiGLU model with q/k norms; the blocks' halves compile once for all of
    them (dynamic shapes), not per length or per block."""
    import copy
    from torch._dynamo.utils import counters
    cfg = dict(n_layer=3, n_head=4, n_kv_head=2, mlp="swiglu", qk_norm=True)
    eager = tiny_model(0, **cfg)
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    g = torch.Generator().manual_seed(5)
    counters.clear()
    for n_prompt, n_comp in ((5, 6), (9, 3), (4, 11)):
        prompts = [[1] + torch.randint(4, 23, (n,), generator=g).tolist() for n in (n_prompt, n_prompt - 2)]
        comps = [torch.randint(4, 23, (n_comp,), generator=g).tolist() for _ in prompts]
        b = pack(prompts * 2, comps * 2, 0)  # rows 2, 3 repeat the prompts of rows 0, 1
        out = []
        for model in (eager, compiled):
            model.zero_grad()
            t = score(model, b, start=b.prompt_len, groups=shared_prompts(b))
            logits = model(b.tokens, b.pos, b.valid, out_from=b.prompt_len - 1)[:, :-1]
            value = divergence_loss(logits, t.detach().flip(-1), b.mask[:, b.prompt_len:], "rkl", 1.0)
            value.backward()
            out.append((t, value, [p.grad.clone() for p in model.parameters()]))
        (t0, v0, g0), (t1, v1, g1) = out
        torch.testing.assert_close(t1, t0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
        for a, c in zip(g1, g0):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
    # two halves, each compiled for a forward with grad and one without (score): no recompiles per length
    assert 0 < counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])

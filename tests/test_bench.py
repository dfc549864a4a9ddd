"""bench.py: the FLOP counter against a count taken from the tensors a tiny GPT actually multiplies, and a
tiny end-to-end run whose last stdout line is the JSON summary."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench import KernelRecorder, flops_no_cache, generate_no_cache, kernel_floor, teacher_signal
from flops import flops_forward, flops_generate, flops_score, matmul_params
from conftest import ROOT, make_ckpt, tiny_model
from rollout import generate, left_pad

BENCH = dict(d_mlp=96, max_seq_len=32)  # the models here: MLP 3x the width, a context of 32
WIDE = BENCH | dict(d_model=64, n_head=4, d_mlp=128)  # width 64, 4 heads


class Counter:
    """Counts FLOPs from shapes at run time: every nn.Linear (forward hook: 2 * rows * in * out) and every
    attention call (2 * 2 * head_dim per (query, key) pair that the mask lets through, all heads)."""

    def __init__(self, model, monkeypatch):
        self.linear = self.attention = 0
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.register_forward_hook(self._linear_hook)
        sdpa = F.scaled_dot_product_attention

        def counting_sdpa(q, k, v, attn_mask=None, is_causal=False, **kw):
            B, H, Tq, hd = q.shape
            Tk = k.size(2)
            if attn_mask is not None:
                pairs = attn_mask.expand(B, H, Tq, Tk).sum().item()
            else:
                pairs = B * H * (torch.ones(Tq, Tk).tril().sum().item() if is_causal else Tq * Tk)
            self.attention += 4 * hd * pairs
            return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)
        monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)

    def _linear_hook(self, mod, inp, out):
        self.linear += 2 * inp[0].numel() // mod.in_features * mod.in_features * mod.out_features

    @property
    def total(self):
        return self.linear + self.attention


def test_matmul_params_are_the_linear_weights():
    model = tiny_model(**BENCH).eval()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert matmul_params(model.cfg) == linear
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed"))
    assert non_embedding - linear == (2 * model.cfg.n_layer + 1) * model.cfg.d_model  # the RMSNorm gains


LLAMA = BENCH | dict(arch="llama", n_head=4, n_kv_head=2, head_dim=12, mlp="swiglu", qkv_bias=True)  # GQA, SwiGLU


@pytest.mark.parametrize("cfg", [BENCH, LLAMA], ids=["gpt", "llama"])
@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (2, 16)])
@torch.no_grad()
def test_forward_flops_match_counted(monkeypatch, B, T, cfg):
    model = tiny_model(**cfg).eval()
    c = Counter(model, monkeypatch)
    model(torch.randint(4, 23, (B, T)))
    assert c.linear == 2 * matmul_params(model.cfg) * B * T  # the formula's matmul part
    assert c.total == flops_forward(model.cfg, B, T)


@pytest.mark.parametrize("B,T,out_from", [(2, 9, 1), (3, 7, 6), (2, 16, 8)])
@torch.no_grad()
def test_forward_flops_with_out_from_match_counted(monkeypatch, B, T, out_from):
    """Logits for the last columns only: the last block's queries, proj, MLP and the head skip the rest."""
    model = tiny_model(**BENCH).eval()
    c = Counter(model, monkeypatch)
    model(torch.randint(4, 23, (B, T)), out_from=out_from)
    assert c.total == flops_forward(model.cfg, B, T, n_out=T - out_from) < flops_forward(model.cfg, B, T)


@torch.no_grad()
def test_rollout_flops_match_counted(monkeypatch):
    """The cached decode (prefill + one-token steps over the filled cache) and the full-recompute decode."""
    model = tiny_model(**WIDE).eval()
    B, P, N = 3, 6, 5
    ids, valid = left_pad([[1] + torch.randint(4, 23, (P - 1,)).tolist() for _ in range(B)], 0)
    c = Counter(model, monkeypatch)
    generate(model, ids, valid, N, eos_id=-1, pad_id=0, temperature=0.0)
    assert c.total == flops_generate(model.cfg, B, P, N)  # the prefill computes the last column's logits only
    c.linear = c.attention = 0
    generate_no_cache(model, ids, valid, N)
    assert c.total == flops_no_cache(model.cfg, B, P, N)


def test_kernel_recorder_sees_every_matmul_and_attention_call():
    """A forward runs 4 linears per block + the head, and one attention per block; a backward runs two
    matmuls per linear (input and weight gradients) and one attention backward per block."""
    model = tiny_model(**BENCH).eval()
    L = model.cfg.n_layer
    x = torch.randint(4, 23, (2, 9))
    rec = KernelRecorder()
    with rec:
        model(x).sum().backward()
    names = [f._schema.name.split("::")[-1] for f, _, _ in rec.calls]
    assert sum(n in KernelRecorder.MATMULS for n in names) == 3 * (4 * L + 1)
    assert sum("scaled_dot_product" in n for n in names) == 2 * L
    s, n_calls = kernel_floor(lambda: model(x), 1, lambda: None)
    assert n_calls == 4 * L + 1 + L and s > 0


def test_bench_runs_and_prints_json():
    cmd = [sys.executable, "bench.py", "--student-layers", "1", "--student-width", "16", "--student-heads", "2",
           "--teacher-layers", "1", "--teacher-width", "32", "--teacher-heads", "2", "--batch-size", "2",
           "--prompt-len", "5", "--new-tokens", "3", "--repeats", "1", "--matmul-size", "64", "--compile"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"device", "dtype", "matmul_peak_gflops", "rollout", "step_l1", "step_l0", "peak_mem_mb"} <= set(res)
    assert {"kv_cache_tok_s", "no_cache_tok_s", "speedup", "same_tokens", "decode_step_s"} <= set(res["rollout"])
    assert res["rollout"]["same_tokens"] is True and res["rollout"]["compiled_same_tokens"] is True
    # the decode step's kernel time is the decode's kernels minus the prefill's: at 3 new tokens of 2 rows a
    # difference of microseconds, whose sign is noise
    assert res["rollout"]["compile_s"] > 0 and math.isfinite(res["rollout"]["decode_step_kernel_s"])
    for lmbda in ("step_l1", "step_l0"):
        assert set(res[lmbda]) == {"rollout", "teacher", "student", "optimizer", "step"}
        assert all(set(part) == {"s", "gflop", "mfu"} and part["s"] > 0 for part in res[lmbda].values())
    assert res["step_l0"]["rollout"]["gflop"] == 0 < res["step_l1"]["rollout"]["gflop"]
    assert res["matmul_peak_gflops"] > 0 and res["batch"] == 2 and res["new_tokens"] == 3
    assert set(res["kernel_floor_l1"]) == {"rollout", "teacher", "student", "step"}
    for part, fl in res["kernel_floor_l1"].items():  # the kernels alone cannot take longer than the part
        assert 0 < fl["s"] and fl["kernels"] > 0 and (part == "step" or fl["s"] < 1.5 * res["step_l1"][part]["s"])


def test_bench_on_checkpoints_runs_and_prints_json(tmp_path):
    """bench.py --teacher DIR --student DIR: rollout tok/s eager and compiled, the step's parts and MFU, and the
    peak above start fused and unfused, at --new-tokens and twice as many."""
    teacher, student = make_ckpt(tmp_path / "t", 0, 2), make_ckpt(tmp_path / "s", 1, 1)
    r = subprocess.run([sys.executable, "bench.py", "--teacher", teacher, "--student", student, "--batch-size", "2",
                        "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1", "--matmul-size", "64", "--compile"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for N in (3, 6):
        m = res[f"new_tokens_{N}"]
        assert set(m["rollout_tok_s"]) == {"eager", "compiled"} and min(m["rollout_tok_s"].values()) > 0
        for v in (m["eager"], m["compiled"]):
            assert set(v["parts_s"]) == {"rollout", "teacher", "student", "optimizer"} and 0 < v["step_mfu"] < 1
        assert m["eager"]["step_gflop"] == m["compiled"]["step_gflop"]
        assert m["compile_s"] > 0 and m["peak_above_mb_unfused"] >= 0 and m["peak_above_mb_fused_top_k"] >= 0
        assert m["teacher_signal_mb_whole"] >= 0 and m["teacher_signal_mb_top_k"] >= 0


def test_teacher_signal_top_k_is_the_whole_logits_top_k():
    """bench's top-K teacher signal (made a chunk of positions at a time from the hidden states) holds the
    teacher's top-K log-probabilities, their ids and the rest's log-mass of its whole logits (losses.top_k_bins)."""
    from types import SimpleNamespace
    from losses import top_k_bins
    teacher = tiny_model(3, vocab_size=40).eval()
    B, T, c, k = 3, 9, 4, 5
    tokens = torch.randint(40, (B, T), generator=torch.Generator().manual_seed(0))
    batch = SimpleNamespace(tokens=tokens, pos=torch.arange(T).expand(B, T), valid=torch.ones(B, T, dtype=torch.bool),
                            prompt_len=c)
    whole = teacher_signal(teacher, batch, None)
    assert whole.shape == (B, T - c, 40)
    lp = F.log_softmax(whole.double(), -1).flatten(0, 1)
    _, bins = top_k_bins(lp, lp, k)
    top, ids, rest = teacher_signal(teacher, batch, teacher.head.weight, k, chunk=4)  # 4 does not divide 15
    assert ids.dtype == torch.int32 and top.shape == ids.shape == (B * (T - c), k) and rest.shape == (B * (T - c),)
    assert torch.equal(ids.long(), lp.topk(k, -1).indices)
    torch.testing.assert_close(top.double(), bins[:, :k], rtol=0, atol=1e-5)
    torch.testing.assert_close(rest.double(), bins[:, k], rtol=0, atol=1e-5)


def test_bench_samples_per_prompt_shares_prefills():
    """With 2 samples per prompt the lambda=1 step is also run unshared; sharing computes fewer FLOPs."""
    cmd = [sys.executable, "bench.py", "--student-layers", "1", "--student-width", "16", "--student-heads", "2",
           "--teacher-layers", "1", "--teacher-width", "32", "--teacher-heads", "2", "--batch-size", "4",
           "--samples-per-prompt", "2", "--prompt-len", "5", "--new-tokens", "3", "--repeats", "1",
           "--matmul-size", "64"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    shared, unshared = res["step_l1"], res["step_l1_unshared"]
    assert shared["teacher"]["gflop"] < unshared["teacher"]["gflop"]
    assert shared["rollout"]["gflop"] < unshared["rollout"]["gflop"]
    assert shared["student"]["gflop"] < unshared["student"]["gflop"]  # the student's prompts are shared too
    bad = subprocess.run(cmd[:-8] + ["--batch-size", "5", "--samples-per-prompt", "2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a multiple" in bad.stderr


@torch.no_grad()
def test_shared_prompt_teacher_flops_match_counted(monkeypatch):
    """teacher.score with K distinct prompts of B rows, as train_step scores (hidden states; the loss makes
    the logits): one prefill of K rows (the last column only), then the completions of all B rows over their
    cached prompt: the count bench.py uses."""
    from rollout import pack, shared_prompts
    from teacher import score
    model = tiny_model(**WIDE).eval()
    B, K, P, N = 6, 2, 5, 4
    distinct = [[1] + torch.randint(4, 23, (P - 1,)).tolist() for _ in range(K)]
    b = pack([p for p in distinct for _ in range(B // K)], [torch.randint(4, 23, (N,)).tolist() for _ in range(B)], 0)
    c = Counter(model, monkeypatch)
    score(model, b, start=P, groups=shared_prompts(b), hidden_states=True)
    assert c.total == (flops_forward(model.cfg, K, P, n_out=1, head=False)
                       + flops_forward(model.cfg, B, N, k_start=P, head=False))
    assert c.total == flops_score(model.cfg, B, P, P + N, prefill_rows=K, head=False)
    c.linear = c.attention = 0
    score(model, b, start=P, hidden_states=True)  # no groups: every row runs its prompt
    assert c.total == flops_score(model.cfg, B, P, P + N, head=False) > flops_score(model.cfg, B, P, P + N,
                                                                                    prefill_rows=K, head=False)


def test_a_failing_kernel_replay_leaves_the_timings(monkeypatch, capsys):
    """On a backend whose kernels reject random inputs the bound is skipped with a line, not a crash."""
    import bench

    def fail(*a, **k):
        raise RuntimeError("kernel wants real contents")
    monkeypatch.setattr(bench, "kernel_floor", fail)
    bench.main(["--student-layers", "1", "--student-width", "16", "--student-heads", "2", "--teacher-layers", "1",
                "--teacher-width", "32", "--teacher-heads", "2", "--batch-size", "2", "--prompt-len", "5",
                "--new-tokens", "3", "--repeats", "1", "--matmul-size", "64"])
    out = capsys.readouterr().out
    assert "the kernel replay failed (RuntimeError: kernel wants real contents)" in out
    res = json.loads(out.strip().splitlines()[-1])
    assert res["kernel_floor_l1"] is None and res["step_l1"]["step"]["s"] > 0


@torch.no_grad()
def test_shared_prompt_rollout_flops_match_counted(monkeypatch):
    model = tiny_model(**WIDE).eval()
    B, K, P, N = 6, 3, 5, 4
    distinct = [[1] + torch.randint(4, 23, (P - 1,)).tolist() for _ in range(K)]
    ids, valid = left_pad([p for p in distinct for _ in range(B // K)], 0)
    c = Counter(model, monkeypatch)
    generate(model, ids, valid, N, eos_id=-1, pad_id=0, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert c.total == flops_generate(model.cfg, B, P, N, prefill_rows=K) < flops_generate(model.cfg, B, P, N)

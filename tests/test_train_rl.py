"""The RL arm and distillation plus reward (train.py --stage rl, --reward-weight): the policy gradient
against REINFORCE written by hand, a zero gradient when a group's rewards are equal, the hybrid at weight 0
against the sampled loss bit for bit, the logged FLOPs against bench.py's count, and bad input."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import bench
import train
from conftest import make_ckpt, run, tiny_model
from data.countdown import CharFormat, load_split, load_tokenizer
from losses import distill_objective, group_success, reward_advantage, rl_objective
from model import GradKV, distinct_rows, forward_from
from rollout import Batch, generate, left_pad
from teacher import head_weight, hidden


def make_run(argv, teacher=None):
    """A train.Run of one CPU process for these flags (pad 0, eos 2)."""
    args = train.parse_args([*argv, "--out", os.devnull])
    return train.Run(args, None, None, False, None, 0, 1, torch.device("cpu"), 0, 2,
                     head_weight(teacher) if teacher is not None else None)


RL_RUN = make_run(["--stage", "rl", "--samples-per-prompt", "4"])


def student_loss(model, batch, objective, groups=None):
    """train_step's student forward: objective(h, W) as the head, prompts shared when groups are given."""
    return forward_from(model, batch.tokens, batch.pos, batch.valid, batch.prompt_len, head=objective,
                        groups=groups, cache_cls=GradKV)


def by_hand_advantage(rewards, k, norm):
    out = []
    for i in range(0, len(rewards), k):
        g = rewards[i:i + k]
        mean = sum(g) / k
        std = (sum((r - mean) ** 2 for r in g) / k) ** 0.5
        out += [r if norm == "none" else (r - mean) / (std + 1e-6 if norm == "std" else 1) for r in g]
    return out


@pytest.mark.parametrize("norm", ["mean", "std", "none"])
def test_rl_gradient_is_reinforce_by_hand(norm):
    """d loss / d logits[b, t] = G[b, t] = -A_b m_bt (onehot(x_bt) - softmax(logits_bt)) / n_tok, in float64;
    the loss takes hidden states h and head weight W (logits = h W^T): d/dh = G W, d/dW = G^T h."""
    torch.manual_seed(0)
    B, P, T, V, k, d = 6, 2, 5, 7, 3, 4
    h, w = torch.randn(B, T, d, requires_grad=True), torch.randn(V, d, requires_grad=True)
    logits = (h @ w.T).detach()
    tokens = torch.randint(V, (B, P + T))
    lengths = torch.tensor([5, 3, 1, 4, 5, 2])
    mask = torch.zeros(B, P + T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, P:P + n] = True
    old = torch.zeros(B, P + T)
    old[:, P:] = F.log_softmax(logits, -1).gather(-1, tokens[:, P:, None]).squeeze(-1)
    batch = Batch(tokens, torch.ones_like(mask), mask, P, old, torch.ones(B, dtype=torch.bool))
    rewards = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    adv = reward_advantage(torch.tensor(rewards), k, norm)
    assert adv.tolist() == pytest.approx(by_hand_advantage(rewards, k, norm), abs=1e-6)
    n_tok = int(lengths.sum())
    rl_objective(h, w, batch, n_tok, RL_RUN, reward_adv=adv)[0].backward()

    x = tokens[:, P:]
    a = torch.tensor(by_hand_advantage(rewards, k, norm), dtype=torch.float64)
    p = torch.softmax(logits.double(), -1)
    G = -(a[:, None, None] * mask[:, P:, None] * (F.one_hot(x, V).double() - p)) / n_tok
    torch.testing.assert_close(h.grad.double(), G @ w.detach().double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad.double(), torch.einsum("btv,btd->vd", G, h.detach().double()), rtol=1e-5,
                               atol=1e-7)
    assert h.grad.abs().sum() > 0


def sampled_batch(model, k=4, n_prompts=2, n_new=6):
    tok = load_tokenizer()
    fmt = CharFormat(tok)
    prompts = [fmt.prompt_ids(n, t) for n, t, _ in load_split("train")[:n_prompts] for _ in range(k)]
    ids, valid = left_pad(prompts, fmt.pad_id)
    with torch.no_grad():
        return generate(model, ids, valid, n_new, fmt.eos_ids, fmt.pad_id, temperature=1.0,
                        generator=torch.Generator().manual_seed(0))


def rl_backward(model, batch, adv):
    loss, _ = student_loss(model, batch, lambda h, w: rl_objective(h, w, batch, batch.mask.sum(), RL_RUN,
                                                                   reward_adv=adv))
    loss.backward()
    return loss


@pytest.mark.parametrize("norm", ["mean", "std"])
@pytest.mark.parametrize("reward", [0.0, 1.0])
def test_equal_rewards_give_zero_gradient(norm, reward):
    model = tiny_model()
    batch = sampled_batch(model)
    adv = reward_advantage(torch.full((len(batch.tokens),), reward), 4, norm)
    rl_backward(model, batch, adv)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
    # and unequal rewards move it
    model.zero_grad()
    adv = reward_advantage(torch.tensor([1.0, 0, 0, 0, 0, 0, 1, 1]), 4, norm)
    rl_backward(model, batch, adv)
    assert sum(torch.count_nonzero(p.grad) for p in model.parameters()) > 0


def test_hybrid_at_reward_weight_zero_is_the_sampled_loss_exactly():
    student, teacher = tiny_model(seed=1), tiny_model(seed=2)
    batch = sampled_batch(student)
    with torch.no_grad():
        t_h = teacher(batch.tokens, batch.pos, batch.valid, out_from=batch.prompt_len - 1, head=hidden)[:, :-1]
    n_tok = batch.mask.sum()
    reward_adv = reward_advantage(torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1]), 4, "std")

    def loss_and_grads(weight, adv):
        run = make_run(["--loss", "sampled", "--reward-weight", str(weight), "--samples-per-prompt", "4"], teacher)
        student.zero_grad()
        loss, _ = student_loss(student, batch, lambda h, w: distill_objective(h, w, batch, n_tok, run, t_h, adv))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in student.parameters()]

    plain, g_plain = loss_and_grads(0, None)
    hybrid0, g0 = loss_and_grads(0, reward_adv)
    assert torch.equal(plain, hybrid0) and all(torch.equal(a, b) for a, b in zip(g_plain, g0))
    hybrid1, g1 = loss_and_grads(1, reward_adv)  # the reward term is live: it changes the loss by its own PG
    student.zero_grad()
    pg = rl_backward(student, batch, reward_adv) * batch.mask.sum() / n_tok
    torch.testing.assert_close(hybrid1, plain + pg.detach(), rtol=1e-5, atol=1e-6)


def test_logged_step_flops_equal_bench_count(monkeypatch):
    """train_step's FLOPs, counted from the batch it built (prompt length, decode steps, distinct prompts),
    equal bench.py's count from its nominal shapes, for every step bench.py times (l1_unshared: bench makes
    every row its own prompt for the step, through rollout.distinct_rows)."""
    import rollout
    seen = []
    real = train.train_step

    def spy(step, rows, model, teacher, optimizer, run):
        share = rollout.distinct_rows is distinct_rows  # which variant bench is running
        out = real(step, rows, model, teacher, optimizer, run)
        seen.append((model.cfg, teacher.cfg, share, out["on_policy_frac"], out["flops"]))
        return out
    monkeypatch.setattr(train, "train_step", spy)
    B, P, N, S = 4, 5, 3, 2
    bench.main(["--student-layers", "1", "--student-width", "16", "--student-heads", "2", "--teacher-layers", "2",
                "--teacher-width", "32", "--teacher-heads", "2", "--batch-size", str(B), "--prompt-len", str(P),
                "--new-tokens", str(N), "--samples-per-prompt", str(S), "--repeats", "1", "--matmul-size", "64"])
    assert {(share, lmbda) for *_, share, lmbda, _ in seen} == {(True, 1), (True, 0), (False, 1)}
    for scfg, tcfg, share, lmbda, flops in seen:
        assert flops == bench.step_flops(scfg, tcfg, B, P, N, B // S if share else B, lmbda)["step"]


def test_rl_run_logs_reward_flops_and_samples(tmp_path):
    ckpt = make_ckpt(tmp_path / "student", 2, 1)
    out = tmp_path / "rl"
    run("train.py", "--stage", "rl", "--student", ckpt, "--samples-per-prompt", "4", "--adv-norm", "std",
        "--batch-size", "8", "--max-new-tokens", "6", "--steps", "2", "--eval-n", "8", "--eval-every", "0",
        "--warmup", "0", "--out", str(out))
    recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    steps = [x for x in recs if "loss" in x]
    assert [x["samples"] for x in steps] == [8, 16]  # every row sampled by the student, cumulative
    assert 0 < steps[0]["flops"] < steps[1]["flops"] and all(0 <= x["reward"] <= 1 for x in steps)
    assert all(x["reward"] <= x["group_success"] <= 1 for x in steps)  # a group holds a success if any sample does
    assert "student_test_accuracy_after" in recs[-1]


def test_group_success_is_the_share_of_sampled_prompts_with_a_solved_sample():
    reward = torch.tensor([0.0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0])  # three prompts, four samples each
    sampled = torch.tensor([True] * 8 + [False] * 4)  # the third prompt's rows are given ones
    assert group_success(reward, sampled, 4, 0, 1) == 0.5
    assert group_success(reward, torch.ones(12, dtype=torch.bool), 4, 0, 1) == pytest.approx(2 / 3)
    assert group_success(reward, torch.zeros(12, dtype=torch.bool), 4, 0, 1) is None


@pytest.mark.parametrize("argv,msg", [
    (["--stage", "rl"], "--adv-norm mean compares a prompt's samples"),
    (["--stage", "rl", "--adv-norm", "std", "--samples-per-prompt", "1"], "--adv-norm std compares"),
    (["--loss", "sampled", "--reward-weight", "-0.5"], "--reward-weight must be >= 0"),
    (["--loss", "rkl", "--reward-weight", "1"], "--reward-weight needs --stage distill --loss sampled"),
    (["--stage", "rl", "--samples-per-prompt", "4", "--temperature", "0.7"], "needs the student's own distribution"),
])
def test_bad_rl_input_fails_with_one_line(tmp_path, argv, msg):
    r = run("train.py", *argv, "--out", str(tmp_path / "x"), check=False)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("loss", ["rkl", "sampled"])
def test_shared_prompt_student_forward_equals_every_row_on_its_own(loss, monkeypatch):
    """--samples-per-prompt 3: the student's prompts run once each (their keys and values gathered into
    their rows, gradient through them) with the same loss, logged reverse KL and gradients as running every
    row, on prompts of two lengths (left padding) and completions that end at different steps."""
    from model import prefill
    student, teacher = tiny_model(seed=1), tiny_model(seed=2, n_layer=3)
    tok = load_tokenizer()
    fmt = CharFormat(tok)
    by_len = {len(fmt.prompt_ids(n, t)): (n, t, a) for n, t, a in load_split("train")[:200]}
    probs = [by_len[min(by_len)], by_len[max(by_len)]]
    prompts = [fmt.prompt_ids(n, t) for n, t, _ in probs for _ in range(3)]
    assert len({len(p) for p in prompts}) == 2
    ids, valid = left_pad(prompts, fmt.pad_id)
    with torch.no_grad():
        stops = [tok.token_to_id(c) for c in "123"]  # a random model rarely says EOS: stop at digits too
        batch = generate(student, ids, valid, 8, stops, fmt.pad_id, temperature=1.0,
                         generator=torch.Generator().manual_seed(3))
        t_h = teacher(batch.tokens, batch.pos, batch.valid, out_from=batch.prompt_len - 1, head=hidden)[:, :-1]
    assert len(set(batch.mask.sum(1).tolist())) > 1  # the rows end at different steps
    import model
    run = make_run(["--loss", loss, "--samples-per-prompt", "3"], teacher)
    prefills = []
    monkeypatch.setattr(model, "prefill", lambda *a, **k: prefills.append(len(a[5][0])) or prefill(*a, **k))
    n_tok = batch.mask.sum()
    out = {}
    for share in (False, True):
        student.zero_grad()
        groups = distinct_rows(batch.tokens[:, :batch.prompt_len], batch.valid[:, :batch.prompt_len]) if share else None
        loss_val, rkl = student_loss(student, batch, lambda h, w: distill_objective(h, w, batch, n_tok, run, t_h),
                                     groups)
        loss_val.backward()
        out[share] = loss_val.detach(), rkl, [p.grad.clone() for p in student.parameters()]
    assert prefills == [2]  # the shared path ran, on the 2 distinct prompts
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-5, atol=1e-6)
    for a, b in zip(out[True][2], out[False][2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(a.abs().sum() > 0 for a in out[True][2])

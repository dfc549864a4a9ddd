"""--teacher self (selfdistill.py) against independent references: the self-teacher's scores equal a plain
forward of the frozen model over [context prompt + completion], row by row and unpadded; a step's loss equals
a float64 divergence between the student's and that reference's distributions; the frozen copy never moves
while the live teacher is the training student; 1 process computes what 2 do; bad flags are refused."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train
from checkpoint import load_pretrained
from conftest import make_ckpt, one_line_error, run
from data.countdown import BOS, load_tokenizer, prompt_text

FAST = ["--batch-size", "8", "--max-new-tokens", "8", "--eval-n", "8", "--eval-every", "0", "--warmup", "0"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("ckpts") / "student", 2, 2, sharpen=20.0)


def context_ids(problem):
    """The default char context, written out here: [BOS] + "<solution> <numbers>><target>:"."""
    tok = load_tokenizer()
    numbers, target, solution = problem
    return [tok.token_to_id(BOS)] + tok.encode(f"{solution} {prompt_text(numbers, target)}").ids


def plain_ids(problem):
    tok = load_tokenizer()
    return [tok.token_to_id(BOS)] + tok.encode(prompt_text(problem[0], problem[1])).ids


def log_probs(model, prompt, completion):
    """float64 log-softmax of a plain unpadded forward where the model predicts each completion token [N, V]."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion]))[0, len(prompt) - 1:-1]
    return F.log_softmax(logits.double(), -1)


def record_steps(monkeypatch):
    """Every teacher_scores call of the training steps (the batch the teacher scored, its rows, its output, the
    head it used and the teacher's parameters then) and every step's unrounded metrics."""
    got = dict(calls=[], steps=[])
    real_scores, real_step = train.teacher_scores, train.train_step

    def scores(teacher, batch, rows, groups, run, *reuse):
        out = real_scores(teacher, batch, rows, groups, run, *reuse)
        # one process: a parameter's local shard is all of it (no collective inside the step)
        params = {k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
                  for k, v in teacher.named_parameters()}
        got["calls"].append(dict(batch=batch, rows=rows, h=out[0].clone(), w=run.t_head.clone(), params=params))
        return out
    monkeypatch.setattr(train, "teacher_scores", scores)
    monkeypatch.setattr(train, "train_step", lambda *a: (lambda m: got["steps"].append(m) or m)(real_step(*a)))
    return got


def completion(batch, i):
    """Row i's completion tokens (the masked ones: through the first EOS), as a list."""
    P = batch.prompt_len
    return batch.tokens[i, P:][batch.mask[i, P:]].tolist()


SLOW = pytest.mark.slow  # each a training run of ~40 s on the shared 2-core CPU: the default run keeps one per property


@pytest.mark.parametrize("extra", [[], pytest.param(["--micro-batch-size", "4", "--samples-per-prompt", "2"], marks=SLOW),
                                   pytest.param(["--lmbda", "0.5", "--micro-batch-size", "3"], marks=SLOW)],
                         ids=["plain", "micro-spp2", "l0.5"])
def test_self_teacher_scores_a_plain_forward_of_the_frozen_model_on_context_plus_completion(student, tmp_path,
                                                                                            monkeypatch, extra):
    """(a) At every completion token of every row, the self-teacher's logits (its hidden states times the head
    the loss uses) equal the frozen starting model's full forward of [context prompt + the row's completion],
    one row at a time without padding; the student's completion is the one it sampled from the plain prompt."""
    got = record_steps(monkeypatch)
    train.main(["--teacher", "self", "--student", student, "--out", str(tmp_path / "run"), "--steps", "2", *FAST,
                *extra])
    frozen = load_pretrained(student)
    calls = [c for c in got["calls"] if c["rows"] is not None]  # training steps only: evals pass no rows
    mbs = int(extra[extra.index("--micro-batch-size") + 1]) if "--micro-batch-size" in extra else 8
    assert len(calls) == 2 * -(-8 // mbs)
    n = 0
    for c in calls:
        b = c["batch"]
        for i, row in enumerate(c["rows"]):
            comp = completion(b, i)
            assert b.tokens[i, :b.prompt_len][b.valid[i, :b.prompt_len]].tolist() == context_ids(row.problem)
            if not row.on_policy:  # a given row: the ground truth
                assert comp == load_tokenizer().encode(row.problem[2]).ids + [2]
            ref = log_probs(frozen, context_ids(row.problem), comp)
            got_logits = c["h"][i][b.mask[i, b.prompt_len:]] @ c["w"].T
            torch.testing.assert_close(F.log_softmax(got_logits.double(), -1), ref, rtol=1e-4, atol=1e-4)
            n += 1
    assert n == 2 * 8


@pytest.mark.parametrize("loss,extra", [("rkl", []),
                                        pytest.param("fkl", ["--micro-batch-size", "4", "--samples-per-prompt", "2"],
                                                     marks=SLOW),
                                        pytest.param("jsd", ["--lmbda", "0.5"], marks=SLOW), ("sampled", [])])
def test_one_step_loss_is_the_float64_divergence_to_the_reference_self_teacher(student, tmp_path, monkeypatch,
                                                                               loss, extra):
    """(b) The first step's loss: the divergence between the student's distribution after the plain prompt and
    the frozen model's after the context prompt, in float64 from plain unpadded forwards, summed over the step's
    completion tokens / their count (the sampled estimator: log p_S - log p_T of the sampled token)."""
    got = record_steps(monkeypatch)
    train.main(["--teacher", "self", "--student", student, "--out", str(tmp_path / "run"), "--steps", "1",
                "--loss", loss, *FAST, *extra])
    model = load_pretrained(student)  # the student at step 1 is the frozen copy: the same weights
    total, count = 0.0, 0
    for c in [c for c in got["calls"] if c["rows"] is not None]:
        for i, row in enumerate(c["rows"]):
            comp = completion(c["batch"], i)
            s, t = log_probs(model, plain_ids(row.problem), comp), log_probs(model, context_ids(row.problem), comp)
            if loss == "rkl":
                d = (s.exp() * (s - t)).sum(-1)
            elif loss == "fkl":
                d = (t.exp() * (t - s)).sum(-1)
            elif loss == "jsd":  # beta 0.5
                m = torch.logsumexp(torch.stack([s, t]), 0) - torch.log(torch.tensor(2.0, dtype=torch.float64))
                d = 0.5 * (t.exp() * (t - m)).sum(-1) + 0.5 * (s.exp() * (s - m)).sum(-1)
            else:
                idx = torch.tensor(comp)[:, None]
                d = (s.gather(-1, idx) - t.gather(-1, idx)).squeeze(-1)
            total, count = total + d.sum().item(), count + len(comp)
    assert count > 0 and total / count > 1e-3  # the context changes the teacher: not a vacuous match
    assert got["steps"][0]["loss"] == pytest.approx(total / count, rel=1e-4)


def test_frozen_self_teacher_stays_the_start_while_the_live_one_is_the_training_student(student, tmp_path,
                                                                                           monkeypatch):
    """(c) Every step's frozen teacher holds the starting weights while the student moves; the live teacher of
    step k holds the student's weights after step k - 1 (its checkpoint), so it moves with it."""
    start = load_file(os.path.join(student, "model.safetensors"))
    for mode in ("frozen", "live"):
        got = record_steps(monkeypatch)
        out = str(tmp_path / mode)
        train.main(["--teacher", "self", "--self-teacher", mode, "--student", student, "--out", out, "--steps", "3",
                    "--save-every", "1", "--keep", "5", "--lr", "1e-2", *FAST])
        monkeypatch.undo()
        calls = [c for c in got["calls"] if c["rows"] is not None]
        assert len(calls) == 3
        for k, c in enumerate(calls):
            ref = start if k == 0 or mode == "frozen" else load_file(
                os.path.join(out, "ckpt", f"step_{k:06d}", "model.safetensors"))
            assert c["params"].keys() == ref.keys()
            for name in ref:
                assert torch.equal(c["params"][name], ref[name]), (mode, k, name)
            assert torch.equal(c["w"], ref["head.weight"])  # the head the loss used is the teacher's own
        trained = load_file(os.path.join(out, "ckpt", "step_000003", "model.safetensors"))
        assert not torch.equal(trained["head.weight"], start["head.weight"])  # the student did move
        if mode == "live":
            assert not torch.equal(calls[2]["params"]["head.weight"], calls[1]["params"]["head.weight"])


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [m for m in map(json.loads, f) if "loss" in m]


@SLOW
@pytest.mark.parametrize("extra", [["--samples-per-prompt", "2", "--micro-batch-size", "2"],
                                   ["--self-teacher", "live", "--lmbda", "0.5"]], ids=["frozen-spp2-micro", "live-l0.5"])
def test_two_processes_compute_what_one_does(student, tmp_path, extra):
    """(d) torchrun with 2 processes (rows r::2, FSDP) against 1: the same loss, reverse KL and gradient norm
    every step, and the same weights up to fp32 reduction order."""
    outs = {}
    for n in (1, 2):
        outs[n] = str(tmp_path / f"np{n}")
        run("train.py", "--teacher", "self", "--student", student, "--out", outs[n], "--steps", "3", "--lr", "3e-3",
            *FAST, *extra, nproc=n)
    one, two = metrics(outs[1]), metrics(outs[2])
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for k in ("loss", "student_rkl", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    w0 = load_file(os.path.join(student, "model.safetensors"))
    wa, wb = (load_file(os.path.join(o, "ckpt", "step_000003", "model.safetensors")) for o in outs.values())
    for k in w0:
        move = (wa[k] - w0[k]).abs().max().item()
        assert move > 0 and (wa[k] - wb[k]).abs().max().item() <= 0.01 * move, k


@SLOW
def test_flops_count_the_teachers_context_prompts(student, tmp_path, monkeypatch):
    """The logged FLOPs count the self-teacher's forward over its longer context batch: a self-distillation
    step costs what the same step with a separate teacher of the same shape scoring the plain batch costs, plus
    exactly the difference of the two scoring forwards."""
    from flops import flops_score
    got = record_steps(monkeypatch)
    train.main(["--teacher", "self", "--student", student, "--out", str(tmp_path / "self"), "--steps", "1", *FAST])
    monkeypatch.undo()
    ref = record_steps(monkeypatch)
    train.main(["--teacher", student, "--student", student, "--out", str(tmp_path / "sep"), "--steps", "1", *FAST])
    (c,), (r,) = [x for x in got["calls"] if x["rows"]], [x for x in ref["calls"] if x["rows"]]
    assert completion(c["batch"], 0) == completion(r["batch"], 0)  # the same rollouts
    cfg, tb, sb = load_pretrained(student).cfg, c["batch"], r["batch"]
    extra = (flops_score(cfg, 8, tb.prompt_len, tb.tokens.size(1), 8, head=False)
             - flops_score(cfg, 8, sb.prompt_len, sb.tokens.size(1), 8, head=False))
    assert extra > 0 and got["steps"][0]["flops"] == pytest.approx(ref["steps"][0]["flops"] + extra, rel=1e-9)


@pytest.mark.parametrize("flags,says", [
    (["--seq-kd", "--lmbda", "0.5"], "--seq-kd"),
    (["--rollout", "skd"], "--rollout skd"),
    (["--cross-tokenizer", "on"], "--cross-tokenizer"),
    (["--stage", "rl", "--samples-per-prompt", "2"], "--stage distill"),
    (["--self-context", "{solution}"], "{prompt}"),
    (["--self-context", "{prompt} {answer}"], "{prompt}"),
    (["--self-context", "{prompt"], "--self-context"),
])
def test_bad_self_distillation_flags_are_refused_with_one_line(student, flags, says, capsys):
    """(e) Combinations that cannot work stop before anything runs: exit 2 and one line saying why."""
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--teacher", "self", "--student", student, *flags])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: --" in last and says in last, last  # argparse names the program after sys.argv[0]


def test_self_flags_without_a_self_teacher_are_refused(student, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--student", student, "--self-teacher", "live"])
    assert "only with --teacher self" in capsys.readouterr().err


@pytest.mark.parametrize("template,says", [("{prompt} solution: {solution}", "characters the char tokenizer"),
                                          ("{solution} {solution} {solution} {prompt}", "over the model's context")])
def test_a_context_the_model_cannot_read_fails_before_training(student, tmp_path, template, says):
    """Letters in a char model's context, or a context too long for the model, stop at setup: one line, no run
    directory written."""
    out = tmp_path / "run"
    r = run("train.py", "--teacher", "self", "--student", student, "--out", str(out), "--steps", "1",
            "--self-context", template, *FAST, check=False)
    assert says in one_line_error(r) and not out.exists()


def test_probe_with_the_plain_prompt_as_context_measures_the_plain_model_twice(student):
    """selfdistill.probe: a context of just {prompt} renders the plain prompt, so both rows agree; the default
    context (the solution first) changes what the model predicts."""
    from selfdistill import probe
    same, ctx = probe(student, "{prompt}"), probe(student)
    assert same["plain"] == pytest.approx(same["context"], abs=1e-6)
    assert ctx["plain"] == pytest.approx(same["plain"], abs=1e-6) and ctx["context"][1] != pytest.approx(ctx["plain"][1])

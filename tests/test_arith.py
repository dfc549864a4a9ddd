"""data/arith.py (the continual-learning recipe's second task) and train.py's --task / --sft-mix: values
against data.countdown's independent expression parser, disjoint splits, the format's ids, and the mixed
loss against a float64 reference (reverse KL on the on-policy rows + cross-entropy on the mixed-in rows)."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import train
from checkpoint import load_pretrained
from conftest import make_ckpt, one_line_error, run
from data import arith
from data.countdown import _eval_tokens, _expr_tokens, load_tokenizer


def test_values_match_an_independent_parser_and_splits_are_disjoint():
    splits = {s: arith.load_split(s) for s in ("train", "val", "test")}
    exprs = {s: {e for e, _, _ in p} for s, p in splits.items()}
    assert sum(map(len, exprs.values())) == 20 ** 3 * 9 and not (exprs["train"] & exprs["test"])
    assert not (exprs["train"] & exprs["val"]) and not (exprs["val"] & exprs["test"])
    for e, v, a in splits["test"][:1000] + splits["val"][:500]:
        assert _eval_tokens(_expr_tokens(e)) == v and a == str(v)


def test_format_round_trips_and_verifies_text_exactly():
    fmt = arith.ArithFormat(load_tokenizer())
    e, v, a = "13*2-14", 12, "12"
    assert fmt.decode(fmt.prompt_ids(e, v)[1:]) == "13*2-14=" and fmt.answer_ids(a)[-1] == fmt.eos_ids[0]
    assert fmt.verify(e, v, "12") and not fmt.verify(e, v, "12 ") and not fmt.verify(e, v, "6+6")
    assert fmt.well_formed("-4") and not fmt.well_formed("4-")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return make_ckpt(d / "teacher", 1, 2, sharpen=20.0), make_ckpt(d / "student", 2, 1)


FAST = ["--batch-size", "8", "--max-new-tokens", "6", "--eval-n", "8", "--eval-every", "0", "--warmup", "0"]


def test_sft_mix_loss_is_reverse_kl_on_student_rows_plus_cross_entropy_on_the_mixed_in_task(ckpts, tmp_path,
                                                                                           monkeypatch):
    teacher, student = ckpts
    packed = []
    real = train.make_batch
    monkeypatch.setattr(train, "make_batch", lambda step, rows, *a, **kw: (
        lambda b: step == 0 and packed.append(b[0]) or b)(real(step, rows, *a, **kw)))
    out = str(tmp_path / "run")
    train.main(["--teacher", teacher, "--student", student, "--out", out, "--sft-mix", "arith", "--lmbda", "0.5",
                "--steps", "1", *FAST])
    b = packed[0]
    fmt = arith.ArithFormat(load_tokenizer())
    texts = [fmt.decode(r) for r in b.tokens[4:, :b.prompt_len].tolist()]
    assert all(t.replace("[PAD]", "").endswith("=") for t in texts) and b.on_policy.tolist() == [True] * 4 + [False] * 4
    s, t = load_pretrained(student).double(), load_pretrained(teacher).double()
    with torch.no_grad():
        ls, lt = (F.log_softmax(m(b.tokens, b.pos, b.valid)[:, :-1], -1) for m in (s, t))
    m, tgt = b.mask[:, 1:], b.tokens[:, 1:]
    on = m & b.on_policy[:, None]
    rkl = (ls.exp() * (ls - lt)).sum(-1)[on].sum()
    ce = -ls.gather(-1, tgt[..., None])[..., 0][m & ~b.on_policy[:, None]].sum()
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rec = [json.loads(l) for l in f if '"loss"' in l][0]
    assert rec["loss"] == pytest.approx(((rkl + ce) / m.sum()).item(), rel=1e-4)
    assert rec["reward"] <= 1 and rec["student_rkl"] == pytest.approx((rkl / on.sum()).item(), rel=1e-4)
    last = json.loads(open(os.path.join(out, "metrics.jsonl")).read().splitlines()[-1])
    assert 0 <= last["mix_test_accuracy_after"] <= 1 and "mix_test_accuracy_before" in last


def test_task_rows_and_a_step_directory_as_teacher(ckpts, tmp_path):
    """--task arith trains SFT on arithmetic; a run's step directory is a teacher like any checkpoint, and a
    missing one is one line."""
    teacher, student = ckpts
    out = str(tmp_path / "sft")
    run("train.py", "--stage", "sft", "--task", "arith", "--student", student, "--out", out, "--steps", "2",
        "--save-every", "1", *FAST)
    last = json.loads(open(os.path.join(out, "metrics.jsonl")).read().splitlines()[-1])
    assert "student_test_accuracy_after" in last
    step1 = os.path.join(out, "ckpt", "step_000001")
    assert os.path.isdir(step1)
    run("train.py", "--student", os.path.join(out, "ckpt", "step_000002"), "--teacher", step1, "--out",
        str(tmp_path / "rec"), "--sft-mix", "arith", "--lmbda", "0.5", "--steps", "1", *FAST)
    line = one_line_error(run("train.py", "--teacher", os.path.join(out, "ckpt", "step_000009"), "--out",
                              str(tmp_path / "x"), "--steps", "1", *FAST, check=False))
    assert "does not exist" in line


@pytest.mark.parametrize("args,want", [(["--task", "arith"], "needs --stage sft"),
                                       (["--sft-mix", "arith", "--lmbda", "1"], "--sft-mix needs"),
                                       (["--stage", "sft", "--task", "arith", "--augment"], "without --seq-kd")])
def test_bad_task_flags_are_one_line(tmp_path, args, want):
    assert want in one_line_error(run("train.py", "--out", str(tmp_path / "r"), *args, check=False))

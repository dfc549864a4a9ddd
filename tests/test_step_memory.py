"""The memory levers of a training step change nothing but memory: --micro-batch-size (the rows in slices,
their gradients accumulated, the loss still over the step's completion tokens) and
--activation-checkpointing (each block recomputed in backward) give the gradients of one whole forward
and backward, for every stage and loss, in one process and in two."""
import os

import pytest
import torch
import torch.distributed as dist

import train
from conftest import DISTILL_ARGS, run, tiny_model
from data.countdown import CharFormat, load_split, load_tokenizer
from rollout import step_rows
from teacher import head_weight


class GradCapture:
    """An optimizer that keeps the gradients train_step made instead of stepping."""

    def __init__(self, params):
        self.params, self.param_groups = list(params), [{}]

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


@pytest.fixture(scope="module", autouse=True)
def group_of_one():
    """train_step sums its metrics over ranks: a process group of one, gone afterwards (train.main, run
    in-process by other tests, starts its own)."""
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if own:
        dist.destroy_process_group()


def step_grads(argv, checkpointing=False):
    """(metrics, gradients) of train_step's first step on tiny models, for these train.py flags."""
    args = train.parse_args([*argv, "--batch-size", "8", "--max-new-tokens", "6", "--out", os.devnull])
    fmt = CharFormat(load_tokenizer())
    student, teacher = tiny_model(seed=1), tiny_model(seed=2, n_layer=3).requires_grad_(False)
    student.checkpoint_blocks = checkpointing
    calls = []
    student.blocks[0].register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    run = train.Run(args, fmt, fmt, False, None, 0, 1, torch.device("cpu"), fmt.pad_id, fmt.eos_ids,
                    head_weight(teacher))
    rows = step_rows(load_split("train"), 0, args, train.on_policy_rows(args), fmt, 0, 1)
    opt = GradCapture(student.parameters())
    real = train.rewards
    train.rewards = lambda batch, rows, fmt: (torch.arange(len(rows)) % 3 == 0).float()  # a random model solves none
    try:
        m = train.train_step(0, rows, student, teacher if args.stage == "distill" or args.seq_kd else None, opt, run)
    finally:
        train.rewards = real
    m["block0_grad_calls"] = sum(calls)  # with grad: the student's forward, and its recompute in backward
    return m, opt.grads


CASES = [["--stage", "sft"], ["--stage", "sft", "--seq-kd"], ["--stage", "rl", "--samples-per-prompt", "4"],
         ["--loss", "rkl"], ["--loss", "fkl", "--lmbda", "0.5", "--seq-kd"], ["--loss", "jsd", "--lmbda", "0.5"],
         ["--loss", "sampled"], ["--loss", "sampled", "--reward-weight", "1", "--samples-per-prompt", "2"],
         ["--loss", "skew_fkl", "--beta", "0.1", "--samples-per-prompt", "2"],
         ["--loss", "rkl", "--rollout", "skd", "--skd-top-k", "3"]]


@pytest.mark.parametrize("argv", CASES, ids=lambda a: " ".join(a))
@pytest.mark.parametrize("micro,checkpointing", [(3, False), (0, True), (2, True)])
def test_micro_batches_and_recompute_give_the_whole_steps_gradients(argv, micro, checkpointing):
    whole, g_whole = step_grads(argv)
    sliced, g_sliced = step_grads([*argv, "--micro-batch-size", str(micro)], checkpointing)
    assert sliced["loss"] == pytest.approx(whole["loss"], rel=1e-5, abs=1e-7)
    assert sliced["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
    if "student_rkl" in whole and whole["student_rkl"] is not None:
        assert sliced["student_rkl"] == pytest.approx(whole["student_rkl"], rel=1e-5, abs=1e-7)
    for a, b in zip(g_whole, g_sliced):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in g_whole)
    if checkpointing:  # each slice's first block ran twice: forward, and again in backward (prompts unshared)
        assert sliced["block0_grad_calls"] == 2 * len(range(0, 8, micro or 8))
    if micro:  # the slices' parts are timed together
        assert set(sliced["times"]) == {"rollout", "teacher", "student", "optimizer"}


def test_two_processes_with_micro_batches_and_recompute_train_what_one_does(sharp_ckpts, tmp_path):
    """FSDP2 accumulates each slice's reduce-scattered gradient; each block is recomputed under its hooks."""
    import json
    teacher, student = sharp_ckpts
    outs = {}
    for name, n, extra in (("plain", 1, []), ("sliced2", 2, ["--micro-batch-size", "3", "--activation-checkpointing"])):
        outs[name] = str(tmp_path / name)
        run("train.py", "--teacher", teacher, "--student", student, "--out", outs[name], "--steps", "3",
            *DISTILL_ARGS, "--samples-per-prompt", "2", *extra, nproc=n)
    a, b = ([json.loads(line) for line in open(os.path.join(outs[k], "metrics.jsonl")) if '"loss"' in line]
            for k in ("plain", "sliced2"))
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-6)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
        assert y["flops"] > x["flops"]  # the recompute is counted

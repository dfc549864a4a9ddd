"""The distributed path and resume: 2 processes (torchrun, gloo) compute what 1 process computes, a run
killed with SIGKILL and resumed ends bit-identical to an uninterrupted one, and a kill during a checkpoint
save leaves the previous checkpoint loadable."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, make_ckpt
from checkpoint import load_pretrained

# a teacher with sharp distributions and a different student; lambda 0.5 with seq-KD exercises both
# samplers (student and teacher) and both halves of the batch
DISTILL = ["--batch-size", "16", "--max-new-tokens", "8", "--eval-n", "8", "--eval-every", "0", "--warmup", "1",
           "--lmbda", "0.5", "--seq-kd", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return make_ckpt(d / "teacher", 1, 2, sharpen=20.0), make_ckpt(d / "student", 2, 2)


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def train_cmd(nproc=1):
    if nproc == 1:
        return [sys.executable, os.path.join(ROOT, "train.py")]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            os.path.join(ROOT, "train.py")]


def run(cmd, *args):
    r = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(m["step"], m["loss"], m["on_policy_frac"], m["student_rkl"], m["grad_norm"])
                for m in map(json.loads, f) if "loss" in m]


def final_weights(out, step):
    return load_file(os.path.join(out, "ckpt", f"step_{step:06d}", "model.safetensors"))


@pytest.mark.parametrize("loss,extra", [("jsd", []), ("sampled", ["--lmbda", "1"]),
                                        ("jsd", ["--samples-per-prompt", "2"])])
def test_two_processes_compute_what_one_does(ckpts, tmp_path, loss, extra):
    """With 2 samples per prompt, one process prefills each prompt once for its two rows (rollout and
    teacher); each of 2 processes holds one row of every prompt (rows r::2) and shares nothing."""
    teacher, student = ckpts
    outs = {}
    for n in (1, 2):
        outs[n] = str(tmp_path / f"np{n}")
        run(train_cmd(n), "--teacher", teacher, "--student", student, "--out", outs[n], "--steps", "4",
            "--loss", loss, *DISTILL, *extra)
    one, two = losses(outs[1]), losses(outs[2])
    lmbda = float(extra[extra.index("--lmbda") + 1]) if "--lmbda" in extra else 0.5
    assert [r[0] for r in one] == [1, 2, 3, 4] and [r[2] for r in two] == [lmbda] * 4
    # same samples, loss, per-token reverse KL and gradient norm (the gradient's scale: Adam would hide a
    # wrongly normalised gradient from the weights), up to fp32 reduction order
    for a, b in zip(one, two):
        assert a[1] == pytest.approx(b[1], rel=1e-4, abs=1e-6) and a[3] == pytest.approx(b[3], rel=1e-4)
        assert a[4] == pytest.approx(b[4], rel=1e-4)
    # the same update: the weights moved by the same amount to within 1% of the largest move
    w0, wa, wb = load_file(os.path.join(student, "model.safetensors")), final_weights(outs[1], 4), final_weights(outs[2], 4)
    assert wa.keys() == wb.keys()
    for k in wa:
        move = (wa[k] - w0[k]).abs().max().item()
        assert move > 0 and (wa[k] - wb[k]).abs().max().item() <= 0.01 * move, k
    with open(os.path.join(outs[2], "args.json")) as f:
        assert json.load(f)["world_size"] == 2


def test_sigkill_then_resume_is_bit_identical(ckpts, tmp_path):
    teacher, student = ckpts
    args = ["--teacher", teacher, "--student", student, "--steps", "8", "--save-every", "2", *DISTILL]
    ref = str(tmp_path / "ref")
    run(train_cmd(), "--out", ref, *args)
    out = str(tmp_path / "killed")
    p = subprocess.Popen([*train_cmd(), "--out", out, *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    latest = os.path.join(out, "latest")
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if os.path.isfile(latest) and open(latest).read() in ("step_000004", "step_000006"):
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = open(latest).read()
    assert killed_at != "step_000008"
    r = run(train_cmd(), "--out", out, "--resume", *args)
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 8
    wa, wb = final_weights(ref, 8), final_weights(out, 8)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert losses(out) == losses(ref)  # one record per step: the steps logged after the kill were dropped


KILL_DURING_SAVE = """
import os, sys, torch
sys.path.insert(0, {root!r})
import train
real_save, calls = torch.save, []
def dying_save(obj, f, *a, **k):
    calls.append(f)
    if len(calls) == 2:  # the second checkpoint: write half a file, then die like a SIGKILL would
        open(f, "wb").write(b"half")
        os._exit(9)
    return real_save(obj, f, *a, **k)
torch.save = dying_save
train.main(sys.argv[1:])
"""


def test_kill_during_save_keeps_previous_checkpoint(ckpts, tmp_path):
    teacher, student = ckpts
    out = str(tmp_path / "run")
    args = ["--teacher", teacher, "--student", student, "--out", out, "--steps", "4", "--save-every", "2", *DISTILL]
    r = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE.format(root=ROOT), *args], capture_output=True,
                       text=True, cwd=ROOT, env=ENV, timeout=300)
    assert r.returncode == 9, r.stderr[-2000:]
    with open(os.path.join(out, "latest")) as f:
        assert f.read() == "step_000002"
    load_pretrained(os.path.join(out, "ckpt", "step_000002"))  # loads: complete and consistent
    r = run(train_cmd(), "--resume", *args)  # and the run continues from it
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 4


def test_torchrun_restart_resumes_by_itself(ckpts, tmp_path):
    """What `torchrun --max-restarts` does after a failure: the same command again, with
    TORCHELASTIC_RESTART_COUNT > 0; the job continues from `latest` without --resume."""
    teacher, student = ckpts
    out = str(tmp_path / "run")
    args = ["--teacher", teacher, "--student", student, "--out", out, "--save-every", "2", *DISTILL]
    run(train_cmd(), *args, "--steps", "2")
    env = dict(ENV, TORCHELASTIC_RESTART_COUNT="1")
    r = subprocess.run([*train_cmd(), *args, "--steps", "4"], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [s for s, *_ in losses(out)] == [1, 2, 3, 4]

"""train.py's distributed path and restarts, in subprocesses: 2 processes (torchrun, gloo) compute what 1
process computes, a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one, and a
torchrun restart resumes by itself."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import DISTILL_ARGS, ENV, ROOT, run, script_cmd



def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(m["step"], m["loss"], m["on_policy_frac"], m["student_rkl"], m["grad_norm"], m.get("group_success"))
                for m in map(json.loads, f) if "loss" in m]


def final_weights(out, step):
    return load_file(os.path.join(out, "ckpt", f"step_{step:06d}", "model.safetensors"))


@pytest.mark.parametrize("loss,extra", [("jsd", []), ("sampled", ["--lmbda", "1"]),
                                        ("jsd", ["--samples-per-prompt", "2"]), ("jsd", ["--lora-rank", "4"]),
                                        ("rkl", ["--rollout", "skd", "--skd-top-k", "3"])])
def test_two_processes_compute_what_one_does(sharp_ckpts, tmp_path, loss, extra):
    """With 2 samples per prompt, one process prefills each prompt once for its two rows (rollout and
    teacher); each of 2 processes holds one row of every prompt (rows r::2) and shares nothing. With LoRA
    each process holds half of every adapter and of the frozen base (FSDP2 shards a block's frozen and
    trainable parameters together); the saved weights are merged."""
    teacher, student = sharp_ckpts
    outs = {}
    for n in (1, 2):
        outs[n] = str(tmp_path / f"np{n}")
        run("train.py", "--teacher", teacher, "--student", student, "--out", outs[n], "--steps", "4",
            "--loss", loss, *DISTILL_ARGS, *extra, nproc=n)
    one, two = losses(outs[1]), losses(outs[2])
    lmbda = float(extra[extra.index("--lmbda") + 1]) if "--lmbda" in extra else 0.5
    assert [r[0] for r in one] == [1, 2, 3, 4] and [r[2] for r in two] == [lmbda] * 4
    # same samples, loss, per-token reverse KL and gradient norm (the gradient's scale: Adam would hide a
    # wrongly normalised gradient from the weights), up to fp32 reduction order
    for a, b in zip(one, two):
        assert a[1] == pytest.approx(b[1], rel=1e-4, abs=1e-6) and a[3] == pytest.approx(b[3], rel=1e-4)
        assert a[4] == pytest.approx(b[4], rel=1e-4)
        assert a[5] == b[5] and (a[5] is not None) == ("--samples-per-prompt" in extra)  # gathered from both ranks
    # the same update: the weights moved by the same amount to within 1% of the largest move
    w0, wa, wb = load_file(os.path.join(student, "model.safetensors")), final_weights(outs[1], 4), final_weights(outs[2], 4)
    assert wa.keys() == wb.keys() == w0.keys()
    for k in wa:
        if "--lora-rank" in extra and k.split(".")[-2] not in ("qkv", "proj", "fc", "fc_out"):  # frozen
            assert torch.equal(wa[k], w0[k]) and torch.equal(wb[k], w0[k]), k
            continue
        move = (wa[k] - w0[k]).abs().max().item()
        assert move > 0 and (wa[k] - wb[k]).abs().max().item() <= 0.01 * move, k
    with open(os.path.join(outs[2], "args.json")) as f:
        assert json.load(f)["world_size"] == 2


# Global rows a b a c: with 2 processes rank 0 holds a twice (rows 0 and 2), rank 1 holds b and c, so only
# rank 0 has a repeated prompt to prefill once. Every rank must still run the same FSDP forwards.
ONE_RANK_REPEATS = """
import sys
sys.path.insert(0, {root!r})
import rollout, train

def rows(problems, step, args, n_on, fmt, rank, world, mix=None):
    a, b, c = problems[3 * step:3 * step + 3]
    probs = [a, b, a, c] * (args.batch_size // 4)
    out = [rollout.Row(fmt.prompt_ids(n, t), None if i < n_on else fmt.answer_ids(s), i < n_on, (n, t, s))
           for i, (n, t, s) in enumerate(probs)]
    return out[rank::world]

train.step_rows = rows
train.main()
"""


@pytest.mark.parametrize("stage,extra", [("distill", ["--lmbda", "1"]),
                                         ("distill", ["--lmbda", "0.5", "--loss", "jsd", "--seq-kd"]),
                                         ("sft", ["--n-layer", "1", "--n-head", "2", "--d-model", "32"])])
def test_a_prompt_repeated_on_one_rank_only_trains_what_one_process_does(sharp_ckpts, tmp_path, stage, extra):
    """The prompt sharing (one prefill per distinct prompt) is agreed by the ranks: when only one rank's rows
    repeat a prompt, both take the shared path, and 2 processes train what 1 does."""
    teacher, student = sharp_ckpts
    script = tmp_path / "one_rank_repeats.py"
    script.write_text(ONE_RANK_REPEATS.format(root=ROOT))
    models = ["--teacher", teacher] + (["--student", student] if stage == "distill" else [])
    outs = {}
    for n in (1, 2):
        outs[n] = str(tmp_path / f"np{n}")
        cmd = [sys.executable, str(script)] if n == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
        r = subprocess.run([*cmd, "--stage", stage, *models, "--out", outs[n], "--steps", "2", "--batch-size", "4",
                            "--max-new-tokens", "6", "--eval-n", "4", "--eval-every", "0", "--warmup", "1", *extra],
                           capture_output=True, text=True, cwd=ROOT, env=dict(ENV, OPD_DIST_TIMEOUT_S="60"),
                           timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = ([(m["step"], m["loss"], m["grad_norm"]) for m in records(outs[n]) if "loss" in m] for n in (1, 2))
    assert [s for s, *_ in one] == [s for s, *_ in two] == [1, 2]
    for a, b in zip(one, two):
        assert a[1] == pytest.approx(b[1], rel=1e-4, abs=1e-6) and a[2] == pytest.approx(b[2], rel=1e-4)


ONE_RANK_FAILS = """
import os, sys
sys.path.insert(0, {root!r})
import teacher, train
real = teacher.cross_tokenizer_batch

def on_rank_0_only(*a, **k):
    if os.environ.get("RANK") == "1":
        raise ValueError("a span the teacher's tokenizer cannot reproduce (made up by the test)")
    return real(*a, **k)

teacher.cross_tokenizer_batch = on_rank_0_only
train.main()
"""


def test_a_cross_tokenizer_failure_on_one_rank_stops_every_rank_with_one_line(sharp_ckpts, tmp_path):
    """Text one rank's teacher tokenizer cannot reproduce stops both ranks before the teacher's forward, each
    with the one-line error, instead of leaving the other waiting in a collective."""
    teacher, student = sharp_ckpts
    script = tmp_path / "one_rank_fails.py"
    script.write_text(ONE_RANK_FAILS.format(root=ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), "--teacher", teacher, "--student", student, "--out", str(tmp_path / "run"),
                        "--cross-tokenizer", "on", "--steps", "2", *DISTILL_ARGS[:-3]],
                       capture_output=True, text=True, cwd=ROOT, env=dict(ENV, OPD_DIST_TIMEOUT_S="600"), timeout=240)
    assert r.returncode != 0
    # the two processes share one stderr: their lines may interleave, so count the messages
    assert r.stderr.count("train.py: error: step 1:") == 2, r.stderr[-3000:]


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow  # ~60 s of compiling; tests/test_rollout.py checks the compiled step against the eager one
def test_compiled_rollouts_train_what_eager_ones_do(sharp_ckpts, tmp_path):
    """--compile: the rollouts decode on a plain replica of the sharded student, refreshed every step, with
    the compiled step over a static cache (the student's rows, and the teacher's seq-KD rows on its own
    replica). 1 and 2 processes train what the eager rollout trains: the same samples, hence the same
    losses and gradient norms, up to float rounding; with LoRA adapters too (merged into the replica)."""
    teacher, student = sharp_ckpts
    out = {}
    for name, n, flags in (("eager", 1, []), ("compiled", 1, ["--compile"]), ("compiled2", 2, ["--compile"]),
                           ("lora", 1, ["--lora-rank", "4"]), ("lora-compiled", 2, ["--lora-rank", "4", "--compile"])):
        run("train.py", "--teacher", teacher, "--student", student, "--out", str(tmp_path / name), "--steps", "3",
            *DISTILL_ARGS, *flags, nproc=n)
        out[name] = losses(str(tmp_path / name))
    for a, b, c in zip(out["eager"], out["compiled"], out["compiled2"]):
        assert a[0] == b[0] == c[0] and a[2] == b[2] == c[2] == 0.5
        for i in (1, 3, 4):
            assert a[i] == pytest.approx(b[i], rel=1e-4, abs=1e-6) and a[i] == pytest.approx(c[i], rel=1e-4, abs=1e-6)
    assert len(out["eager"]) == 3
    for a, b in zip(out["lora"], out["lora-compiled"]):  # the replica decodes with the merged adapters
        for i in (1, 3, 4):
            assert a[i] == pytest.approx(b[i], rel=1e-4, abs=1e-6)
    assert out["lora"][-1][1] != out["eager"][-1][1]


def test_sigkill_then_resume_is_bit_identical(sharp_ckpts, tmp_path):
    teacher, student = sharp_ckpts
    args = ["--teacher", teacher, "--student", student, "--steps", "8", "--save-every", "2", *DISTILL_ARGS]
    ref = str(tmp_path / "ref")
    run("train.py", "--out", ref, *args)
    out = str(tmp_path / "killed")
    p = subprocess.Popen([*script_cmd("train.py"), "--out", out, *args], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    r = run("train.py", "--out", out, "--resume", *args)
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 8
    wa, wb = final_weights(ref, 8), final_weights(out, 8)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert losses(out) == losses(ref)  # one record per step: the steps logged after the kill were dropped


def test_torchrun_restart_resumes_by_itself(sharp_ckpts, tmp_path):
    """What `torchrun --max-restarts` does after a failure: the same command again, with
    TORCHELASTIC_RESTART_COUNT > 0; the job continues from `latest` without --resume."""
    teacher, student = sharp_ckpts
    out = str(tmp_path / "run")
    args = ["--teacher", teacher, "--student", student, "--out", out, "--save-every", "2", *DISTILL_ARGS]
    run("train.py", *args, "--steps", "4", "--max-minutes", "1e-9")  # as if it died after saving step 1
    env = dict(ENV, TORCHELASTIC_RESTART_COUNT="1")
    r = run("train.py", *args, "--steps", "4", check=False, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [s for s, *_ in losses(out)] == [1, 2, 3, 4]

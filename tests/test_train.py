"""train.py's SFT stage end to end on a tiny model in subprocesses: the loss goes down, eval_countdown.py
loads the run's checkpoint, --resume ends bit-identical to the uninterrupted run, and bad input fails with
one line on stderr without touching what exists."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import one_line_error, run

TINY = ["--n-layer", "1", "--n-head", "2", "--d-model", "32", "--batch-size", "32", "--lr", "3e-3",
        "--warmup", "5", "--eval-n", "16"]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft") / "run")
    r = run("train.py", "--stage", "sft", "--out", out, "--steps", "40", "--save-every", "20", "--eval-every", "20", *TINY)
    return out, r


def test_sft_lowers_loss_and_logs(sft_run):
    out, r = sft_run
    rec = [m for m in metrics(out) if "loss" in m]
    assert [m["step"] for m in rec] == list(range(1, 41))
    first, last = sum(m["loss"] for m in rec[:5]) / 5, sum(m["loss"] for m in rec[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert any("val_accuracy" in m for m in metrics(out))
    final = json.loads(r.stdout.strip().splitlines()[-1])
    assert final["step"] == 40 and final["loss"] == rec[-1]["loss"]
    with open(os.path.join(out, "latest")) as f:
        assert f.read() == "step_000040"


def test_eval_loads_checkpoint(sft_run):
    out, _ = sft_run
    r = run("eval_countdown.py", out, "--n", "20", "--examples", "2")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["n"] == 20 and res["ckpt"].endswith("step_000040")
    assert 0 <= res["greedy_accuracy"] <= 1 and 0 <= res["greedy_format_valid"] <= 1 and res["greedy_mean_tokens"] > 0


def test_resume_continues_bit_exactly(sft_run, tmp_path):
    out, _ = sft_run
    # a copy of the run as it was at step 20 (as if killed right after that save)
    half = str(tmp_path / "half")
    shutil.copytree(out, half)
    shutil.rmtree(os.path.join(half, "ckpt", "step_000040"))
    with open(os.path.join(half, "latest"), "w") as f:
        f.write("step_000020")
    run("train.py", "--stage", "sft", "--out", half, "--steps", "40", "--save-every", "20", "--eval-every", "20",
        "--resume", *TINY)
    a = load_file(os.path.join(out, "ckpt", "step_000040", "model.safetensors"))
    b = load_file(os.path.join(half, "ckpt", "step_000040", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = [m["loss"] for m in metrics(half) if "loss" in m and m["step"] > 20][-20:]
    assert resumed == [m["loss"] for m in metrics(out) if "loss" in m][20:]


@pytest.mark.parametrize("flag,value,msg", [("--lr", "1e-3", "--lr 0.003, not 0.001"),
                                            ("--seed", "1", "--seed 0, not 1"),
                                            ("--batch-size", "8", "--batch-size 32, not 8")])
def test_resume_refuses_flags_that_change_the_run(sft_run, tmp_path, flag, value, msg):
    out, _ = sft_run
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    before = snapshot(copy)
    r = run("train.py", "--stage", "sft", "--out", copy, "--steps", "40", "--resume", *TINY, flag, value, check=False)
    assert f"was trained with {msg}" in one_line_error(r) and snapshot(copy) == before


def snapshot(d):
    return {os.path.join(p, f): os.stat(os.path.join(p, f)).st_mtime_ns for p, _, fs in os.walk(d) for f in fs}


def test_train_bad_input_destroys_nothing(sft_run, tmp_path):
    out, _ = sft_run
    before = snapshot(out)
    assert "already holds a run" in one_line_error(run("train.py", "--out", out, *TINY, check=False))
    one_line_error(run("train.py", "--out", str(tmp_path / "x"), "--lr", "-1", check=False))
    one_line_error(run("train.py", "--out", str(tmp_path / "x"), "--stage", "nope", check=False))
    assert "does not exist" in one_line_error(run("train.py", "--out", str(tmp_path / "none"), "--resume", check=False))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "cannot write" in one_line_error(run("train.py", "--stage", "sft", "--out", str(blocker / "run"), *TINY,
                                                check=False))
    for flag in ("--lr", "--lmbda", "--beta", "--temperature"):
        assert "finite" in one_line_error(run("train.py", "--out", str(tmp_path / "x"), flag, "nan", check=False))
    assert "whole number" in one_line_error(run("train.py", "--out", str(tmp_path / "x"), "--lmbda", "0.3",
                                                check=False))
    assert "--lmbda 1" in one_line_error(run("train.py", "--out", str(tmp_path / "x"), "--loss", "sampled",
                                             "--lmbda", "0.5", check=False))
    cut = tmp_path / "cut"  # a student whose weights file was cut short: found before any process group starts
    shutil.copytree(os.path.join(out, "ckpt", "step_000040"), cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:len(data) // 2])
    for stage in ("sft", "distill"):
        assert "corrupt weights" in one_line_error(run("train.py", "--stage", stage, "--student", str(cut), "--out",
                                                       str(tmp_path / f"cut-{stage}"), check=False))
        assert not os.path.exists(tmp_path / f"cut-{stage}")
    assert snapshot(out) == before and not os.path.exists(tmp_path / "x")


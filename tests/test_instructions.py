"""The general-instruction task (data/instructions.py, train.py --task instruct): its splits, its chat
prompts against transformers' apply_chat_template, a distillation run on tiny chat checkpoints, and the
flag combinations it refuses."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, make_hf_model, one_line_error, run
from data import instructions
from safetensors.torch import load_file


def test_splits_are_disjoint_cover_every_instruction_and_do_not_depend_on_the_process():
    splits = {s: [p[0] for p in instructions.load_split(s)] for s in ("train", "val", "test")}
    sets = {s: set(v) for s, v in splits.items()}
    assert all(len(sets[s]) == len(splits[s]) for s in splits)  # no repeats inside a split
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == set(instructions.all_instructions())
    assert len(instructions.all_instructions()) >= 200 and min(len(v) for v in splits.values()) >= 16
    # the same splits in the same order from a fresh interpreter with another string-hash seed
    code = "import json; from data import instructions as i; print(json.dumps([p[0] for s in ('train','val','test') " \
           "for p in i.load_split(s)]))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=os.environ | {"PYTHONHASHSEED": "123"}).stdout
    assert json.loads(out) == splits["train"] + splits["val"] + splits["test"]
    with pytest.raises(ValueError, match="unknown split"):
        instructions.load_split("dev")


def test_prompts_are_the_chat_template_as_transformers_renders_it(chat_tokenizer_dir):
    from transformers import AutoTokenizer
    from chat import load_chat
    fmt = instructions.InstructFormat(load_chat(chat_tokenizer_dir))
    ref = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    probs = instructions.load_split("val")[:5]
    for p, ids in zip(probs, fmt.prompts(probs)):
        want = ref.apply_chat_template([{"role": "user", "content": p[0]}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
        assert ids == list(want)
        assert ref.decode(ids).endswith(p[0] + "<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def chat_teacher(chat_tokenizer_dir, tmp_path_factory):
    """A tiny 4-layer Llama with the ChatML tokenizer, in the Hugging Face layout."""
    from chat import load_chat
    d = tmp_path_factory.mktemp("instruct") / "teacher"
    make_hf_model(d, "llama", tied=True, vocab_size=load_chat(chat_tokenizer_dir).tok.get_vocab_size(), n_layer=4,
                  bos_token_id=0, eos_token_id=2)
    for f in os.listdir(chat_tokenizer_dir):
        shutil.copyfile(os.path.join(chat_tokenizer_dir, f), d / f)
    return str(d)


@pytest.mark.parametrize("rows", [["--lmbda", "1"], ["--lmbda", "0.5", "--seq-kd", "--loss", "fkl_rkl", "--beta", "0.5"]])
def test_a_distill_run_on_instructions_trains_on_their_prompts_and_logs_the_teacher_gap(chat_teacher, tmp_path,
                                                                                       monkeypatch, capsys, rows):
    import rollout
    from chat import load_chat
    prompts, real = [], rollout.sample
    monkeypatch.setattr(rollout, "sample", lambda model, p, r, step, stream, *skd: (
        step >= 0 and prompts.extend(p)) or real(model, p, r, step, stream, *skd))
    out = str(tmp_path / "run")
    train.main(["--task", "instruct", "--teacher", chat_teacher, "--student", chat_teacher, "--keep-layers", "::2",
                "--out", out, "--steps", "2", "--lr", "1e-3", "--batch-size", "4", "--max-new-tokens", "8",
                "--eval-n", "4", "--eval-every", "0", "--warmup", "0", *rows])
    printed = capsys.readouterr().out
    # no accuracy to print; three held-out instructions' greedy replies, before and after
    assert "test accuracy" not in printed and printed.count("  before: ") == printed.count("  after:  ") == 3
    test_set = {p[0] for p in instructions.load_split("test")}
    assert sum(line.strip("'") in test_set for line in printed.splitlines()) == 3
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    start, steps, last = recs[0], [r for r in recs if "loss" in r], [r for r in recs if "val_fkl" in r][-1]
    assert len(steps) == 2 and all(r["on_policy_frac"] == float(rows[1]) for r in steps)
    assert all("reward" not in r for r in steps)  # no verifier, no reward
    assert start["student_test_accuracy_before"] is None and start["val_accuracy"] is None
    for k in ("rkl", "fkl", "greedy_agreement", "top1_agreement", "distinct2", "teacher_distinct2"):
        assert last[f"val_{k}"] is not None and start[f"student_val_{k}_before"] is not None
    assert last["val_fkl"] > 0 and 0 <= last["val_top1_agreement"] <= 1
    # every sampled prompt (student rows and the teacher's seq-KD rows) is a training instruction in the template
    tok = load_chat(chat_teacher).tok
    train_set = {p[0] for p in instructions.load_split("train")}
    assert prompts and len(prompts) == 2 * 4
    for ids in prompts:
        text = tok.decode(ids, skip_special_tokens=False)
        asked = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        assert asked in train_set and text.endswith("<|im_start|>assistant\n")
    saved = load_file(os.path.join(out, "ckpt", "step_000002", "model.safetensors"))
    start_w = load_file(os.path.join(chat_teacher, "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"  # the student's block 1 is the teacher's block 2
    assert not torch.equal(saved[name], start_w["model.layers.2.mlp.down_proj.weight"])


@pytest.mark.parametrize("flags, why", [
    (["--stage", "rl"], "no verifier"),
    (["--stage", "distill", "--lmbda", "1", "--reward-weight", "0.5", "--loss", "sampled"], "no verifier"),
    (["--stage", "distill", "--lmbda", "0.5"], "no reference replies"),
    (["--stage", "sft"], "no reference replies"),
    (["--stage", "distill", "--augment"], "neither --augment"),
])
def test_combinations_that_cannot_work_are_refused_in_one_line(flags, why):
    line = one_line_error(run("train.py", "--task", "instruct", *flags, "--steps", "1", check=False))
    assert why in line


def test_a_char_tokenizer_model_is_refused_in_one_line(tmp_path):
    line = one_line_error(run("train.py", "--task", "instruct", "--steps", "1", "--out", str(tmp_path / "r"),
                              check=False))  # the shipped char-tokenizer student and teacher
    assert "needs a chat model" in line

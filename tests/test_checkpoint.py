"""checkpoint.py through the scripts that use it, in subprocesses: a kill in the middle of a checkpoint save
leaves `latest` on the previous, loadable checkpoint that --resume continues from, and missing, corrupt or
mismatched checkpoint files fail with one line on stderr without touching the checkpoint."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from checkpoint import load_pretrained
from conftest import DISTILL_ARGS, ENV, ROOT, one_line_error, run



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


def test_kill_during_save_keeps_previous_checkpoint(sharp_ckpts, tmp_path):
    teacher, student = sharp_ckpts
    out = str(tmp_path / "run")
    args = ["--teacher", teacher, "--student", student, "--out", out, "--steps", "4", "--save-every", "2",
            *DISTILL_ARGS]
    r = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE.format(root=ROOT), *args], capture_output=True,
                       text=True, cwd=ROOT, env=ENV, timeout=300)
    assert r.returncode == 9, r.stderr[-2000:]
    with open(os.path.join(out, "latest")) as f:
        assert f.read() == "step_000002"
    load_pretrained(os.path.join(out, "ckpt", "step_000002"))  # loads: complete and consistent
    r = run("train.py", "--resume", *args)  # and the run continues from it
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 4


def test_eval_bad_checkpoints(sharp_ckpts, tmp_path):
    _, ck = sharp_ckpts
    assert "does not exist" in one_line_error(run("eval_countdown.py", str(tmp_path / "missing"), check=False))
    bad = tmp_path / "bad"
    shutil.copytree(ck, bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert "corrupt weights" in one_line_error(run("eval_countdown.py", str(bad), check=False))
    bad2 = tmp_path / "bad2"
    shutil.copytree(ck, bad2)
    (bad2 / "config.json").write_text("{not json")
    assert "corrupt config" in one_line_error(run("eval_countdown.py", str(bad2), check=False))
    other = tmp_path / "other"
    shutil.copytree(ck, other)
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, "1": 4}, unk_token="[UNK]")).save(
        str(other / "tokenizer.json"))
    assert "vocab" in one_line_error(run("eval_countdown.py", str(other), check=False))
    one_line_error(run("eval_countdown.py", ck, "--n", "-3", check=False))
    assert os.path.isfile(os.path.join(ck, "model.safetensors"))


# ------------------------------------------------------------------------- the Hugging Face layout

def test_hf_layout_round_trip_and_a_pruned_student_load_in_transformers(tmp_path):
    """A Llama loaded by checkpoint.py, saved back by it (whole, and keeping every other layer): transformers
    loads both with the same logits as our models; the tied head is not written."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from checkpoint import save_pretrained, side_files
    from conftest import hf_logits, make_hf_model
    from model import keep_layers, positions_from_valid
    from rollout import left_pad
    make_hf_model(tmp_path / "src", "llama", tied=True, n_layer=4)
    ours = load_pretrained(str(tmp_path / "src"))
    ids, valid = left_pad([[5, 6, 7], [9, 1, 2, 3, 4, 8]], 0)
    for name, model in (("whole", ours), ("pruned", keep_layers(ours, [0, 2]))):
        save_pretrained(model.state_dict(), model.cfg, str(tmp_path / name),
                        side_files=side_files(str(tmp_path / "src")))
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()
        ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / name), dtype=torch.float32).eval()
        assert ref.config.num_hidden_layers == model.cfg.n_layer
        with torch.no_grad():
            diff = (hf_logits(ref, ids, valid) - model(ids, positions_from_valid(valid), valid))[valid].abs().max()
        assert diff < 1e-5, (name, diff)


def test_hf_sharded_checkpoint_loads_and_a_missing_shard_is_one_line(tmp_path):
    import torch
    from conftest import make_hf_model
    from checkpoint import CheckpointError
    ref = make_hf_model(tmp_path / "one", "qwen2", tied=False)
    ref.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
    shards = sorted(f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors"))
    assert len(shards) > 1 and os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    a, b = load_pretrained(str(tmp_path / "one")), load_pretrained(str(tmp_path / "sharded"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    os.remove(tmp_path / "sharded" / shards[-1])
    with pytest.raises(CheckpointError, match=f"{shards[-1]}: shard listed in model.safetensors.index.json is missing"):
        load_pretrained(str(tmp_path / "sharded"))


@pytest.mark.parametrize("edit,expect", [
    (dict(model_type="mistral"), "model_type 'mistral' is not supported"),
    (dict(use_sliding_window=True), "use_sliding_window = true is not supported"),
    (dict(num_experts=8), "num_experts = 8 is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}), "rope_parameters"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(hidden_size=40), "model.embed_tokens.weight [64, 48] does not match config.json"),
    (dict(num_key_value_heads=4), "does not match config.json"),
])
def test_unsupported_or_mismatched_hf_configs_fail_with_one_line(tmp_path, edit, expect):
    """Every refusal names the key or tensor, through load_pretrained and through train.py (before training:
    nothing is written to the run directory)."""
    from conftest import make_hf_model
    from checkpoint import CheckpointError
    make_hf_model(tmp_path / "m", "qwen2", tied=False)
    cfg_file = tmp_path / "m" / "config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | edit))
    with pytest.raises(CheckpointError, match=expect.replace("[", r"\[").replace("]", r"\]")):
        load_pretrained(str(tmp_path / "m"))
    line = one_line_error(run("train.py", "--teacher", str(tmp_path / "m"), "--out", str(tmp_path / "run"),
                              "--steps", "1", check=False))
    assert expect in line and not os.path.exists(tmp_path / "run")


def test_hf_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    from conftest import make_hf_model
    from checkpoint import CheckpointError
    make_hf_model(tmp_path / "m", "qwen3", tied=True)
    wf = str(tmp_path / "m" / "model.safetensors")
    sd = load_file(wf)
    del sd["model.layers.1.self_attn.k_norm.weight"]
    save_file(sd, wf)
    with pytest.raises(CheckpointError, match="tensor model.layers.1.self_attn.k_norm.weight is missing"):
        load_pretrained(str(tmp_path / "m"))

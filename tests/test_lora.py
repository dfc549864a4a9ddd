"""lora.py and train.py --lora-rank: fresh adapters leave every family's logits bit for bit as they were, a
merged model computes what the adapters compute (fp32 round-off; float64 tightly), only the adapters get
gradients; a LoRA run saves plain checkpoints in which only the adapted linears moved, logs its trainable
parameters and optimizer state, resumes bit for bit, and refuses bad ranks with one line."""
import copy
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train
from checkpoint import load_pretrained
from conftest import DISTILL_ARGS, one_line_error, random_prompts, run, tiny_model
from lora import TARGETS, LoRALinear, add_lora, is_adapter, max_rank, merge, scale_of
from model import GPT, positions_from_valid
from rollout import left_pad

FAMILIES = {  # the switches model.py has, each on a tiny shape: width 32, 4 heads
    "gpt": {},
    "llama": dict(arch="llama", mlp="swiglu", n_head=4, n_kv_head=2, tie_embeddings=True),  # SwiGLU, GQA, tied
    "qwen2": dict(arch="qwen2", mlp="swiglu", n_head=4, n_kv_head=2, qkv_bias=True),       # q/k/v biases
    "qwen3": dict(arch="qwen3", mlp="swiglu", n_head=4, n_kv_head=1, head_dim=12, qk_norm=True),  # head_dim != 32/4
}


def family_model(family, dtype=torch.float32):
    """A tiny random model of `family`, every weight perturbed (fresh norms are ones and biases zeros)."""
    model = tiny_model(3, **FAMILIES[family]).to(dtype)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=dtype))
    return model


def batch():
    ids, valid = left_pad(random_prompts(2), 0)
    return ids, positions_from_valid(valid), valid


def random_adapters(model, seed=5):
    """B is zero in a fresh adapter; give it values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(0.05 * torch.randn(m.lora_b.shape, generator=g, dtype=m.lora_b.dtype))


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapters_give_the_base_logits_bitwise(family):
    base = family_model(family)
    adapted = add_lora(copy.deepcopy(base), 4, 8.0)
    ids, pos, valid = batch()
    with torch.no_grad():
        assert torch.equal(adapted(ids, pos, valid), base(ids, pos, valid))
    names = {n for n, _ in adapted.named_modules() if isinstance(_, LoRALinear)}
    assert names == {f"blocks.{i}.{t}" for i in range(base.cfg.n_layer) for t in TARGETS}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_merged_weights_compute_what_the_adapters_compute(family, dtype, tol):
    """merge's state dict has exactly the plain model's names and loads into a model without LoRA, whose
    logits equal the adapter forward's; merge's second part rebuilds the adapted state dict bit for bit."""
    adapted = add_lora(family_model(family, dtype), 3, 5.0, seed=1)
    random_adapters(adapted)
    sd = adapted.state_dict()
    plain, extra = merge(sd, scale_of(adapted))
    merged = GPT(adapted.cfg).to(dtype)
    merged.load_state_dict(plain, strict=True)  # plain names only
    assert set(plain) == set(GPT(adapted.cfg).state_dict())
    ids, pos, valid = batch()
    with torch.no_grad():
        a, b = adapted(ids, pos, valid), merged(ids, pos, valid)
    assert a.dtype == dtype and (a - b).abs().max().item() <= tol * a.abs().max().item()
    assert not torch.allclose(a, family_model(family, dtype)(ids, pos, valid))  # the adapters do change the output
    rebuilt = plain | extra
    assert rebuilt.keys() == sd.keys() and all(torch.equal(rebuilt[k], sd[k]) for k in sd)


@pytest.mark.parametrize("family", ["gpt", "qwen2"])
def test_only_adapters_receive_gradients(family):
    model = add_lora(family_model(family), 2, 4.0)
    random_adapters(model)  # with B = 0, A's gradient is exactly zero
    ids, pos, valid = batch()
    model(ids, pos, valid).log_softmax(-1)[valid].mean().backward()
    for name, p in model.named_parameters():
        if is_adapter(name):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_rank_is_bounded_by_the_narrowest_adapted_linear():
    model = tiny_model(0, d_model=32, d_mlp=24)  # fc_out is 24 -> 32: the narrowest side is 24
    assert max_rank(model) == 24
    for bad in (0, -1, 25):
        with pytest.raises(ValueError, match=r"--lora-rank .* must be in 1\.\.24"):
            add_lora(copy.deepcopy(model), bad, 1.0)
    assert add_lora(model, 24, 1.0).blocks[0].fc_out.lora_a.shape == (24, 24)


@pytest.mark.parametrize("argv,want", [(["--lora-rank", "0"], "--lora-rank must be >= 1"),
                                       (["--lora-rank", "-2"], "--lora-rank must be >= 1"),
                                       (["--lora-alpha", "8"], "--lora-alpha needs --lora-rank"),
                                       (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha must be"),
                                       (["--lora-rank", "4", "--lora-alpha", "nan"], "--lora-alpha must be"),
                                       (["--stage", "sft", "--lora-rank", "4"], "needs a --student")])
def test_bad_lora_flags_are_one_line(argv, want, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code != 0 and want in capsys.readouterr().err.strip().splitlines()[-1]


def test_alpha_defaults_to_twice_the_rank():
    assert train.parse_args(["--lora-rank", "4"]).lora_alpha == 8.0
    assert train.parse_args([]).lora_rank is None


# ------------------------------------------------------------------------------------------ train.py runs

def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def ckpt(out, step):
    return os.path.join(out, "ckpt", f"step_{step:06d}")


RANK = 4


def train_main(argv):
    """train.main in this process on one thread: the ops are tiny, and a second thread only adds overhead
    (10x on a loaded 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lora_run(sharp_ckpts, tmp_path_factory):
    teacher, student = sharp_ckpts
    out = str(tmp_path_factory.mktemp("lora") / "run")
    args = ["--teacher", teacher, "--student", student, "--steps", "4", "--save-every", "2", *DISTILL_ARGS,
            "--lora-rank", str(RANK), "--lora-alpha", "6"]
    train_main(["--out", out, *args])
    return out, args


def test_a_lora_run_saves_plain_weights_where_only_the_adapted_linears_moved(lora_run, sharp_ckpts):
    out, _ = lora_run
    student = sharp_ckpts[1]
    w0, w = load_file(os.path.join(student, "model.safetensors")), load_file(os.path.join(ckpt(out, 4), "model.safetensors"))
    assert w.keys() == w0.keys()  # no adapter names: loads anywhere
    for k in w:
        adapted = k.split(".")[-2] in TARGETS
        assert torch.equal(w[k], w0[k]) != adapted, k  # frozen: bit for bit; adapted: moved
    # the saved weights compute what the trained adapters compute (rebuilt from the training state)
    state = torch.load(os.path.join(ckpt(out, 4), "train_state.pt"), weights_only=False)
    trained = add_lora(load_pretrained(student), RANK, 6.0)
    trained.load_state_dict(w | state["lora"], strict=True)
    ids, pos, valid = batch()
    with torch.no_grad():
        a, b = trained(ids, pos, valid), load_pretrained(ckpt(out, 4))(ids, pos, valid)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_a_lora_run_logs_its_trainable_parameters_and_optimizer_state(lora_run, sharp_ckpts):
    out, _ = lora_run
    cfg = load_pretrained(sharp_ckpts[1]).cfg
    d, qkv, mlp = cfg.d_model, (cfg.n_head + 2 * cfg.kv_heads) * cfg.hd, cfg.d_mlp
    want = cfg.n_layer * RANK * ((d + qkv) + (d + d) + (d + mlp) + (mlp + d))  # r (in + out) per linear
    first, last = metrics(out)[0], metrics(out)[-1]
    assert first["step"] == 0 and first["trainable_params"] == last["trainable_params"] == want
    # AdamW: two fp32 moments per trainable number, one fp32 step count per tensor
    assert last["optimizer_state_bytes"] == 2 * 4 * want + 4 * 2 * len(TARGETS) * cfg.n_layer


def test_a_lora_run_resumes_bit_exactly(lora_run, tmp_path):
    out, args = lora_run
    half = str(tmp_path / "half")  # the run as it was at step 2, as if killed right after that save
    shutil.copytree(out, half)
    shutil.rmtree(ckpt(half, 4))
    with open(os.path.join(half, "latest"), "w") as f:
        f.write("step_000002")
    train_main(["--out", half, "--resume", *args])
    wa, wb = load_file(os.path.join(ckpt(out, 4), "model.safetensors")), load_file(os.path.join(ckpt(half, 4), "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = torch.load(os.path.join(ckpt(out, 4), "train_state.pt"), weights_only=False)["lora"]
    sb = torch.load(os.path.join(ckpt(half, 4), "train_state.pt"), weights_only=False)["lora"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    losses = lambda o: [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(o) if "loss" in m]  # noqa: E731
    assert losses(half) == losses(out)


def test_bad_rank_and_a_resume_with_other_adapters_are_one_line(lora_run, sharp_ckpts, tmp_path):
    out, args = lora_run
    teacher, student = sharp_ckpts
    r = run("train.py", "--teacher", teacher, "--student", student, "--out", str(tmp_path / "wide"), *DISTILL_ARGS,
            "--lora-rank", "33", check=False)
    assert "--lora-rank 33 must be in 1..32" in one_line_error(r)
    assert not os.path.exists(tmp_path / "wide" / "latest")
    half = str(tmp_path / "half")
    shutil.copytree(out, half)
    r = run("train.py", "--out", half, "--resume", *args, "--steps", "6", "--lora-rank", "8", check=False)
    assert "was trained with --lora-rank 4 --lora-alpha 6, not --lora-rank 8" in one_line_error(r)

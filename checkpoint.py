"""Checkpoint directories: what eval and users load, and what a run needs to resume.

    run/ckpt/step_000800/   model.safetensors  config.json  tokenizer.json  train_state.pt
    run/latest              the name of the newest complete checkpoint ("step_000800")

Two layouts, told apart by config.json: this codebase's own GPT (its GPTConfig fields), and the Hugging
Face layout of the Llama, Qwen2 and Qwen3 families (`model_type`, HF tensor names, optionally sharded
with model.safetensors.index.json), read and written directly, exactly as `save_pretrained` writes it, so
a distilled student loads back into the wider ecosystem. Config keys that would change the math and are
not implemented (sliding windows, MoE, other RoPE scalings, ...) are refused by name.

A checkpoint is written into a temporary directory and renamed, and `latest` is replaced atomically, so a
kill at any moment leaves the previous checkpoint loadable. Under FSDP the full (unsharded) state dicts are
gathered to rank 0, which writes; every rank loads the full state and keeps its shard.
"""
import json
import os
import shutil
from dataclasses import asdict, fields

import torch
import torch.distributed as dist

from lora import merge, scale_of
from model import GPT, GPTConfig


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or does not match what is asked of it."""

# ------------------------------------------------------------------------- the Hugging Face layout

HF_FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Files of a Hugging Face checkpoint that travel with its weights (tokenizer, chat template, eos ids).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
              "generation_config.json")


def config_from_hf(d, where):
    """GPTConfig of a Hugging Face config.json dict; CheckpointError naming the first key this model does
    not implement. Keys that do not change the math (architectures, dtype, token ids, ...) are ignored."""
    mt = d.get("model_type")
    if mt not in HF_FAMILIES:
        raise CheckpointError(f"{where}: model_type {mt!r} is not supported (supported: {', '.join(HF_FAMILIES)})")

    def refuse(key, why):
        raise CheckpointError(f"{where}: {key} = {json.dumps(d.get(key))} is not supported ({why})")
    if d.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "SwiGLU with silu only")
    for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if d.get(key):
            refuse(key, {"attention_bias": "no bias on the attention projections beyond Qwen2's q/k/v",
                         "mlp_bias": "no MLP biases", "use_sliding_window": "full attention only"}[key])
    if any(t != "full_attention" for t in d.get("layer_types") or []):
        refuse("layer_types", "full attention only")
    for key in ("num_experts", "num_local_experts", "num_experts_per_tok", "quantization_config"):
        if d.get(key):
            refuse(key, "dense fp32/bf16 models only")
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", "RoPE over the whole head")
    rope = dict(d.get("rope_parameters") or {})  # transformers >= 5; older configs: rope_theta + rope_scaling
    rope.update(d.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        refuse("rope_scaling" if d.get("rope_scaling") else "rope_parameters", "RoPE scaling: none or llama3")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(d.get(key), int):
            raise CheckpointError(f"{where}: needs an integer {key}")
    heads = d["num_attention_heads"]
    return GPTConfig(
        vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"], n_head=heads, d_model=d["hidden_size"],
        d_mlp=d["intermediate_size"], max_seq_len=d.get("max_position_embeddings", 2048),
        rope_base=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))), arch=mt,
        n_kv_head=d.get("num_key_value_heads") or heads, head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        mlp="swiglu", qkv_bias=mt == "qwen2", qk_norm=mt == "qwen3",
        tie_embeddings=bool(d.get("tie_word_embeddings", False)), norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_scaling={k: rope[k] for k in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings")} if rope_type == "llama3" else None,
        hf_config=d)


def config_to_hf(cfg):
    """config.json of a Hugging Face-family model: the source checkpoint's, with the shape this model has
    (a student may keep fewer layers than the checkpoint it started from)."""
    d = dict(cfg.hf_config or {})
    d.update(model_type=cfg.arch, architectures=[HF_FAMILIES[cfg.arch]], vocab_size=cfg.vocab_size,
             hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp, num_hidden_layers=cfg.n_layer,
             num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads, head_dim=cfg.hd,
             tie_word_embeddings=cfg.tie_embeddings, rms_norm_eps=cfg.norm_eps,
             max_position_embeddings=cfg.max_seq_len, hidden_act="silu")
    if "layer_types" in d:
        d["layer_types"] = ["full_attention"] * cfg.n_layer
    d.pop("torch_dtype", None)
    d["dtype"] = "float32"
    return d


def _hf_names(cfg, i):
    """Our tensor name -> the Hugging Face tensors it is made of (concatenated along rows), for block i."""
    a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    names = {f"blocks.{i}.norm1.weight": [f"model.layers.{i}.input_layernorm.weight"],
             f"blocks.{i}.qkv.weight": [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"],
             f"blocks.{i}.proj.weight": [a + "o_proj.weight"],
             f"blocks.{i}.norm2.weight": [f"model.layers.{i}.post_attention_layernorm.weight"],
             f"blocks.{i}.fc.weight": [m + "gate_proj.weight", m + "up_proj.weight"],
             f"blocks.{i}.fc_out.weight": [m + "down_proj.weight"]}
    if cfg.qkv_bias:
        names[f"blocks.{i}.qkv.bias"] = [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"]
    if cfg.qk_norm:
        names[f"blocks.{i}.q_norm.weight"] = [a + "q_norm.weight"]
        names[f"blocks.{i}.k_norm.weight"] = [a + "k_norm.weight"]
    return names


def hf_name_map(cfg):
    names = {"embed.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"],
             "head.weight": ["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"]}
    for i in range(cfg.n_layer):
        names.update(_hf_names(cfg, i))
    return names


def state_from_hf(sd, cfg, where):
    """Our state dict (fp32) from Hugging Face tensors; CheckpointError naming a missing tensor or a shape
    that does not match config.json."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(cfg).state_dict().items()}
    out = {}
    for ours, theirs in hf_name_map(cfg).items():
        missing = [n for n in theirs if n not in sd]
        if missing:
            raise CheckpointError(f"{where}: tensor {missing[0]} is missing")
        t = torch.cat([sd[n] for n in theirs]) if len(theirs) > 1 else sd[theirs[0]]
        if t.shape != shapes[ours]:
            got = " + ".join(f"{n} {list(sd[n].shape)}" for n in theirs)
            raise CheckpointError(f"{where}: {got} does not match config.json (expected {list(shapes[ours])} in all)")
        out[ours] = t.to(torch.float32)
    return out


def state_to_hf(sd, cfg):
    """Hugging Face tensors from our state dict: the fused q/k/v and gate/up rows split back apart."""
    out = {}
    for ours, theirs in hf_name_map(cfg).items():
        if ours == "head.weight" and cfg.tie_embeddings:
            continue  # tied: lm_head is embed_tokens
        t = sd[ours]
        if ours.endswith(("qkv.weight", "qkv.bias")):
            sizes = [cfg.n_head * cfg.hd, cfg.kv_heads * cfg.hd, cfg.kv_heads * cfg.hd]
        elif ours.endswith("fc.weight"):
            sizes = [cfg.d_mlp, cfg.d_mlp]
        else:
            sizes = [t.size(0)]
        out.update((n, p.contiguous()) for n, p in zip(theirs, t.split(sizes)))
    return out

# ------------------------------------------------------------------------------------ one directory

def save_pretrained(state_dict, cfg, path, tokenizer_path=None, extra=None, side_files=()):
    """Write a checkpoint directory atomically: into path.tmp, then rename over path.

    `state_dict` is a full (unsharded) state dict with this codebase's names; a Hugging Face-family model
    is written in that layout. tokenizer_path: a tokenizer.json to copy; side_files: more files to copy
    beside it (a Hugging Face checkpoint's tokenizer_config.json, chat template, generation_config.json);
    `extra` maps file names to objects for torch.save. A kill at any point leaves either the old directory
    or the new one under `path` (or, between the two renames, the old one at path.old, which
    load_pretrained falls back to)."""
    from safetensors.torch import save_file
    path = os.path.abspath(path)
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    hf = cfg.arch != "gpt"
    sd = state_to_hf(state_dict, cfg) if hf else state_dict
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()},
              os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg) if hf else asdict(cfg), f, indent=1)
    for src in side_files:
        shutil.copyfile(src, os.path.join(tmp, os.path.basename(src)))
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.json"))
    for name, obj in (extra or {}).items():  # e.g. train_state.pt for --resume
        torch.save(obj, os.path.join(tmp, name))
    _fsync_dir(tmp)
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(d):
    for name in os.listdir(d) if os.path.isdir(d) else []:
        p = os.path.join(d, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def load_config(path):
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        if os.path.isfile(os.path.join(path + ".old", "config.json")):
            return load_config(path + ".old")
        raise CheckpointError(f"{path}: not a checkpoint (no config.json)")
    try:
        with open(f) as fh:
            d = json.load(fh)
        if not isinstance(d, dict):
            raise CheckpointError(f"{f}: corrupt config (not a JSON object)")
        if "model_type" in d:
            return config_from_hf(d, f)
        known = {fl.name for fl in fields(GPTConfig)}
        unknown = set(d) - known
        if unknown:
            raise CheckpointError(f"{f}: unknown config keys {sorted(unknown)}")
        return GPTConfig(**d)
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{f}: corrupt config ({e})")


def load_weights(path, cfg=None):
    """The state dict of a checkpoint directory (CPU, this codebase's names when cfg is given): from
    model.safetensors, or from the shards model.safetensors.index.json lists. CheckpointError (one line)
    on a missing shard, a corrupt file, a missing tensor or a shape config.json does not allow."""
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: corrupt index ({e})")
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors")
    sd = {}
    for name in shards:
        wf = os.path.join(path, name)
        if not os.path.isfile(wf):
            raise CheckpointError(f"{wf}: shard listed in model.safetensors.index.json is missing")
        try:
            sd.update(load_file(wf, device="cpu"))
        except Exception as e:
            raise CheckpointError(f"{wf}: corrupt weights ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    if cfg is not None and cfg.arch != "gpt":
        sd = state_from_hf(sd, cfg, path)
    return sd


def load_pretrained(path, device="cpu"):
    """Load a checkpoint directory -> GPT (fp32, eval mode). Raises CheckpointError with one line."""
    path = os.path.abspath(path)
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):
        path = path + ".old"
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    cfg = load_config(path)
    sd = load_weights(path, cfg)
    model = GPT(cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}/model.safetensors: weights do not match config.json "
                              f"({str(e).splitlines()[0][:200]})")
    return model.to(device).eval()


def side_files(path):
    """The tokenizer, chat template and generation files of a checkpoint directory, to save beside a
    model that started from it."""
    return [os.path.join(path, n) for n in SIDE_FILES if os.path.isfile(os.path.join(path, n))]


# ----------------------------------------------------------------------------------------- a run's latest

def latest_checkpoint(run_dir):
    """The directory `run_dir/latest` names, or None when the run has no checkpoint yet."""
    latest = os.path.join(run_dir, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        return os.path.join(run_dir, "ckpt", f.read().strip())


def resolve_checkpoint(path):
    """A checkpoint directory, or a run directory whose `latest` file names its newest checkpoint."""
    if os.path.isfile(os.path.join(path, "config.json")) or os.path.isdir(path.rstrip("/") + ".old"):
        return path
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: does not exist")
    raise CheckpointError(f"{path}: neither a checkpoint (config.json) nor a run directory (latest)")


def save_checkpoint(run_dir, model, optimizer, step, tokenizer_path, train_state, keep, side=()):
    """Checkpoint step `step` of a (sharded) run and point `latest` at it; keep the newest `keep`.

    Collective: every rank calls it; rank 0 writes. train_state (a dict) goes into train_state.pt beside the
    optimizer state and the step; `side` files (side_files) are copied beside the weights. A model with LoRA
    adapters (lora.py) is saved merged, as plain weights; the unmerged base and the adapters go into the
    training state (key "lora"), so a resume continues from exactly what was trained."""
    msd, osd = full_state(model, optimizer)
    if dist.get_rank() == 0:
        name = f"step_{step:06d}"
        ckdir = os.path.join(run_dir, "ckpt")
        msd, unmerged = merge(msd, scale_of(model))
        state = dict(optimizer=osd, step=step, **train_state) | ({"lora": unmerged} if unmerged else {})
        save_pretrained(msd, model.cfg, os.path.join(ckdir, name), tokenizer_path,
                        extra={"train_state.pt": state}, side_files=side)
        tmp = os.path.join(run_dir, "latest.tmp")
        with open(tmp, "w") as f:
            f.write(name)
        os.replace(tmp, os.path.join(run_dir, "latest"))  # atomic: `latest` always names a whole checkpoint
        old = sorted(d for d in os.listdir(ckdir) if d.startswith("step_") and d[5:].isdigit())
        for d in old[:-keep]:
            shutil.rmtree(os.path.join(ckdir, d), ignore_errors=True)
    dist.barrier()


def load_train_state(path):
    """(model state dict, train_state.pt's dict) of a checkpoint to resume from; CheckpointError if unreadable.
    With LoRA the state dict is the unmerged one the run trained: its base weights and adapters."""
    msd = load_weights(path, load_config(path))
    try:
        state = torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}/train_state.pt: cannot resume from it ({str(e).splitlines()[0][:200]})")
    msd.update(state.pop("lora", {}))
    return msd, state


def restore(model, optimizer, msd, optimizer_state):
    """Load full state dicts into a sharded model and its optimizer (every rank keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, msd, options=opts)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=opts)


def full_state(model, optimizer):
    """Full (unsharded, CPU) model and optimizer state dicts; complete on rank 0."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


# The flags a resumed run must keep: the learning-rate schedule (a change moves every later step's rate), the
# objective and the rows it sees (a study that resumes a run under other flags would report a mixed run).
RESUME_FIXED = ("steps", "warmup", "lr", "min_lr_frac", "stage", "task", "loss", "beta", "loss_temperature", "lmbda",
                "seq_kd", "samples_per_prompt", "batch_size", "seed", "teacher_top_k", "skd_replace")


def check_resume(saved, args, path):
    """Refuse (CheckpointError) a --resume whose flags would change what the run trains from here on
    (RESUME_FIXED), or its adapters (the training state holds them unmerged). saved: the run's args, from
    its training state."""
    have, want = (saved.get("lora_rank"), saved.get("lora_alpha")), (args.lora_rank, args.lora_alpha)
    if "lora_rank" in saved and have != want:
        show = lambda r, a: f"--lora-rank {r} --lora-alpha {a:g}" if r else "no --lora-rank"  # noqa: E731
        raise CheckpointError(f"--resume: {path} was trained with {show(*have)}, not {show(*want)}")
    for name in RESUME_FIXED:
        if name in saved and saved[name] != getattr(args, name, None):
            flag = "--" + name.replace("_", "-")
            raise CheckpointError(f"--resume: {path} was trained with {flag} {saved[name]}, not {getattr(args, name)}; "
                                  f"resume with the same {flag}, or start a new run from it with --student {path}")


def text_files(ckpt, tokenizer):
    """What a checkpoint of the student copies to keep its text interface: its tokenizer.json (`tokenizer`
    when the checkpoint `ckpt` has none or is None), then the chat template, tokenizer and generation configs
    beside it."""
    own = os.path.join(ckpt, "tokenizer.json") if ckpt else None
    others = [f for f in side_files(ckpt) if os.path.basename(f) != "tokenizer.json"] if ckpt else []
    return [own if own and os.path.isfile(own) else tokenizer] + others


def open_metrics(path, start):
    """metrics.jsonl for appending, holding only the records of steps <= start (a killed run may have
    logged steps after its last checkpoint; the resumed run logs them again)."""
    keep = []
    if start and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= start:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:
                    pass  # a line cut by the kill
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)
    return open(path, "a")

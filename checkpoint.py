"""Checkpoint directories: what eval and users load, and what a run needs to resume.

    run/ckpt/step_000800/   model.safetensors  config.json  tokenizer.json  train_state.pt
    run/latest              the name of the newest complete checkpoint ("step_000800")

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

from model import GPT, GPTConfig


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or does not match what is asked of it."""

# ------------------------------------------------------------------------------------ one directory

def save_pretrained(state_dict, cfg, path, tokenizer_path=None, extra=None):
    """Write a checkpoint directory atomically: into path.tmp, then rename over path.

    `state_dict` is a full (unsharded) state dict; `extra` maps file names to objects for torch.save. A kill
    at any point leaves either the old directory or the new one under `path` (or, between the two renames,
    the old one at path.old, which load_pretrained falls back to)."""
    from safetensors.torch import save_file
    path = os.path.abspath(path)
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()},
              os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=1)
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
        known = {fl.name for fl in fields(GPTConfig)}
        unknown = set(d) - known
        if unknown:
            raise CheckpointError(f"{f}: unknown config keys {sorted(unknown)}")
        return GPTConfig(**d)
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{f}: corrupt config ({e})")


def load_weights(path):
    """The state dict in path/model.safetensors (CPU). Raises CheckpointError with one line."""
    from safetensors.torch import load_file
    wf = os.path.join(path, "model.safetensors")
    if not os.path.isfile(wf):
        raise CheckpointError(f"{path}: no model.safetensors")
    try:
        return load_file(wf, device="cpu")
    except Exception as e:
        raise CheckpointError(f"{wf}: corrupt weights ({str(e).splitlines()[0] if str(e) else type(e).__name__})")


def load_pretrained(path, device="cpu"):
    """Load a checkpoint directory -> GPT (fp32, eval mode). Raises CheckpointError with one line."""
    path = os.path.abspath(path)
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):
        path = path + ".old"
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    cfg = load_config(path)
    sd = load_weights(path)
    model = GPT(cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}/model.safetensors: weights do not match config.json "
                              f"({str(e).splitlines()[0][:200]})")
    return model.to(device).eval()


def load_tokenizer_for(path, default_path):
    """The tokenizer saved with a checkpoint (or the default), checked against the checkpoint's vocab."""
    from data.countdown import load_tokenizer
    own = os.path.join(path, "tokenizer.json")
    tok = load_tokenizer(own if os.path.isfile(own) else default_path)
    cfg = load_config(path)
    if tok.get_vocab_size() != cfg.vocab_size:
        raise CheckpointError(f"{path}: tokenizer vocab {tok.get_vocab_size()} != checkpoint vocab {cfg.vocab_size}")
    return tok

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


def save_checkpoint(run_dir, model, optimizer, step, tokenizer_path, train_state, keep):
    """Checkpoint step `step` of a (sharded) run and point `latest` at it; keep the newest `keep`.

    Collective: every rank calls it; rank 0 writes. train_state (a dict) goes into train_state.pt beside the
    optimizer state and the step."""
    msd, osd = full_state(model, optimizer)
    if dist.get_rank() == 0:
        name = f"step_{step:06d}"
        ckdir = os.path.join(run_dir, "ckpt")
        save_pretrained(msd, model.cfg, os.path.join(ckdir, name), tokenizer_path,
                        extra={"train_state.pt": dict(optimizer=osd, step=step, **train_state)})
        tmp = os.path.join(run_dir, "latest.tmp")
        with open(tmp, "w") as f:
            f.write(name)
        os.replace(tmp, os.path.join(run_dir, "latest"))  # atomic: `latest` always names a whole checkpoint
        old = sorted(d for d in os.listdir(ckdir) if d.startswith("step_") and d[5:].isdigit())
        for d in old[:-keep]:
            shutil.rmtree(os.path.join(ckdir, d), ignore_errors=True)
    dist.barrier()


def load_train_state(path):
    """(model state dict, train_state.pt's dict) of a checkpoint to resume from; CheckpointError if unreadable."""
    msd = load_weights(path)
    try:
        state = torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}/train_state.pt: cannot resume from it ({str(e).splitlines()[0][:200]})")
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

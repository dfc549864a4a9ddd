"""A small GPT: RMSNorm, rotary positions, causal attention (scaled_dot_product_attention), GELU MLP.

One `forward` serves training, teacher scoring and decoding. Positions are explicit, so left-padded
batches work: a token's position is its index among the row's real tokens, the same whether the row is
scored whole or decoded one token at a time. An optional preallocated KVCache makes decoding one token
per step cost one token of compute.

Checkpoints are directories: model.safetensors + config.json (+ tokenizer.json beside them).
"""
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 23
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_mlp: int = 512
    max_seq_len: int = 64
    rope_base: float = 10000.0


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or does not match what is asked of it."""


class KVCache:
    """Preallocated keys/values for all layers: [n_layer, B, n_head, max_len, head_dim].

    `valid[b, s]` says whether slot s of row b holds a real token (False for left padding); `len` is
    the number of slots filled. Every forward with a cache writes its T tokens at slots len..len+T."""

    def __init__(self, cfg, batch_size, max_len, device=None, dtype=torch.float32):
        hd = cfg.d_model // cfg.n_head
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.len = 0

    def rows(self, index):
        """A new cache whose row i is a copy of row index[i] of this one (e.g. one prompt's keys and values
        for each of its samples)."""
        new = object.__new__(KVCache)
        new.k, new.v, new.valid, new.len = self.k[:, index], self.v[:, index], self.valid[index], self.len
        return new


def distinct_rows(ids, valid):
    """(first, inverse): rows[first] are the distinct rows of the left-padded ids (rows with the same real
    tokens at the same places are equal), and row b equals rows[first][inverse[b]]."""
    key = ids.masked_fill(~valid, -1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    B = ids.size(0)
    first = torch.full((int(inverse.max()) + 1,), B, device=ids.device)
    first = first.scatter_reduce(0, inverse, torch.arange(B, device=ids.device), "amin")
    return first, inverse


def prefill(model, ids, pos, valid, max_len, groups=None):
    """Run left-padded prompts into a new KVCache of max_len slots: (logits of the last column [B, V],
    the cache). groups: distinct_rows(ids, valid) to run a prompt that occurs several times in the batch
    (several samples per prompt) once and copy its keys/values to its rows: the same logits and cache as
    running every row (up to float rounding of the smaller batch), for 1/k of the compute with k samples
    per prompt. None runs every row."""
    B, P = ids.shape
    dtype = next(model.parameters()).dtype
    if groups is None or len(groups[0]) == B:
        cache = KVCache(model.cfg, B, max_len, device=ids.device, dtype=dtype)
        return model(ids, pos, valid, cache, out_from=P - 1)[:, -1], cache
    first, inverse = groups
    cache = KVCache(model.cfg, len(first), max_len, device=ids.device, dtype=dtype)
    logits = model(ids[first], pos[first], valid[first], cache, out_from=P - 1)[:, -1]
    return logits[inverse], cache.rows(inverse)


def rms_norm(x, weight, eps=1e-6):
    return F.rms_norm(x, (x.size(-1),), weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return rms_norm(x, self.weight)


def apply_rope(x, cos, sin):
    """Rotate the two halves of each head: [x1 cos - x2 sin, x1 sin + x2 cos], for q and k together.

    x: [..., hd] (q and k stacked); cos: [..., hd] = [cos, cos]; sin: [..., hd] = [-sin, sin], so the
    rotation is x * cos + [x2, x1] * sin: four ops instead of seven per tensor, the same floats
    (x1 * -s equals -(x1 * s) and a + -b equals a - b exactly; tested against the two-half form)."""
    h = x.size(-1) // 2
    return x * cos + torch.cat([x[..., h:], x[..., :h]], dim=-1) * sin


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.norm1 = RMSNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm2 = RMSNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.fc_out = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, out_from=0):
        """out_from > 0: return only columns out_from.. (keys and values still come from every column)."""
        B, T, D = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(qkv[:2], cos, sin)  # [2, B, H, T, hd]: one rotation for q and k
        v = qkv[2]
        if cache is not None:  # write this chunk's keys/values, attend over everything filled so far
            s0, s1 = cache.len, cache.len + T
            cache.k[layer, :, :, s0:s1] = k
            cache.v[layer, :, :, s0:s1] = v
            k, v = cache.k[layer, :, :, :s1], cache.v[layer, :, :, :s1]
        if out_from:
            q, x = q[:, :, out_from:], x[:, out_from:]
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T - out_from, D))
        return x + self.fc_out(F.gelu(self.fc(self.norm2(x))))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0 and (cfg.d_model // cfg.n_head) % 2 == 0
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        hd = cfg.d_model // cfg.n_head
        inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)
        # full head width, sign folded into sin: see apply_rope
        self.register_buffer("rope_cos", torch.cat([angles.cos(), angles.cos()], -1), persistent=False)
        self.register_buffer("rope_sin", torch.cat([-angles.sin(), angles.sin()], -1), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        for name, p in self.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith(("proj.weight", "fc_out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, pos=None, valid=None, cache=None, out_from=0):
        """Logits [B, T - out_from, V] for tokens idx [B, T].

        pos:      [B, T] positions (default 0..T-1; with left padding use positions_from_valid).
        valid:    [B, T] bool, False on padding keys (left padding); None means every token is real.
        cache:    a KVCache; the tokens are appended at slots cache.len.. and attend to all filled slots.
        out_from: logits only for columns out_from.. (e.g. the completion, or the last prompt token when
                  prefilling a cache). Every column still gives its keys and values in every layer; the
                  last block computes its attention output, MLP, the final norm and the head only for
                  the columns asked for, which is all that reads them. The logits are those of the full
                  forward sliced [:, out_from:] (tested)."""
        B, T = idx.shape
        if not 0 <= out_from < T:
            raise ValueError(f"out_from {out_from} must be in [0, {T})")
        if pos is None:
            pos = torch.arange(T, device=idx.device).expand(B, T)
        dtype = self.head.weight.dtype
        cos = self.rope_cos[pos].unsqueeze(1).to(dtype)  # [B, 1, T, hd]
        sin = self.rope_sin[pos].unsqueeze(1).to(dtype)
        mask = last_mask = None  # None = plain causal
        if cache is not None:
            s0, s1 = cache.len, cache.len + T
            if s1 > cache.k.size(3):
                raise ValueError(f"KV cache full: {s1} > {cache.k.size(3)} slots")
            cache.valid[:, s0:s1] = True if valid is None else valid
            if T == 1:  # one decode step: the query is the newest slot and may see every real filled slot
                # (the last prompt token is real in every row, so no row of the mask is all False)
                mask = cache.valid[:, None, None, :s1]
            else:  # causal & key is real; a query always sees itself, so rows of padding never go all -inf
                qs = torch.arange(s0, s1, device=idx.device)[:, None]
                ks = torch.arange(s1, device=idx.device)[None, :]
                mask = (((ks <= qs) & cache.valid[:, None, :s1]) | (ks == qs)).unsqueeze(1)
        elif valid is not None and not bool(valid.all()):
            ar = torch.arange(T, device=idx.device)
            mask = ((ar[None, :] <= ar[:, None]) & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=idx.device)
            mask = mask.unsqueeze(1)
        if out_from:  # the last block's queries start at column out_from: not top-left causal any more
            if mask is None:
                ar = torch.arange(T, device=idx.device)
                last_mask = ar[None, :] <= ar[out_from:, None]
            else:
                last_mask = mask[:, :, out_from:]
        x = self.embed(idx)
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            if i == n - 1 and out_from:
                x = block(x, cos, sin, last_mask, cache, i, out_from)
            else:
                x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.len += T
        return self.head(self.norm(x))


def positions_from_valid(valid):
    """Position of each token among its row's real tokens (0 for padding before the first real one)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def num_params(model):
    return sum(p.numel() for p in model.parameters())

# -------------------------------------------------------------------------------------------- save/load

def save_pretrained(state_dict, cfg, path, tokenizer_path=None, extra=None):
    """Write a checkpoint directory atomically: into path.tmp, then rename over path.

    `state_dict` is a full (unsharded) state dict; `extra` maps file names to objects for torch.save. A kill at any point leaves either the old directory
    or the new one under `path` (or, between the two renames, the old one at path.old, which
    load_pretrained falls back to)."""
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


def load_pretrained(path, device="cpu"):
    """Load a checkpoint directory -> GPT (fp32, eval mode). Raises CheckpointError with one line."""
    from safetensors.torch import load_file
    path = os.path.abspath(path)
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):
        path = path + ".old"
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    cfg = load_config(path)
    wf = os.path.join(path, "model.safetensors")
    if not os.path.isfile(wf):
        raise CheckpointError(f"{path}: no model.safetensors")
    try:
        sd = load_file(wf, device="cpu")
    except Exception as e:
        raise CheckpointError(f"{wf}: corrupt weights ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    model = GPT(cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{wf}: weights do not match config.json ({str(e).splitlines()[0][:200]})")
    return model.to(device).eval()


def resolve_checkpoint(path):
    """A checkpoint directory, or a run directory whose `latest` file names its newest checkpoint."""
    if os.path.isfile(os.path.join(path, "config.json")) or os.path.isdir(path.rstrip("/") + ".old"):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            return os.path.join(path, "ckpt", f.read().strip())
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: does not exist")
    raise CheckpointError(f"{path}: neither a checkpoint (config.json) nor a run directory (latest)")


def load_tokenizer_for(path, default_path):
    """The tokenizer saved with a checkpoint (or the default), checked against the checkpoint's vocab."""
    from data.countdown import load_tokenizer
    own = os.path.join(path, "tokenizer.json")
    tok = load_tokenizer(own if os.path.isfile(own) else default_path)
    cfg = load_config(path)
    if tok.get_vocab_size() != cfg.vocab_size:
        raise CheckpointError(f"{path}: tokenizer vocab {tok.get_vocab_size()} != checkpoint vocab {cfg.vocab_size}")
    return tok

"""The decoder: RMSNorm, rotary positions, causal attention (scaled_dot_product_attention), an MLP.

One class covers this codebase's own small GPT (GELU MLP, fused untied weights) and the Hugging Face
decoder families through config switches: Llama (SwiGLU, grouped-query attention, llama3 RoPE scaling,
tied or untied embeddings), Qwen2 (q/k/v biases) and Qwen3 (RMSNorm on q and k per head). SmolLM2 is a
Llama. checkpoint.py maps the Hugging Face tensor names and config keys onto these.

One `forward` serves training, teacher scoring and decoding. Positions are explicit, so left-padded
batches work: a token's position is its index among the row's real tokens, the same whether the row is
scored whole or decoded one token at a time. An optional preallocated KVCache makes decoding one token
per step cost one token of compute; a StaticKVCache gives the decode step fixed shapes, so it compiles.

Checkpoint directories (save, load, resume) live in checkpoint.py.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    vocab_size: int = 23
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_mlp: int = 512
    max_seq_len: int = 64
    rope_base: float = 10000.0
    # The switches for the Hugging Face families; the defaults are this codebase's own GPT.
    arch: str = "gpt"            # "gpt", or the checkpoint's model_type: "llama", "qwen2", "qwen3"
    n_kv_head: int = 0           # key/value heads (grouped-query attention); 0 = n_head
    head_dim: int = 0            # 0 = d_model // n_head (Qwen3 sets it independently)
    mlp: str = "gelu"            # "gelu": fc_out(gelu(fc x)); "swiglu": fc_out(silu(gate x) * up x)
    qkv_bias: bool = False       # Qwen2
    qk_norm: bool = False        # Qwen3: RMSNorm over each head of q and k, before RoPE
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    rope_scaling: dict = None    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
                                 #  "original_max_position_embeddings"}
    hf_config: dict = None       # a Hugging Face checkpoint's config.json, written back on save

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def hd(self):
        return self.head_dim or self.d_model // self.n_head


class KVCache:
    """Preallocated keys/values for all layers: [n_layer, B, kv_heads, max_len, head_dim].

    `valid[b, s]` says whether slot s of row b holds a real token (False for left padding); `len` is
    the number of slots filled. A forward of T tokens writes them at slots len..len+T in every layer
    (`update`, called by attention), then advances len by T. The key/value storage takes the dtype of the
    first keys written (fp32 on CPU, bf16 under FSDP's bf16 mixed precision)."""

    def __init__(self, cfg, batch_size, max_len, device=None):
        self.shape = (cfg.n_layer, batch_size, cfg.kv_heads, max_len, cfg.hd)
        self.k = self.v = None
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len, self.len = max_len, 0

    def update(self, layer, k, v):
        """Write this chunk's keys/values [B, H, T, hd] of `layer` at slots len..len+T; return the layer's
        keys/values over every filled slot, which the chunk attends to."""
        if self.k is None:
            self.k = torch.zeros(self.shape, device=k.device, dtype=k.dtype)
            self.v = torch.zeros(self.shape, device=v.device, dtype=v.dtype)
        s1 = self.len + k.size(2)
        self.k[layer, :, :, self.len:s1] = k
        self.v[layer, :, :, self.len:s1] = v
        return self.k[layer, :, :, :s1], self.v[layer, :, :, :s1]

    def rows(self, index):
        """A new cache whose row i is a copy of row index[i] of this one (e.g. one prompt's keys and values
        for each of its samples)."""
        new = object.__new__(KVCache)
        new.k, new.v, new.valid, new.len = self.k[:, index], self.v[:, index], self.valid[index], self.len
        new.shape, new.max_len = (self.shape[0], len(index), *self.shape[2:]), self.max_len
        return new

    def begin(self, T, valid, device):
        """Mark slots len..len+T real where `valid` says so (None: all); return the attention mask of these T
        queries over the filled slots [B, 1, T, len+T]."""
        s0, s1 = self.len, self.len + T
        if s1 > self.max_len:
            raise ValueError(f"KV cache full: {s1} > {self.max_len} slots")
        self.valid[:, s0:s1] = True if valid is None else valid
        if T == 1:  # one decode step: the query is the newest slot and may see every real filled slot
            # (the last prompt token is real in every row, so no row of the mask is all False)
            return self.valid[:, None, None, :s1]
        # causal & key is real; a query always sees itself, so rows of padding never go all -inf
        qs = torch.arange(s0, s1, device=device)[:, None]
        ks = torch.arange(s1, device=device)[None, :]
        return (((ks <= qs) & self.valid[:, None, :s1]) | (ks == qs)).unsqueeze(1)

    def advance(self, T):
        self.len += T


class StaticKVCache:
    """KVCache storage seen with shapes that never change, so that the one-token decode step compiles once
    (torch.compile; CUDA graphs on GPU): the slot to write is a tensor, not a Python int, and every step
    attends over all max_len slots, the unfilled ones masked out by `valid`. load() copies a prefilled
    KVCache in, so one StaticKVCache serves every rollout of its shape at the same addresses (CUDA graphs
    replay on them). The same keys, values and masks as the KVCache: the same logits, up to the order of
    float sums. One token per forward."""

    def __init__(self, shape, max_len, dtype, device):
        # one tensor per layer: a write into a view of one big tensor would make the compiled step copy
        # all of it back every step; a write into a whole tensor stays in place
        self.k = [torch.zeros(shape[1:], dtype=dtype, device=device) for _ in range(shape[0])]
        self.v = [torch.zeros(shape[1:], dtype=dtype, device=device) for _ in range(shape[0])]
        self.valid = torch.zeros(shape[1], max_len, dtype=torch.bool, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.max_len = max_len
        for t in (*self.k, *self.v, self.valid, self.slot):  # torch.compile: the storage never moves
            torch._dynamo.mark_static_address(t)

    def load(self, cache):
        for layer in range(len(self.k)):
            self.k[layer].copy_(cache.k[layer])
            self.v[layer].copy_(cache.v[layer])
        self.valid.copy_(cache.valid)
        self.slot.fill_(cache.len)
        return self

    def update(self, layer, k, v):
        self.k[layer][:, :, self.slot] = k
        self.v[layer][:, :, self.slot] = v
        return self.k[layer], self.v[layer]

    def begin(self, T, valid, device):
        if T != 1:
            raise ValueError("a StaticKVCache takes one token per forward")
        self.valid[:, self.slot] = True if valid is None else valid
        return self.valid[:, None, None, :]

    def advance(self, T):
        self.slot += T  # in place: the compiled step reads it, so the next step needs no new input


class GradKV(KVCache):
    """A KV cache for a forward with gradients: each layer's keys/values are the autograd graph's own tensors,
    extended by concatenation instead of written in place (the masks are KVCache's), so a loss on later
    tokens sends its gradient back through the cached ones. With rows() a prompt shared by several rows runs
    once and its keys and values are gathered into every row (train.py's student with --samples-per-prompt
    > 1)."""

    def __init__(self, cfg, batch_size, max_len, device=None):
        self.k, self.v = [None] * cfg.n_layer, [None] * cfg.n_layer
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len, self.len = max_len, 0

    def update(self, layer, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def rows(self, index):
        new = object.__new__(GradKV)
        new.k, new.v = [k[index] for k in self.k], [v[index] for v in self.v]
        new.valid, new.max_len, new.len = self.valid[index], self.max_len, self.len
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


def prefill(model, ids, pos, valid, max_len, groups=None, head=None, cache_cls=KVCache):
    """Run left-padded prompts into a new KVCache of max_len slots: (logits of the last column [B, V], or
    with head=lambda h, W: h its hidden state [B, d]; the cache). groups: distinct_rows(ids, valid) to run a prompt that occurs several times in the batch
    (several samples per prompt) once and copy its keys/values to its rows: the same logits and cache as
    running every row (up to float rounding of the smaller batch), for 1/k of the compute with k samples
    per prompt. None runs every row. cache_cls: GradKV for a forward with gradients."""
    B, P = ids.shape
    if groups is None or len(groups[0]) == B:
        cache = cache_cls(model.cfg, B, max_len, device=ids.device)
        return model(ids, pos, valid, cache, out_from=P - 1, head=head)[:, -1], cache
    first, inverse = groups
    cache = cache_cls(model.cfg, len(first), max_len, device=ids.device)
    logits = model(ids[first], pos[first], valid[first], cache, out_from=P - 1, head=head)[:, -1]
    return logits[inverse], cache.rows(inverse)


def forward_from(model, tokens, pos, valid, start, head=None, groups=None, cache_cls=KVCache):
    """model's outputs where it predicts tokens start..T-1 of tokens [B, T]: head(h, W) of the final-normed
    hidden states h [B, T - start, d] there (default: the logits h W^T). The forward computes the last block
    only from column start - 1 on (GPT.forward's out_from).

    groups (distinct_rows of the first `start` columns, the prompts; rollout.shared_prompts): each distinct
    prompt runs once into a cache (cache_cls: GradKV for a forward with gradients) and every row's rest runs
    over its copy: the same outputs up to float rounding, for 1/k of the prompt's compute with k rows per
    prompt; with GradKV the gradient flows back through the gathered keys and values into the one prompt
    forward. That is two forwards instead of one: every rank must pass groups or none (FSDP)."""
    head = head or (lambda h, w: F.linear(h, w))
    if groups is None:
        return model(tokens, pos, valid, out_from=start - 1, head=lambda h, w: head(h[:, :-1], w))
    last, cache = prefill(model, tokens[:, :start], pos[:, :start], valid[:, :start], tokens.size(1), groups,
                          head=lambda h, w: h, cache_cls=cache_cls)
    return model(tokens[:, start:], pos[:, start:], valid[:, start:], cache,
                 head=lambda h, w: head(torch.cat([last[:, None], h[:, :-1]], 1), w))


def rms_norm(x, weight, eps=1e-6):
    return F.rms_norm(x, (x.size(-1),), weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(cfg):
    """The rotation frequency of each pair of head dimensions; llama3 scaling divides the low frequencies
    by `factor` and blends smoothly between the two wavelength thresholds."""
    hd = cfg.hd
    inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    s = cfg.rope_scaling
    if not s:
        return inv_freq
    factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - lo) / (hi - lo)
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def apply_rope(x, cos, sin):
    """Rotate the two halves of each head: [x1 cos - x2 sin, x1 sin + x2 cos] (the rotate-half form).

    x: [..., hd]; cos: [..., hd] = [cos, cos]; sin: [..., hd] = [-sin, sin], so the
    rotation is x * cos + [x2, x1] * sin: four ops instead of seven per tensor, the same floats
    (x1 * -s equals -(x1 * s) and a + -b equals a - b exactly; tested against the two-half form)."""
    h = x.size(-1) // 2
    return x * cos + torch.cat([x[..., h:], x[..., :h]], dim=-1) * sin


class Block(nn.Module):
    """Pre-norm attention + MLP. q, k and v come from one fused projection (q rows, then k, then v), the
    SwiGLU gate and up projections from one fused `fc` (gate rows, then up)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv, self.hd, self.swiglu = cfg.n_head, cfg.kv_heads, cfg.hd, cfg.mlp == "swiglu"
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * self.n_kv) * self.hd, bias=cfg.qkv_bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.norm_eps), RMSNorm(self.hd, cfg.norm_eps)
        self.proj = nn.Linear(cfg.n_head * self.hd, cfg.d_model, bias=False)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.fc = nn.Linear(cfg.d_model, (2 if self.swiglu else 1) * cfg.d_mlp, bias=False)
        self.fc_out = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, out_from=0):
        """out_from > 0: return only columns out_from.. (keys and values still come from every column)."""
        q, k, v = self.qkv_rope(x, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if out_from:
            q, x = q[:, :, out_from:], x[:, out_from:]
        gqa = {"enable_gqa": True} if self.n_kv != self.n_head else {}
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        return self.proj_mlp(x, y)

    # the two halves around attention and the cache; GPT.compile_blocks compiles them
    def qkv_rope(self, x, cos, sin):
        """Queries, keys and values [B, heads, T, hd], rotated, from the block's input x [B, T, d]."""
        B, T, _ = x.shape
        H, KV, hd = self.n_head, self.n_kv, self.hd
        qkv = self.qkv(self.norm1(x)).split([H * hd, KV * hd, KV * hd], -1)
        q, k, v = (t.view(B, T, -1, hd).transpose(1, 2) for t in qkv)  # [B, heads, T, hd]
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def proj_mlp(self, x, y):
        """The output projection of the attention's y [B, heads, T, hd] and the MLP, each with its residual."""
        B, T, _ = x.shape
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, -1))
        h = self.fc(self.norm2(x))
        if self.swiglu:
            gate, up = h.chunk(2, -1)
            return x + self.fc_out(F.silu(gate) * up)
        return x + self.fc_out(F.gelu(h))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.hd % 2 == 0 and cfg.n_head % cfg.kv_heads == 0
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.checkpoint_blocks = False  # activation checkpointing (train.py --activation-checkpointing)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def compile_blocks(self, on=True):
        """train.py --compile: each block's two halves around attention (norms, projections, rotation, MLP)
        compiled by inductor with dynamic shapes, so one compile serves every length and batch and, the blocks
        being alike, every block; attention and the KV cache stay eager between them. Not for decoding, which
        compiles its whole step on a replica (rollout.decode_replica). on=False: eager again."""
        for b in self.blocks:
            for name in ("qkv_rope", "proj_mlp"):
                b.__dict__.pop(name, None)
                if on:
                    setattr(b, name, torch.compile(getattr(b, name), dynamic=True))

    def reset_parameters(self):
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith(("norm1.weight", "norm2.weight")):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith(("proj.weight", "fc_out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def rope(self, pos, dtype):
        """cos and sin [B, 1, T, hd] at positions pos [B, T], full head width with the sign folded into sin
        (see apply_rope); computed in fp32 from the positions, so any context length works."""
        angles = pos.to(torch.float32)[..., None] * self.inv_freq
        cos, sin = angles.cos(), angles.sin()
        return (torch.cat([cos, cos], -1).unsqueeze(1).to(dtype),
                torch.cat([-sin, sin], -1).unsqueeze(1).to(dtype))

    def forward(self, idx, pos=None, valid=None, cache=None, out_from=0, head=None):
        """Logits [B, T - out_from, V] for tokens idx [B, T], or head(h, W).

        pos:      [B, T] positions (default 0..T-1; with left padding use positions_from_valid).
        valid:    [B, T] bool, False on padding keys (left padding); None means every token is real.
        cache:    a KVCache; the tokens are appended at slots cache.len.. and attend to all filled slots.
        out_from: logits only for columns out_from.. (e.g. the completion, or the last prompt token when
                  prefilling a cache). Every column still gives its keys and values in every layer; the
                  last block computes its attention output, MLP, the final norm and the head only for
                  the columns asked for, which is all that reads them. The logits are those of the full
                  forward sliced [:, out_from:] (tested).
        head:     a function of (h, W), the final-normed hidden states [B, T - out_from, d] and the output
                  head's weight [V, d], whose result is returned in place of the logits h W^T: a loss that
                  computes the logits a chunk of positions at a time (losses.py), never all of them. It runs
                  inside the forward, where FSDP holds the gathered weight and sees its gradient."""
        B, T = idx.shape
        if not 0 <= out_from < T:
            raise ValueError(f"out_from {out_from} must be in [0, {T})")
        if pos is None:
            pos = torch.arange(T, device=idx.device).expand(B, T)
        cos, sin = self.rope(pos, self.head.weight.dtype)
        mask = last_mask = None  # None = plain causal
        if cache is not None:
            mask = cache.begin(T, valid, idx.device)
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
        # activation checkpointing: a block keeps only its input and runs again in backward; not with a cache,
        # which a second run would extend again
        recompute = self.checkpoint_blocks and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            last = i == n - 1 and out_from
            args = (x, cos, sin, last_mask, cache, i, out_from) if last else (x, cos, sin, mask, cache, i)
            x = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        return self.head(x) if head is None else head(x, self.head.weight)


def positions_from_valid(valid):
    """Position of each token among its row's real tokens (0 for padding before the first real one)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def num_params(model, trainable=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def keep_layers(model, layers):
    """A new model made of the given blocks of `model` (e.g. every third: a student initialised from its
    teacher), with the same embedding, final norm and head."""
    import copy
    from dataclasses import replace
    cfg = replace(model.cfg, n_layer=len(layers))
    new = GPT(cfg)
    new.embed, new.norm, new.head = copy.deepcopy(model.embed), copy.deepcopy(model.norm), copy.deepcopy(model.head)
    if cfg.tie_embeddings:
        new.head.weight = new.embed.weight
    new.blocks = nn.ModuleList(copy.deepcopy(model.blocks[i]) for i in layers)
    return new


def layer_slice(spec, n_layer):
    """The block indices a START:STOP:STEP slice (STEP > 0) keeps out of n_layer, in order; ValueError."""
    try:
        parts = [int(x) if x.strip() else None for x in spec.split(":")]
        layers = list(range(n_layer))[slice(*parts)] if 1 <= len(parts) <= 3 and spec.strip() else []
        layers = layers if len(parts) < 3 or parts[2] is None or parts[2] > 0 else []
    except ValueError:
        layers = []
    if not layers:
        raise ValueError(f"--keep-layers {spec!r}: not a START:STOP:STEP slice (STEP > 0) that keeps some of "
                         f"{n_layer} layers in order")
    return layers

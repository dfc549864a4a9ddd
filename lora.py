"""Low-rank adapters (LoRA, Hu et al. 2021) on the student's linears, the rest of the model frozen.

An adapted linear computes  y = x W^T + b + (alpha / r) (x A^T) B^T  with the base W, b frozen, A [r, in]
random and B [out, r] zero, so a fresh adapter leaves the model's output exactly as it was. The adapted
linears are each block's fused qkv, proj, fc (gate and up for SwiGLU) and fc_out: every matrix of the
attention and the MLP in every family model.py has. The embedding, the norms and the output head stay frozen.

The base keeps its parameter names (blocks.0.qkv.weight, ...) and the adapters sit beside it
(blocks.0.qkv.lora_a, .lora_b). `merge` folds them into plain weights, W + (alpha / r) B A under the base's
names, so a saved checkpoint is an ordinary one that loads with no LoRA code (checkpoint.save_checkpoint);
what resume needs beyond it, the unmerged base weights and the adapters, goes into the training state.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("qkv", "proj", "fc", "fc_out")  # model.Block's linears: attention and MLP


class LoRALinear(nn.Module):
    """A frozen nn.Linear's weight (and bias) plus a trainable rank-r update."""

    def __init__(self, base, rank, alpha, generator=None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters, frozen
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        w = self.weight
        # A as nn.Linear(in, r) would start (U(+-1/sqrt(in))); B zero: the update B A starts at exactly zero
        bound = 1 / math.sqrt(self.in_features)
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype).uniform_(
            -bound, bound, generator=generator).to(w.device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


def max_rank(model):
    """The largest useful rank: min(in, out) over the adapted linears (a higher rank adds parameters, never
    directions)."""
    return min(min(getattr(b, n).in_features, getattr(b, n).out_features) for b in model.blocks for n in TARGETS)


def add_lora_args(g):
    """train.py's adapter flags, in its group g (their checks: check_lora_args)."""
    g.add_argument("--lora-rank", type=int, default=None, help="train rank-r adapters on the student's attention "
                   "and MLP linears, everything else frozen (lora.py; default: full fine-tuning); checkpoints are "
                   "saved merged, as plain weights")
    g.add_argument("--lora-alpha", type=float, default=None, help="the adapters' update is scaled by alpha / rank "
                   "(default 2 * rank: a scale of 2 at every rank)")


def check_lora_args(args):
    """Refuse (ValueError, one line) train.py's --lora-* flags when they would do nothing or cannot work; fill
    --lora-alpha's default (2 x rank: a scale of 2 at every rank)."""
    if args.lora_rank is not None and args.lora_rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {args.lora_rank} (leave it out for full fine-tuning)")
    if args.lora_alpha is not None and args.lora_rank is None:
        raise ValueError("--lora-alpha needs --lora-rank (without adapters it would do nothing)")
    if args.lora_alpha is not None and not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        raise ValueError(f"--lora-alpha must be a finite number > 0, got {args.lora_alpha}")
    if args.lora_rank and args.student is None:
        raise ValueError("--lora-rank needs a --student to adapt (a fresh model has no base worth freezing)")
    if args.lora_rank and args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_rank


def add_lora(model, rank, alpha, seed=0):
    """Put rank-`rank` adapters on every block's attention and MLP linears and freeze everything else (in
    place; returns the model). A is drawn from a generator seeded with `seed`, so every process and every
    world size starts from the same adapters. ValueError (one line) for a rank outside 1..max_rank."""
    top = max_rank(model)
    if not 1 <= rank <= top:
        raise ValueError(f"--lora-rank {rank} must be in 1..{top} (the smallest in/out width of the adapted "
                         f"linears)")
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for block in model.blocks:
        for name in TARGETS:
            setattr(block, name, LoRALinear(getattr(block, name), rank, alpha, g))
    return model


def trainable_params(model):
    return [p for p in model.parameters() if p.requires_grad]


def is_adapter(name):
    return name.endswith((".lora_a", ".lora_b"))


def scale_of(model):
    """alpha / r of the model's adapters (one rank and alpha for all of them); None for a model without."""
    return next((m.scale for m in model.modules() if isinstance(m, LoRALinear)), None)


def merge(sd, scale):
    """(plain, extra) from a full state dict of a model with adapters of scale alpha / r: `plain` has exactly
    the names of the model without adapters, each adapted weight merged to W + scale B A; `extra` holds what
    it takes to rebuild the adapted state dict bit for bit (plain updated with extra): the unmerged base
    weights and the adapters. A state dict without adapters comes back as it is, with extra empty."""
    plain = {k: v for k, v in sd.items() if not is_adapter(k)}
    extra = {}
    for k in sd:
        if k.endswith(".lora_a"):
            mod = k[:-len(".lora_a")]
            a, b, w = sd[k], sd[mod + ".lora_b"], sd[mod + ".weight"]
            extra |= {mod + ".weight": w, k: a, mod + ".lora_b": b}
            plain[mod + ".weight"] = w + scale * (b @ a)
    return plain, extra

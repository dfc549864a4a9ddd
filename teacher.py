"""The frozen teacher: load it, check it speaks the student's tokenizer, and score sequences.

The teacher never trains: eval mode, requires_grad off, no optimizer state, every call under no_grad.
One forward pass scores a whole batch (prompt + completion) in the shared layout of rollout.Batch, with
the same positions the student used when sampling (two when rows share prompts: each distinct prompt
once, then the completions over its cached keys and values; see score). A teacher with another
tokenizer scores the same text in its own tokens (crosstok.py builds that batch).
"""
import torch

from chat import load_chat
from checkpoint import load_pretrained, resolve_checkpoint
from data.countdown import countdown_format
from distributed import any_rank
from model import distinct_rows, prefill


def load_teacher(path, default_tokenizer=None):
    """(frozen model on CPU, its Countdown format) of a teacher checkpoint or run directory. Raises
    CheckpointError / ValueError with one line."""
    path = resolve_checkpoint(path)
    fmt = countdown_format(load_chat(path, default_tokenizer))
    return load_pretrained(path).requires_grad_(False), fmt


def check_same_tokenizer(student_tok, teacher_tok):
    """Token-level losses compare distributions id by id: the vocabularies must be identical."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        diff = sorted(set(sv.items()) ^ set(tv.items()))[:3]
        raise ValueError(f"teacher and student tokenizers differ (vocab {len(tv)} vs {len(sv)}, e.g. {diff}); "
                         "same-tokenizer losses need identical vocabularies")


def hidden(h, w):
    """A forward's head= that returns the final-normed hidden states instead of the logits."""
    return h


def head_weight(teacher, dtype=None):
    """The teacher's output head [V, d] as one plain tensor on every rank, gathered once (the teacher is
    frozen, so nothing is ever reduced into it): with score(hidden_states=True) the losses make its logits a chunk
    of positions at a time (losses.head_*)."""
    w = teacher.head.weight.detach()
    w = w.full_tensor() if hasattr(w, "full_tensor") else w  # an FSDP2 DTensor shard: gather it
    return w.to(dtype) if dtype is not None else w


@torch.no_grad()
def score(teacher, batch, autocast=False, start=1, share_prompts=True, hidden_states=False):
    """Teacher logits predicting tokens start..T-1: [B, T-start, V] in the model's dtype (fp32 on CPU; the
    losses upcast one chunk of positions at a time), row i scores
    batch.tokens[:, start + i]. hidden_states: the final-normed hidden states [B, T-start, d] instead, whose
    logits the fused losses make with head_weight a chunk at a time. start=batch.prompt_len scores only the completion region (all a
    same-tokenizer loss reads; the forward skips the rest where it can, see GPT.forward's out_from).

    There, when rows share a prompt (--samples-per-prompt > 1) and share_prompts is on, each distinct
    prompt runs once into a KV cache (model.prefill) and the completions run on their copies of it:
    the same logits up to float rounding, with the prompt's compute divided by the samples per prompt."""
    P, T = batch.prompt_len, batch.tokens.size(1)
    head = hidden if hidden_states else None
    with torch.autocast(batch.tokens.device.type, torch.bfloat16, enabled=autocast):
        if start == P and share_prompts and P > 1:
            groups = distinct_rows(batch.tokens[:, :P], batch.valid[:, :P])
            if any_rank(len(groups[0]) < len(batch.tokens), batch.tokens.device):
                pos = batch.pos
                last, cache = prefill(teacher, batch.tokens[:, :P], pos[:, :P], batch.valid[:, :P], T, groups, head)
                rest = teacher(batch.tokens[:, P:], pos[:, P:], batch.valid[:, P:], cache, head=head)
                return torch.cat([last[:, None], rest[:, :-1]], 1)
        logits = teacher(batch.tokens, batch.pos, batch.valid, out_from=start - 1, head=head)
    return logits[:, :-1]

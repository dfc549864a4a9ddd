"""The frozen teacher: load it, check it speaks the student's tokenizer, and score sequences.

The teacher never trains: eval mode, requires_grad off, no optimizer state, every call under no_grad.
One forward pass scores a whole batch (prompt + completion) in the shared layout of rollout.Batch, with
the same positions the student used when sampling.
"""
import torch
import torch.nn.functional as F

from model import load_pretrained, load_tokenizer_for, resolve_checkpoint


def load_teacher(path, device="cpu", default_tokenizer=None):
    """(model, tokenizer) of a frozen teacher checkpoint. Raises CheckpointError/ValueError with one line."""
    path = resolve_checkpoint(path)
    tok = load_tokenizer_for(path, default_tokenizer)
    model = load_pretrained(path, device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tok


def check_same_tokenizer(student_tok, teacher_tok):
    """Token-level losses compare distributions id by id: the vocabularies must be identical."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        diff = sorted(set(sv.items()) ^ set(tv.items()))[:3]
        raise ValueError(f"teacher and student tokenizers differ (vocab {len(tv)} vs {len(sv)}, e.g. {diff}); "
                         "same-tokenizer losses need identical vocabularies")


@torch.no_grad()
def score(teacher, batch, autocast=False):
    """Teacher logits (fp32) predicting each next token: [B, T-1, V], row t scores batch.tokens[:, t+1]."""
    with torch.autocast(batch.tokens.device.type, torch.bfloat16, enabled=autocast):
        logits = teacher(batch.tokens, batch.pos, batch.valid)
    return logits[:, :-1].float()


def token_logprobs(logits, tokens):
    """log softmax(logits) at the given tokens: logits [B, T, V], tokens [B, T] -> [B, T] fp32."""
    return F.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

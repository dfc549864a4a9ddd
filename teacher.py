"""The frozen teacher: load it (with its own tokenizer), check it can teach the student, and score sequences
(teacher_scores: the teacher's part of a training step).

The teacher never trains: eval mode, requires_grad off, no optimizer state, every call under no_grad.
One forward pass scores a whole batch (prompt + completion) in the shared layout of rollout.Batch, with
the same positions the student used when sampling (two when rows share prompts: each distinct prompt
once, then the completions over its cached keys and values: model.forward_from). A teacher with another
tokenizer scores the same text in its own tokens (crosstok.py builds that batch); the self-teacher
(--teacher self) the same completions after its own context prompts (selfdistill.py). A speculative KD
rollout already ran the teacher over its rows while decoding and kept its hidden states: teacher_scores
reads those instead (reuses_rollout).
"""
import torch

from chat import load_chat
from checkpoint import load_pretrained, resolve_checkpoint
from crosstok import cross_tokenizer_batch
from data.countdown import countdown_format
from distributed import any_rank
from model import forward_from


def load_teacher(path):
    """(frozen model on CPU, its Countdown format) of a teacher checkpoint or run directory, which must hold
    its own tokenizer.json: a teacher never borrows the student's. Raises CheckpointError / ValueError with
    one line."""
    path = resolve_checkpoint(path)
    model = load_pretrained(path).requires_grad_(False)  # the weights' errors first
    return model, countdown_format(load_chat(path))


def check_teacher(t_fmt, fmt, t_cfg, args):
    """Whether the teacher speaks another tokenizer than the student (cross: crosstok.py's span-aligned losses;
    --cross-tokenizer auto decides by the vocabularies), refusing (ValueError) what cannot work with it."""
    same = fmt.tok.get_vocab() == t_fmt.tok.get_vocab()
    if args.cross_tokenizer == "off" or (same and args.cross_tokenizer == "auto"):
        check_same_tokenizer(fmt.tok, t_fmt.tok)
    cross = args.cross_tokenizer == "on" or not same
    if cross and args.seq_kd:
        raise ValueError("--seq-kd with a cross-tokenizer teacher is not supported (its samples are in the "
                         "teacher's tokens)")
    if cross and args.teacher_top_k is not None:
        raise ValueError("--teacher-top-k needs the student's tokenizer: the cross-tokenizer losses align spans of "
                         "text, not the teacher's token ids")
    if cross and args.task == "instruct":  # its only measures are the teacher-gap ones, same-tokenizer only
        raise ValueError("--task instruct needs a teacher with the student's tokenizer (its evals are KL and "
                         "agreement against the teacher, token by token)")
    if cross and args.rollout == "skd":
        raise ValueError("--rollout skd needs the teacher's tokenizer: across tokenizers a student token is not "
                         "one of the teacher's, so 'in the teacher's top k' is not defined")
    if args.rollout == "skd" and args.skd_top_k > t_cfg.vocab_size:
        raise ValueError(f"--skd-top-k {args.skd_top_k} is above the vocabulary ({t_cfg.vocab_size})")
    return cross


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
def score(teacher, batch, start=1, groups=None, hidden_states=False):
    """Teacher logits predicting tokens start..T-1: [B, T-start, V] in the model's dtype (fp32 on CPU; the
    losses upcast one chunk of positions at a time), row i scores batch.tokens[:, start + i]. hidden_states:
    the final-normed hidden states [B, T-start, d] instead, whose logits the fused losses make with
    head_weight a chunk at a time. start=batch.prompt_len scores only the completion region (all a
    same-tokenizer loss reads). groups (rollout.shared_prompts): each distinct prompt runs once
    (model.forward_from)."""
    return forward_from(teacher, batch.tokens, batch.pos, batch.valid, start, hidden if hidden_states else None,
                        groups)


def reuses_rollout(batch):
    """Whether teacher_scores takes the teacher's hidden states from the speculative KD rollout instead of a
    forward: when every row of the batch, on every rank, has them (all on-policy; a given row still needs
    scoring, and then the whole batch is scored, as ranks must run the same forwards)."""
    if batch.teacher_hidden is None:  # no --rollout skd rows here, nor on any rank (each holds as many)
        return False
    return not any_rank(not bool(batch.on_policy.all()), batch.tokens.device)


def teacher_scores(teacher, batch, rows, groups, run, reuse=False):
    """(the teacher's output for the loss, the cross-tokenizer alignment or None). With the student's
    tokenizer, its final hidden states where they predict the completion tokens: the losses make the logits
    from them and run.t_head a chunk of positions at a time; those it computed while decoding the batch
    (--rollout skd: Batch.teacher_hidden) with reuse (= reuses_rollout(batch)), with no second forward. With another
    tokenizer (run.cross), the logits of the same text in the teacher's tokens (crosstok.py; ValueError where
    its tokenizer cannot reproduce the text). The live self-teacher (selfdistill.py) is the training student:
    its head is gathered again here, as it moved since the last call."""
    if getattr(run, "context", None) is not None and run.args.self_teacher == "live":
        # a copy: right after decoding FSDP may hold the head unsharded, in memory its next reshard frees
        run.t_head = head_weight(teacher, run.t_head.dtype).clone()
    if not run.cross:
        if reuse:
            return batch.teacher_hidden[:, batch.prompt_len:], None
        return score(teacher, batch, batch.prompt_len, groups, hidden_states=True), None
    try:
        cb, err = cross_tokenizer_batch(batch, [r.problem for r in rows], run.fmt.tok, run.t_fmt.tok,
                                        teacher.cfg.max_seq_len, run.t_fmt), None
    except ValueError as e:
        cb, err = None, e
    if any_rank(err is not None, batch.tokens.device):  # every rank stops, none waits in the teacher's forward
        raise err or ValueError("another process's rows hold text the teacher's tokenizer cannot reproduce")
    return score(teacher, cb.teacher), cb

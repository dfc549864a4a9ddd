"""On-policy self-distillation (--teacher self): the model is its own teacher, given privileged context.

As in SDFT / SDPO (TRL) and on-policy self-distillation (OPSD): the student samples its completion from the
plain prompt; the teacher is the same model reading a prompt WITH privileged context (here the problem's
solution) and scores the student's completion tokens; the loss is any --loss divergence between the two
next-token distributions at those tokens. No second model.

    --teacher self                      the teacher is a frozen copy of the student's starting weights
    --self-teacher live                 ... or the training student itself, without gradient
    --self-context TEMPLATE             the teacher's prompt text: {prompt} and {solution} filled in

The teacher's sequence is [context prompt] + [the student's completion tokens]: one tokenizer, so the
completion columns are the student's own and only the left-padded prompt differs (context_batch). The
teacher's hidden states at those columns then take the place of a separate teacher's in every loss path
(head-fused, micro-batches, shared prompts, N processes).

{prompt} is the plain prompt's text as the format writes it (char: "3 7 13>88:"; chat: the user message,
then rendered through the chat template), {solution} the ground-truth answer as the model is trained to
write it (char: the step list "7*13=91,91-3=88"; chat: "<answer>(7*13)-3</answer>").
"""
import string

import torch

from checkpoint import load_pretrained, resolve_checkpoint
from data import TASK_SPLITS
from data.countdown import BOS, UNK, CharFormat, chat_prompt_text, prompt_text
from flops import flops_score
from model import keep_layers, layer_slice
from rollout import Batch, left_pad, shared_prompts

SELF = "self"  # --teacher self: a path would be ./self
# char models know no letters: the solution then the problem, in their own characters (any context ruins
# the shipped char models' predictions: docs/self_distillation.md); chat models read a note in the turn
DEFAULT_CONTEXT = {"char": "{solution} {prompt}", "chat": "{prompt}\n(A correct answer: {solution})"}


def add_self_args(g):
    """train.py's self-distillation flags (their checks: check_self_args)."""
    g.add_argument("--self-teacher", default=None, choices=["frozen", "live"], help="--teacher self: a frozen copy "
                   "of the student's starting weights (frozen, the default) or the training student without gradient")
    g.add_argument("--self-context", default=None, metavar="TEMPLATE", help="--teacher self: the teacher's prompt "
                   "text, {prompt} (the plain prompt) and {solution} (the ground-truth answer) filled in (default: "
                   f"char models {DEFAULT_CONTEXT['char']!r}, chat models {DEFAULT_CONTEXT['chat']!r})")


def check_self_args(args):
    """Refuse (ValueError, one line) self-distillation flags that cannot work; fill --self-teacher's default."""
    if args.teacher != SELF:
        if args.self_teacher is not None or args.self_context is not None:
            raise ValueError("--self-teacher and --self-context apply only with --teacher self")
        return
    args.self_teacher = args.self_teacher or "frozen"
    for bad, why in ((args.stage != "distill", "needs --stage distill"),
                     (args.seq_kd, "with --seq-kd is not supported: the off-policy rows would be the self-teacher's "
                                   "samples from its context prompt, which the student never reads"),
                     (args.rollout == "skd", "with --rollout skd is not supported: the teacher's decoding would need "
                                             "its own context prompt beside the student's"),
                     (args.cross_tokenizer == "on", "is the student's tokenizer: --cross-tokenizer on does not apply"),
                     (args.sft_mix, "with --sft-mix is not supported: the mixed-in task has no solution to read")):
        if bad:
            raise ValueError(f"--teacher self {why}")
    if args.self_context is not None:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(args.self_context) if f is not None}
        except ValueError as e:
            raise ValueError(f"--self-context {args.self_context!r}: {e}")
        if "prompt" not in fields or fields - {"prompt", "solution"}:
            raise ValueError(f"--self-context {args.self_context!r} must hold {{prompt}} and may hold {{solution}}, "
                             "nothing else in braces")


class ContextPrompts:
    """The self-teacher's prompt ids of a problem (numbers, target, solution): the template filled in and
    rendered in the model's format (char: [BOS] + its characters; chat: the user turn of its chat template)."""

    def __init__(self, fmt, template=None):
        self.fmt, self.chat = fmt, not isinstance(fmt, CharFormat)
        self.template = template if template is not None else DEFAULT_CONTEXT["chat" if self.chat else "char"]

    def text(self, problem):
        numbers, target, solution = problem
        answer = self.fmt.decode(self.fmt.answer_ids(solution)[:-1])  # without its eos
        return self.template.format(prompt=(chat_prompt_text if self.chat else prompt_text)(numbers, target),
                                    solution=answer)

    def __call__(self, problem):
        text = self.text(problem)
        if self.chat:
            return self.fmt._chat.prompt_ids([{"role": "user", "content": text}])
        tok = self.fmt.tok
        ids = tok.encode(text).ids
        if tok.token_to_id(UNK) in ids:  # the char vocabulary: digits, + - * / = , > : and space
            raise ValueError(f"--self-context: {text!r} has characters the char tokenizer does not hold")
        return [tok.token_to_id(BOS)] + ids


def self_teacher(args, student):
    """The --teacher self model: the student itself (live), or its starting weights loaded again from
    --student (frozen; also on --resume, whose student comes from the run's latest checkpoint), cut by
    --keep-layers as the student was, without LoRA adapters."""
    if args.self_teacher == "live":
        return student
    teacher = load_pretrained(resolve_checkpoint(args.student))
    if args.keep_layers:
        teacher = keep_layers(teacher, layer_slice(args.keep_layers, teacher.cfg.n_layer))
    return teacher.requires_grad_(False)


def check_context_fits(prompts, cfg, max_new_tokens):
    """Refuse (ValueError) a context prompt that, with the rollout budget, would not fit the model's context
    (every split's problems: eval never reads a context, but a run may train on any problem)."""
    longest = max(max(len(prompts(p)) for p in TASK_SPLITS["countdown"](s)) for s in ("train", "val", "test"))
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"--teacher self: the longest context prompt ({longest} tokens) + --max-new-tokens "
                         f"{max_new_tokens} is over the model's context of {cfg.max_seq_len}; shorten --self-context")


def context_batch(batch, rows, prompts, pad_id):
    """The self-teacher's view of a student batch: each row's context prompt (from its problem), left-padded,
    then the student's completion columns unchanged, so completion column j holds the same token in both
    and teacher.score(..., start=prompt_len) lines up one to one with the student's completion positions."""
    ids, valid = left_pad([prompts(r.problem) for r in rows], pad_id, batch.tokens.device)
    P, cat = batch.prompt_len, (lambda a, b: torch.cat([a, b], 1))
    return Batch(tokens=cat(ids, batch.tokens[:, P:]), valid=cat(valid, batch.valid[:, P:]),
                 mask=cat(torch.zeros_like(valid), batch.mask[:, P:]), prompt_len=ids.size(1),
                 logprobs=cat(torch.zeros(ids.shape, device=ids.device), batch.logprobs[:, P:]),
                 on_policy=batch.on_policy)


def self_view(mb, rows, groups, teacher, run):
    """(the batch the teacher scores, its shared prompts, the FLOPs its scoring adds over scoring mb): the
    student's own micro-batch and groups for a separate teacher; the context batch for --teacher self
    (run.context), whose shared prompts every rank agrees on (a collective, as rollout.shared_prompts)."""
    if run.context is None:
        return mb, groups, 0
    tb = context_batch(mb, rows, run.context, run.pad)
    t_groups = shared_prompts(tb)
    cfg, k = teacher.cfg, lambda g, b: len(g[0]) if g is not None else len(b.tokens)  # noqa: E731
    flops = (flops_score(cfg, len(tb.tokens), tb.prompt_len, tb.tokens.size(1), k(t_groups, tb), head=False)
             - flops_score(cfg, len(mb.tokens), mb.prompt_len, mb.tokens.size(1), k(groups, mb), head=False))
    return tb, t_groups, flops


def probe(ckpt, template=None, split="val", n=None):
    """How good a teacher the model is with its context, before any run: greedy accuracy after the plain and
    the context prompt, and the mean log-probability and argmax rate of the ground-truth answer's tokens
    after each (teacher-forced), on the split's first n problems (None: all). {name: (accuracy, mean log p, top-1)}."""
    import torch.nn.functional as F
    from chat import load_chat
    from data.countdown import countdown_format
    from model import forward_from
    from rollout import generate, pack
    path = resolve_checkpoint(ckpt)
    model, fmt = load_pretrained(path).eval(), countdown_format(load_chat(path))
    problems, ctx, out = TASK_SPLITS["countdown"](split)[:n], ContextPrompts(fmt, template), {}
    for name, prompts in (("plain", fmt.prompts(problems)), ("context", [ctx(p) for p in problems])):
        b = pack(prompts, [fmt.answer_ids(p[2]) for p in problems], fmt.pad_id)
        ids, valid = b.tokens[:, :b.prompt_len], b.valid[:, :b.prompt_len]
        with torch.no_grad():
            logits = forward_from(model, b.tokens, b.pos, b.valid, b.prompt_len)
            g = generate(model, ids, valid, 24, fmt.eos_ids, fmt.pad_id, temperature=0.0)
        tgt, m = b.tokens[:, b.prompt_len:], b.mask[:, b.prompt_len:]
        lp = F.log_softmax(logits.float(), -1).gather(-1, tgt[..., None]).squeeze(-1)
        correct = sum(bool(c) and c[-1] in fmt.eos_ids and fmt.verify(n, t, fmt.decode(c[:-1]))
                      for (n, t, _), c in zip(problems, g.completions()))
        out[name] = (correct / len(problems), (lp * m).sum().item() / m.sum().item(),
                     ((logits.argmax(-1) == tgt) & m).sum().item() / m.sum().item())
    return out


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="probe a model as its own teacher: does its context help it?")
    p.add_argument("ckpt")
    p.add_argument("--self-context", default=None)
    p.add_argument("--n", type=int, default=None, help="the val split's first N problems (default: all)")
    a = p.parse_args()
    for name, (acc, lp, top1) in probe(a.ckpt, a.self_context, n=a.n).items():
        print(f"{name:8s} greedy val accuracy {acc:.3f}, answer tokens: mean log p {lp:.3f}, top-1 {top1:.3f}")

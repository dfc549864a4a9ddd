"""Where the student forks from the teacher (eval_countdown.py --show): the student's rollouts on Countdown
prompts, each token shaded by its per-token KL(p_S || p_T), and at every token what each model would have
written there: the teacher's and the student's top next tokens with their probabilities.

    python eval_countdown.py --show checkpoints/student --teacher checkpoints/teacher --n 8 --html forks.html
    python eval_countdown.py --show hf/smollm2-135m-instruct --keep-layers 0::3 \\
        --teacher hf/smollm2-135m-instruct --n 4 --max-new-tokens 64 --html forks.html

The terminal marks (or, on a terminal, colours) the tokens and names the teacher's choice at each row's
largest KL. The HTML page is one file (inline CSS, no script, nothing fetched) with a colour legend; hovering
a token, or reaching it with Tab, shows both models' top tokens there, the KL, and the probability each
model gave the token the student wrote. Whitespace is shown: ␣ a space, ⏎ a newline, ⇥ a tab.
"""
import html
import os
from dataclasses import dataclass

import torch

from chat import load_chat
from checkpoint import load_pretrained, resolve_checkpoint
from data.countdown import countdown_format, load_split, prompt_text
from losses import per_token_divergence
from model import keep_layers, layer_slice
from rollout import generate, left_pad

TOP_K = 5
# per-token KL upper bounds (nats) and their shades: ANSI 256 colours for the terminal, CSS for the page
SHADES = [(0.05, 0, "transparent"), (0.3, 229, "#fff3b0"), (1.0, 214, "#ffc966"), (3.0, 202, "#ff9950"),
          (float("inf"), 196, "#ff5c5c")]
WHITESPACE = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍"}


@dataclass
class Token:
    id: int
    text: str            # the token decoded alone, special tokens by their name
    rkl: float           # KL(p_S || p_T) of the next-token distributions this token was sampled from
    p_student: float     # the probability each model gave this token there
    p_teacher: float
    student_top: list    # [(id, text, p)] the most likely next tokens there, most likely first
    teacher_top: list


@dataclass
class Row:
    problem: tuple       # (numbers, target, solution)
    prompt: str          # the prompt as the model read it (for a chat model: the rendered template)
    ok: bool             # the answer ended and reaches the target
    tokens: list         # [Token] of the completion, up to and including its eos


def shade(kl):
    """Index into SHADES of a per-token KL."""
    return next(i for i, (upper, _, _) in enumerate(SHADES) if kl < upper)


@torch.no_grad()
def fork_rows(student, teacher, fmt, problems, temperature, generator, max_new_tokens, k=TOP_K):
    """Sample the student's answers to `problems` (temperature 0: greedy) and score every completion token
    under both models -> [Row]."""
    ids, valid = left_pad(fmt.prompts(problems), fmt.pad_id)
    batch = generate(student, ids, valid, max_new_tokens, fmt.eos_ids, fmt.pad_id, temperature=temperature,
                     generator=generator)
    P = batch.prompt_len
    # only the columns that predict completion tokens (P-1 .. T-2): a chat vocabulary makes the rest large
    s_logits = student(batch.tokens, batch.pos, batch.valid, out_from=P - 1)[:, :-1].float()
    t_logits = teacher(batch.tokens, batch.pos, batch.valid, out_from=P - 1)[:, :-1].float()
    names = {}

    def text(i):
        if i not in names:
            names[i] = fmt.tok.decode([i], skip_special_tokens=False)
        return names[i]

    def top(logp):
        p, i = logp.exp().topk(min(k, logp.numel()))
        return [(j, text(j), q) for j, q in zip(i.tolist(), p.tolist())]

    rows = []
    for r, (problem, comp) in enumerate(zip(problems, batch.completions())):
        n = len(comp)  # the completion starts at column P, and its masked tokens are its first n
        ls, lt = s_logits[r, :n].log_softmax(-1), t_logits[r, :n].log_softmax(-1)
        kl = per_token_divergence(s_logits[r, :n], t_logits[r, :n], "rkl").tolist()
        tokens = [Token(t, text(t), kl[c], ls[c, t].exp().item(), lt[c, t].exp().item(), top(ls[c]), top(lt[c]))
                  for c, t in enumerate(comp)]
        ended = n > 0 and comp[-1] in fmt.eos_ids
        ok = ended and fmt.verify(problem[0], problem[1], fmt.decode(comp[:-1]))
        prompt = fmt.tok.decode(ids[r][valid[r]].tolist(), skip_special_tokens=False)
        rows.append(Row(problem, prompt, ok, tokens))
    return rows


# -------------------------------------------------------------------------------------------- the terminal

def wanted(top):
    """What a model would have written: its top 3 tokens of at least 1% (its first, whatever its share)."""
    return " ".join(f"{s!r} {p:.2f}" for _, s, p in [x for x in top[:3] if x[2] >= 0.01] or top[:1])


def terminal_lines(rows, eos_ids, tty):
    """One line per row: ok/BAD, the problem, the tokens (coloured on a tty, else [marked] where KL >= 1
    nat), the largest KL and what each model wanted there."""
    lines = []
    for row in rows:
        line = f"{'ok ' if row.ok else 'BAD'} {prompt_text(*row.problem[:2])}"
        for t in row.tokens:
            piece = "<eos>" if t.id in eos_ids else t.text.replace("\n", "\\n")
            colour = SHADES[shade(t.rkl)][1]
            if tty:
                line += f"\x1b[48;5;{colour}m{piece}\x1b[0m" if colour else piece
            else:  # a log or a pipe: mark the tokens instead of colouring them
                line += f"[{piece}]" if t.rkl >= 1.0 else piece
        if row.tokens:
            worst = max(row.tokens, key=lambda t: t.rkl)
            line += (f"   max rkl {worst.rkl:.2f} at {worst.text!r}: teacher {wanted(worst.teacher_top)}; "
                     f"student {wanted(worst.student_top)}")
        lines.append(line)
    return lines


# ----------------------------------------------------------------------------------------------- the page

CSS = """body{font:16px/2.1 ui-monospace,Menlo,Consolas,monospace;margin:1.2em;color:#111}
h1{font-size:18px;margin:0}p{margin:.3em 0;line-height:1.5}
.row{margin:.2em 0;white-space:pre-wrap;word-break:break-all}
.p{color:#555}.p:hover{text-decoration:underline dotted}
.t{position:relative;border-radius:2px;padding:1px 0}
.t:hover,.t:focus{outline:2px solid #333;outline-offset:0}
.tip{display:none;position:absolute;left:0;top:1.7em;z-index:1;background:#fff;border:1px solid #888;
 border-radius:4px;padding:.4em .6em;white-space:pre;font-size:13px;line-height:1.45;box-shadow:0 2px 6px #0003}
.t:hover .tip,.t:focus .tip{display:block}
.g{display:grid;grid-template-columns:repeat(2,auto) 1.5em repeat(2,auto);justify-content:start;margin-top:.3em}
.g u{text-decoration:none;color:#555}.g code{background:#f2f2f2;padding:0 .2em}.g code.me{outline:1px solid #c00}
.g i{font-style:normal;text-align:right;padding-left:.6em}
.ws{color:#0008}
.legend span{padding:0 .5em;border:1px solid #ccc}
""" + "".join(f".s{i}{{background:{css}}}" for i, (_, _, css) in enumerate(SHADES))


def visible(text):
    """A token's text as HTML: escaped, whitespace drawn (␣ ⏎ ⇥), other blank or unprintable characters
    (a no-break space, a zero-width space) as their escape (\\xa0, \\u200b), an empty string as ∅."""
    def char(c):
        if c in WHITESPACE:
            return f'<span class="ws">{WHITESPACE[c]}</span>'
        if c.isspace() or not c.isprintable():
            return f'<span class="ws">{c.encode("unicode_escape").decode()}</span>'
        return html.escape(c)
    return "".join(map(char, text)) if text else '<span class="ws">∅</span>'


def prob(p):
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def token_html(t):
    cells = ['<u>teacher</u><u></u><b></b><u>student</u><u></u>']
    mark = lambda i: ' class="me"' if i == t.id else ""  # noqa: E731  the token the student wrote
    for (ti, tt, tp), (si, st, sp) in zip(t.teacher_top, t.student_top):
        cells.append(f"<code{mark(ti)}>{visible(tt)}</code><i>{prob(tp)}</i><b></b>"
                     f"<code{mark(si)}>{visible(st)}</code><i>{prob(sp)}</i>")
    tip = (f'<span class="tip">rkl <span class="kl">{t.rkl:.3f}</span> · this token: student {prob(t.p_student)}, '
           f'teacher {prob(t.p_teacher)}<span class="g">{"".join(cells)}</span></span>')
    return f'<span class="t s{shade(t.rkl)}" tabindex="0">{visible(t.text)}{tip}</span>'


def legend():
    bounds = [0.0] + [upper for upper, _, _ in SHADES]
    swatches = [f'<span class="s{i}">' + (f"{lo:g}–{hi:g}" if hi != float("inf") else f"≥ {lo:g}") + "</span>"
                for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]
    return (f'<p class="legend">per-token KL(student ‖ teacher), nats: {" ".join(swatches)}</p>'
            f'<p>Hover a token (or Tab to it): the teacher\'s and the student\'s top {TOP_K} next tokens there, the '
            'one the student wrote outlined; ␣ space, ⏎ newline. Hover a problem for the whole prompt.</p>')


def html_page(rows, title):
    """The whole page: a title line (escaped here), the legend, one div per row."""
    body = []
    for row in rows:
        label = f"{'ok' if row.ok else 'BAD'} {prompt_text(*row.problem[:2])}"
        body.append(f'<div class="row"><span class="p" title="{html.escape(row.prompt)}">{html.escape(label)}</span> '
                    + "".join(token_html(t) for t in row.tokens) + "</div>")
    return ('<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>where the student forks</title>'
            f"<style>{CSS}</style></head><body>\n<h1>Where the student forks from the teacher</h1>"
            f"<p>{html.escape(title)}</p>{legend()}\n" + "\n".join(body) + "\n</body></html>\n")


# ------------------------------------------------------------------------------------------------ the view

def show_forks(ckpt, teacher_dir, tokenizer_path, n, seed, temperature, html_path=None, max_new_tokens=24,
               split="test", keep=None, tty=False):
    """Load both checkpoints (keep: a START:STOP:STEP slice of the student's layers, as train.py --keep-layers),
    print the rollouts and write the page. ValueError / CheckpointError (one line) on bad input."""
    if html_path and not os.path.isdir(os.path.dirname(os.path.abspath(html_path))):
        raise ValueError(f"--html {html_path}: no such directory")
    from teacher import check_same_tokenizer
    s_path, t_path = resolve_checkpoint(ckpt), resolve_checkpoint(teacher_dir)
    student, teacher = load_pretrained(s_path), load_pretrained(t_path)
    fmt, t_fmt = (countdown_format(load_chat(p, tokenizer_path)) for p in (s_path, t_path))
    check_same_tokenizer(fmt.tok, t_fmt.tok)
    if keep:
        student = keep_layers(student, layer_slice(keep, student.cfg.n_layer))
    rows = fork_rows(student, teacher, fmt, load_split(split)[:n], temperature,
                     torch.Generator().manual_seed(seed), max_new_tokens)
    print("per-token KL(student || teacher): " + ("none < 0.05 <= yellow < 0.3 <= orange < 1 <= dark orange < 3 "
                                                  "<= red" if tty else "[token] where >= 1 nat"))
    print("\n".join(terminal_lines(rows, fmt.eos_ids, tty)))
    if html_path:
        title = (f"student {ckpt}" + (f" (layers {keep})" if keep else "") + f", teacher {teacher_dir}; {split} "
                 f"split, first {n} problems, " + (f"sampled at temperature {temperature:g}, seed {seed}"
                                                   if temperature > 0 else "greedy"))
        try:
            with open(html_path, "w", encoding="utf-8") as f:
                f.write(html_page(rows, title))
        except OSError as e:
            raise ValueError(f"--html {html_path}: cannot write it ({e.strerror})")
        print(f"wrote {html_path}")
    return rows

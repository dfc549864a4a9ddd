"""Countdown accuracy of a checkpoint on a held-out split.

    python eval_countdown.py checkpoints/teacher                  # greedy accuracy on the test split
    python eval_countdown.py runs/sft --split val --n 200         # a run directory: its latest checkpoint
    python eval_countdown.py CKPT --sample-temperature 1.0 --samples 4   # plus sampled accuracy
    python eval_countdown.py --table runs/sweep/rkl-l*/           # Markdown table of distillation runs
    python eval_countdown.py --study runs/study/*/ --reach 0.3 rl  # any stage; compute to reach 30% val, rl's final
    python eval_countdown.py --plot runs/study/*/ --out docs/study.png   # val accuracy vs steps, FLOPs, minutes
    python eval_countdown.py --show CKPT --teacher DIR [--html f.html]  # where the student forks (forks.py)
    python eval_countdown.py --show hf/smollm2-135m-instruct --keep-layers 0::3 --teacher hf/smollm2-135m-instruct \
        --n 4 --max-new-tokens 64 --html forks.html     # a chat model: its every-third-layer student

train.py's evals live here too: the verifier's reward on a batch (rewards), val and test accuracy
(evaluate), how far the student is from the teacher on held-out prompts (evaluate_teacher_gap: reverse
KL on its samples, forward KL on the teacher's, greedy agreement, repetition), and what a run logs at its
start and end.

The checkpoint's Countdown format comes with it (chat.load_chat, data.countdown.countdown_format): the
step-list format for this codebase's char models, the chat template and <answer>expression</answer> for a
chat model (give those --max-new-tokens 64-256). Prints accuracy, the format-valid rate (the answer has its
format's shape, right or wrong), the mean answer length in tokens, and a few examples; the last stdout line
is one JSON object.
"""
import argparse
import json
import os
import re
import sys
import time

import torch
import torch.nn.functional as F

from chat import load_chat
from checkpoint import CheckpointError, load_pretrained, resolve_checkpoint
from data.countdown import TOKENIZER_PATH, countdown_format, load_split, prompt_text
from data import TASK_SPLITS
from distributed import all_sum, decoding, optimizer_state_bytes
from forks import show_forks
from losses import group_success, head_divergence_sum
from model import forward_from, num_params
from rollout import generate, left_pad, pack, sample, shared_prompts
from teacher import teacher_scores


def load_for_eval(ckpt, default_tokenizer):
    """(checkpoint directory, model, its Countdown format) of a checkpoint or run directory."""
    path = resolve_checkpoint(ckpt)
    model = load_pretrained(path)
    return path, model, countdown_format(load_chat(path, default_tokenizer))


def countdown_eval(model, fmt, problems, batch_size=256, temperature=0.0, generator=None, max_new_tokens=24):
    """Decode every problem once in the model's format (data.countdown.countdown_format); returns a list of
    dicts (prompt, answer, correct, well_formed, n_tokens). An answer counts only if it ended (an eos id)."""
    device = next(model.parameters()).device
    rows = []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        ids, valid = left_pad(fmt.prompts(chunk), fmt.pad_id, device)
        batch = generate(model, ids, valid, max_new_tokens, fmt.eos_ids, fmt.pad_id, temperature=temperature,
                         generator=generator)
        for (nums, target, _), comp in zip(chunk, batch.completions()):
            ended = len(comp) > 0 and comp[-1] in fmt.eos_ids
            text = fmt.decode(comp[:-1] if ended else comp)
            rows.append(dict(prompt=getattr(fmt, "prompt_text", prompt_text)(nums, target), answer=text,
                             n_tokens=len(comp),
                             correct=ended and fmt.verify(nums, target, text),
                             well_formed=ended and fmt.well_formed(text)))
    return rows


def summarize(rows):
    n = max(len(rows), 1)
    return dict(accuracy=sum(r["correct"] for r in rows) / n, format_valid=sum(r["well_formed"] for r in rows) / n,
                mean_tokens=sum(r["n_tokens"] for r in rows) / n, n=len(rows))


def rewards(batch, rows, fmt):
    """The verifier's reward per row [B]: 1 for an on-policy completion that ended (an eos id) and reaches the
    target with every number once, else 0 (data/countdown.py; never eval). rows: rollout.Row. None for a
    task without a verifier (data/instructions.py)."""
    if not getattr(fmt, "verifies", True):
        return None
    out = []
    for r, comp in zip(rows, batch.completions()):
        if not r.on_policy:  # a given row's answer is no sample of the student's
            out.append(0.0)
            continue
        ended = len(comp) > 0 and comp[-1] in fmt.eos_ids
        numbers, target, _ = r.problem
        out.append(float(ended and fmt.verify(numbers, target, fmt.decode(comp[:-1] if ended else comp))))
    return torch.tensor(out, device=batch.tokens.device)


# ------------------------------------------------------------------- the logs of a training step (train.py)

def step_metrics(batch, n_tok, loss, rkl, reward, gnorm, lr, flops, times, one_to_one, run):
    """A training step's metrics, summed over ranks: what train.train_step returns."""
    args, device = run.args, run.device
    n_on = round(all_sum(batch.on_policy.sum().item(), device))
    out = dict(loss=all_sum(float(loss), device), lr=lr, grad_norm=float(gnorm),
               tokens=all_sum(batch.valid.sum().item(), device), flops=all_sum(flops, device), samples=n_on,
               times=times)
    if reward is not None:  # the verifier on the student's own samples
        out["reward"] = all_sum(reward.sum().item(), device) / n_on
        if args.samples_per_prompt > 1:
            out["group_success"] = group_success(reward, batch.on_policy, args.samples_per_prompt, run.rank, run.world)
    if args.stage == "distill":  # what the student does on its own samples
        n_on_tok = all_sum((batch.mask & batch.on_policy[:, None]).sum().item(), device)
        out |= dict(on_policy_frac=n_on / args.batch_size,
                    student_rkl=all_sum(float(rkl), device) / n_on_tok if n_on_tok else None,
                    completion_len=n_tok / args.batch_size)
        if batch.kept is not None:  # speculative KD: the share of the student's proposals the teacher kept
            out["skd_accept"] = all_sum(batch.kept.sum().item(), device) / n_on_tok if n_on_tok else None
        if run.cross:  # share of completion tokens in spans of one token on each side
            out["one_to_one_frac"] = all_sum(one_to_one, device) / n_tok
    return out


def step_record(step, m, seconds, state):
    """The metrics.jsonl record of a step from train_step's metrics m, with the run's compute so far."""
    rec = dict(step=step, loss=round(m["loss"], 5), lr=m["lr"], grad_norm=round(m["grad_norm"], 4),
               tokens_per_s=round(m["tokens"] / seconds), minutes=round(state["train_seconds"] / 60, 3),
               flops=state["flops"], samples=state["samples"])
    for k in ("reward", "group_success"):  # the verifier on the student's samples
        if m.get(k) is not None:
            rec[k] = round(m[k], 4)
    if "on_policy_frac" in m:  # distillation
        rec |= dict(on_policy_frac=m["on_policy_frac"],
                    student_rkl=None if m["student_rkl"] is None else round(m["student_rkl"], 5),
                    completion_len=round(m["completion_len"], 3), rollout_s=round(m["times"]["rollout"], 3))
    for k in ("one_to_one_frac", "skd_accept"):  # across tokenizers; speculative KD
        if m.get(k) is not None:
            rec[k] = round(m[k], 4)
    return rec


# ------------------------------------------------------------------- the evals of a training run (train.py)
# Collective: every rank calls them with the same problems and decodes its share. run: train.Run.

N_EXAMPLES = 3  # test answers printed before and after training, side by side


def eval_batch_size(n, world, largest=512):
    """Rows per decode batch when `world` ranks split n problems (rank r takes r::world): up to `largest`,
    and such that every rank runs as many batches, since each decode step is a collective."""
    most, fewest = -(-n // world), n // world
    n_batches = -(-most // largest)
    return largest if -(-fewest // largest) == n_batches else -(-most // n_batches)


def evaluate(model, fmt, problems, run, max_new_tokens, examples=None):
    """Greedy accuracy on `problems` in the model's format. examples: a list that receives this rank's first
    answers (problem, answer text), to show what the model writes. A task without a verifier has no accuracy
    (None): it decodes only when asked for examples."""
    if not getattr(fmt, "verifies", True) and examples is None:
        return dict(accuracy=None, format_valid=None, mean_tokens=None)
    with torch.no_grad(), decoding(model):
        rows = countdown_eval(model, fmt, problems[run.rank::run.world],
                              batch_size=eval_batch_size(len(problems), run.world), max_new_tokens=max_new_tokens)
    if examples is not None:
        examples += [(r["prompt"], r["answer"]) for r in rows[:N_EXAMPLES]]
    s = summarize(rows)
    n = all_sum(s["n"], run.device)
    out = {k: all_sum(s[k] * s["n"], run.device) / n for k in ("accuracy", "format_valid", "mean_tokens")}
    return out if getattr(fmt, "verifies", True) else out | dict(accuracy=None)


def evaluate_teacher_gap(model, teacher, problems, run, max_new_tokens):
    """How far the student is from the teacher on held-out prompts, in measures a degenerate student cannot
    game (same-tokenizer teachers; rkl None otherwise). Sampling noise is fixed (steps -1, -2, ...: no training
    step uses them), so evals of one run compare.
      rkl                the student's per-token KL(p_S || p_T) on its own samples: what on-policy
                         distillation lowers, and what a student collapsed onto one safe mode also lowers
      fkl                its per-token KL(p_T || p_S) on the teacher's samples: mode covering, so a
                         collapsed student pays for every mode of the teacher it dropped
      greedy_agreement   the share of prompts whose greedy reply (up to its end) is the teacher's
      top1_agreement     the share of the teacher's greedy reply tokens that are the student's argmax too
      distinct2          distinct token bigrams / all bigrams of the student's samples (repetition lowers it)
      teacher_distinct2  the same of the teacher's samples: what distinct2 should stay near"""
    if run.cross:
        return {"rkl": None}
    problems = problems[:len(problems) // run.world * run.world]  # every rank decodes as many rows
    prompts = [run.fmt.prompt_ids(n, t) for n, t, _ in problems]
    sums, B = dict(rkl=0.0, rkl_n=0, fkl=0.0, fkl_n=0, same=0, rows=0, top1=0, top1_n=0), run.args.batch_size
    samples = {"distinct2": [], "teacher_distinct2": []}
    with torch.no_grad():
        for i in range(0, len(prompts), B):
            mine = prompts[i:i + B][run.rank::run.world]
            for who, stream in ((model, 0), (teacher, 1)):  # each one's samples, the other scores them too
                completions, logprobs, _, _ = sample(who, mine, run, -1 - i // B, stream)
                samples["distinct2" if who is model else "teacher_distinct2"] += completions
                batch = pack(mine, completions, run.pad, run.device, logprobs=logprobs, on_policy=[True] * len(mine))
                t_h, _ = teacher_scores(teacher, batch, None, shared_prompts(batch), run)
                m, name = batch.mask[:, batch.prompt_len:], "rkl" if who is model else "fkl"
                sums[name] += forward_from(model, batch.tokens, batch.pos, batch.valid, batch.prompt_len,
                                           lambda h, w: head_divergence_sum(h, w, t_h, run.t_head, m, name,
                                                                            chunk_size=run.args.chunk_size)).item()
                sums[name + "_n"] += m.sum().item()
            ids, valid = left_pad(mine, run.pad, run.device)
            greedy = {}
            for who in (model, teacher):
                with decoding(who):
                    greedy[who] = generate(who, ids, valid, max_new_tokens, run.eos, run.pad, temperature=0.0)
            sums["same"] += sum(a == b for a, b in zip(*(greedy[w].completions() for w in (model, teacher))))
            sums["rows"] += len(mine)
            tb = greedy[teacher]
            m = tb.mask[:, tb.prompt_len:]
            sums["top1"] += forward_from(model, tb.tokens, tb.pos, tb.valid, tb.prompt_len,
                                         lambda h, w: argmax_hits(h, w, tb.tokens[:, tb.prompt_len:], m)).item()
            sums["top1_n"] += m.sum().item()
    total = {k: all_sum(v, run.device) for k, v in sums.items()}
    out = dict(rkl=total["rkl"] / max(1.0, total["rkl_n"]), fkl=total["fkl"] / max(1.0, total["fkl_n"]),
               greedy_agreement=total["same"] / max(1.0, total["rows"]),
               top1_agreement=total["top1"] / max(1.0, total["top1_n"]))
    for k, completions in samples.items():
        grams = [bigrams(c) for c in completions]
        distinct, n = sum(len(set(g)) for g in grams), sum(len(g) for g in grams)
        out[k] = all_sum(distinct, run.device) / max(1.0, all_sum(n, run.device))
    return out


def bigrams(ids):
    return list(zip(ids, ids[1:]))


def argmax_hits(h, w, tokens, mask, rows=64):
    """How many masked positions have `tokens` as the argmax of the logits h W^T, a few rows at a time."""
    hits = h.new_zeros((), dtype=torch.long)
    for i in range(0, len(h), rows):
        top = F.linear(h[i:i + rows], w.to(h.dtype)).argmax(-1)
        hits += ((top == tokens[i:i + rows]) & mask[i:i + rows]).sum()
    return hits


def start_of_run(model, teacher, run, val, test, eval_tokens, examples):
    """Where the student starts and where the teacher is: test accuracies, the student's held-out reverse KL
    (distill), the mixed-in task's accuracy (--sft-mix) and its val accuracy (the curves' origin)."""
    out = {"trainable_params": num_params(model, trainable=True)}
    if teacher is not None:
        out["teacher_test_accuracy"] = evaluate(teacher, run.t_fmt, test, run, eval_tokens)["accuracy"]
    out["student_test_accuracy_before"] = evaluate(model, run.fmt, test, run, eval_tokens, examples)["accuracy"]
    if run.args.stage == "distill":
        gap = evaluate_teacher_gap(model, teacher, val, run, eval_tokens)
        out["student_val_rkl_before"] = gap.pop("rkl")
        out |= {f"student_val_{k}_before": v for k, v in gap.items()}
    if run.args.sft_mix:
        out["mix_test_accuracy_before"] = evaluate(model, run.mix_fmt, mix_test(run.args), run, eval_tokens)["accuracy"]
    if run.rank == 0:
        acc = (rkl_text("teacher {:.3f}, ", out["teacher_test_accuracy"]) if teacher is not None else "") + \
            rkl_text("student before {:.3f}", out["student_test_accuracy_before"])  # empty: a task without a verifier
        print((f"test accuracy: {acc} " if acc else "") +
              rkl_text("(val per-token KL(student || teacher) {:.3f})", out.get("student_val_rkl_before")))
    return out


def validate(model, teacher, val, eval_tokens, run):
    """Val accuracy (and, distilling, how far the student is from the teacher: evaluate_teacher_gap)."""
    ev = evaluate(model, run.fmt, val, run, eval_tokens)
    if run.args.stage == "distill":
        ev |= evaluate_teacher_gap(model, teacher, val, run, eval_tokens)
    return ev


def collapse_warning(ev, step):
    """One line when the student's samples repeat themselves far more than the teacher's (its distinct-2
    below half the teacher's), or None: reverse KL on its own samples does not see such a collapse."""
    if ev.get("distinct2") is not None and ev["distinct2"] < 0.5 * ev["teacher_distinct2"]:
        return (f"warning: step {step}: the student's samples repeat themselves (distinct-2 {ev['distinct2']:.2f}, "
                f"the teacher's {ev['teacher_distinct2']:.2f}); read its text: a collapsed student can have a low "
                "reverse KL")
    return None


def end_of_run(model, optimizer, run, test, eval_tokens, before):
    """Test accuracy after training (and the mixed-in task's), the optimizer's memory; prints the examples
    of the start next to the same problems now."""
    after = []
    out = dict(optimizer_state_bytes=round(all_sum(optimizer_state_bytes(optimizer), run.device)),
               student_test_accuracy_after=evaluate(model, run.fmt, test, run, eval_tokens, after)["accuracy"])
    if run.args.sft_mix:  # the mixed-in task kept? (its test split, as many problems as --eval-n)
        out["mix_test_accuracy_after"] = evaluate(model, run.mix_fmt, mix_test(run.args), run, eval_tokens)["accuracy"]
    if run.rank == 0:
        for (problem, a), (_, b) in zip(before, after):  # empty after a resume: the start was not kept
            print(f"{problem!r}\n  before: {a!r}\n  after:  {b!r}")
        if out["student_test_accuracy_after"] is not None:
            print(f"test accuracy: student after {out['student_test_accuracy_after']:.3f}")
    return out


def mix_test(args):
    """--sft-mix: the mixed-in task's test problems (as many as --eval-n)."""
    test = TASK_SPLITS[args.sft_mix]("test")
    return test[:args.eval_n] if args.eval_n else test


def rkl_text(template, value):
    return "" if value is None else template.format(value)


# ------------------------------------------------------------------------------- tables and plots of runs

def read_run(d):
    """(args.json, the records of metrics.jsonl) of a run directory; ValueError (one line) otherwise."""
    try:
        with open(os.path.join(d, "args.json")) as f:
            a = json.load(f)
        with open(os.path.join(d, "metrics.jsonl")) as f:
            return a, [json.loads(line) for line in f]
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{d}: not a run directory ({e})")


def run_table(run_dirs):
    """Markdown table of distillation runs, seeds of the same setting pooled (mean +- std)."""
    groups = {}
    for d in run_dirs:
        a, recs = read_run(d)
        final = [r for r in recs if "student_test_accuracy_after" in r]
        start = [r for r in recs if "student_test_accuracy_before" in r]
        if not final or not start:
            raise ValueError(f"{d}: no final test accuracy in metrics.jsonl (is it a finished distill run?)")
        student = os.path.basename(os.path.normpath(a["student"])) if a.get("student") else "-"
        key = (a["loss"], a["lmbda"], a["beta"] if a["loss"] == "jsd" else None, a["steps"], a.get("seq_kd", False),
               student)
        groups.setdefault(key, []).append(dict(run=os.path.basename(os.path.normpath(d)), seed=a["seed"],
                                               acc=final[-1]["student_test_accuracy_after"],
                                               start=start[0]["student_test_accuracy_before"],
                                               teacher=start[0]["teacher_test_accuracy"],
                                               minutes=max((r.get("minutes", 0) for r in recs), default=0)))
    lines = ["| run | student | lambda | loss | beta | seeds | steps | start acc | student acc | % of teacher "
             "| gap recovered | min/run |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (loss, lmbda, beta, steps, seq_kd, student), rs in sorted(groups.items(), key=lambda kv: (kv[0][5], kv[0][0],
                                                                                                   kv[0][1])):
        accs = [r["acc"] for r in rs]
        mean = sum(accs) / len(accs)
        std = (sum((x - mean) ** 2 for x in accs) / (len(accs) - 1)) ** 0.5 if len(accs) > 1 else 0.0
        teacher, start = sum(r["teacher"] for r in rs) / len(rs), sum(r["start"] for r in rs) / len(rs)
        gap = f"{(mean - start) / (teacher - start):+.2f}" if teacher != start else "n/a"
        name = rs[0]["run"].rsplit("-s", 1)[0] + (" (seq-KD)" if seq_kd else "")
        lines.append(f"| {name} | {student} | {lmbda:g} | {loss} | {beta if beta is not None else '-'} | "
                     f"{','.join(str(r['seed']) for r in sorted(rs, key=lambda r: r['seed']))} | {steps} | "
                     f"{100 * start:.1f} | {100 * mean:.1f} +- {100 * std:.1f} | {100 * mean / teacher:.0f}% | {gap} | "
                     f"{sum(r['minutes'] for r in rs) / len(rs):.1f} |")
    teachers = sorted({round(100 * r["teacher"], 1) for rs in groups.values() for r in rs})
    lines.append(f"\nteacher test accuracy {', '.join(f'{t}%' for t in teachers)} (greedy, test split; "
                 "gap recovered = (student - start) / (teacher - start))")
    return "\n".join(lines)


def load_run(d):
    """A run directory as a dict: arm (the directory name without its -s<seed>), seed, args, test accuracy
    before / after and the teacher's (None where not logged), and its val curve: (step, val accuracy,
    cumulative FLOPs, training minutes, student samples) at every eval."""
    a, recs = read_run(d)
    first = {k: v for r in recs if r.get("step") == 0 for k, v in r.items()}
    after = [r["student_test_accuracy_after"] for r in recs if "student_test_accuracy_after" in r]
    at = {r["step"]: r for r in recs if "loss" in r}  # the training record of each step
    start = dict(flops=0.0, minutes=0.0, samples=0)
    curve = [(r["step"], r["val_accuracy"]) + tuple(at.get(r["step"], start).get(k, 0) for k in start)
             for r in recs if "val_accuracy" in r]
    name = os.path.basename(os.path.normpath(d))
    return dict(arm=re.sub(r"-s\d+$", "", name), seed=a.get("seed"), args=a, curve=curve,
                before=first.get("student_test_accuracy_before"), teacher=first.get("teacher_test_accuracy"),
                after=after[-1] if after else None)


def load_arms(run_dirs):
    """Runs grouped by arm, in the order given; ValueError unless every run logged a val accuracy."""
    arms = {}
    for d in run_dirs:
        r = load_run(d)
        if not any(acc is not None for _, acc, *_ in r["curve"]):
            raise ValueError(f"{d}: no val accuracy in metrics.jsonl (give runs with --eval-every > 0 or finished)")
        arms.setdefault(r["arm"], []).append(r)
    return arms


def mean_std(xs):
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def mean_curve(runs):
    """The seeds' val curves averaged at the eval steps they share: [(step, mean acc, std acc, mean FLOPs,
    mean minutes, mean samples)]."""
    steps = set.intersection(*({c[0] for c in r["curve"] if c[1] is not None} for r in runs))
    out = []
    for step in sorted(steps):
        pts = [next(c for c in r["curve"] if c[0] == step) for r in runs]
        m, sd = mean_std([p[1] for p in pts])
        out.append((step, m, sd) + tuple(sum(p[i] for p in pts) / len(pts) for i in (2, 3, 4)))
    return out


def study_table(run_dirs, reach=()):
    """Markdown table of a study's arms (any stage), seeds pooled: final test accuracy (mean +- sample std),
    the share of the teacher gap it recovered, its compute, and for each `reach` the TFLOPs and minutes at
    which the seeds' mean val accuracy first reached it: a fraction, or an arm's name for that arm's final
    mean val accuracy."""
    arms = load_arms(run_dirs)
    levels = []
    for r in reach or ():
        try:
            levels.append((float(r), f"{100 * float(r):.1f}%"))
        except ValueError:
            if r not in arms:
                raise ValueError(f"--reach {r}: neither a fraction nor one of the arms {', '.join(arms)}")
            acc = mean_curve(arms[r])[-1][1]
            levels.append((acc, f"{100 * acc:.1f}% ({r})"))
    teachers = [r["teacher"] for rs in arms.values() for r in rs if r["teacher"] is not None]
    teacher = sum(teachers) / len(teachers) if teachers else None
    head = "| arm | seeds | steps | test acc | % of teacher | gap recovered | val gain, last quarter | TFLOP | min | samples |"
    head += "".join(f" TFLOP / min to {name} |" for _, name in levels)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for arm, rs in arms.items():
        if any(r["after"] is None for r in rs):
            raise ValueError(f"{arm}: a run has no final test accuracy (is it finished?)")
        m, sd = mean_std([r["after"] for r in rs])
        start = sum(r["before"] for r in rs) / len(rs) if all(r["before"] is not None for r in rs) else None
        gap = f"{(m - start) / (teacher - start):+.2f}" if teacher is not None and start is not None else "-"
        share = f"{100 * m / teacher:.0f}%" if teacher else "-"
        curve = mean_curve(rs)
        last, _, _, fl, mins, n = curve[-1]
        # a plateau shows as no gain since the last eval at or before 3/4 of the run
        quarter = next(c for c in reversed(curve) if c[0] <= 0.75 * last)
        row = (f"| {arm} | {','.join(str(r['seed']) for r in rs)} | {rs[0]['args']['steps']} | "
               f"{100 * m:.1f} +- {100 * sd:.1f} | {share} | {gap} | {100 * (curve[-1][1] - quarter[1]):+.1f} | "
               f"{fl / 1e12:.2f} | {mins:.1f} | {n:.0f} |")
        for level, _ in levels:
            hit = next((c for c in curve if c[1] >= level), None)
            row += f" {hit[3] / 1e12:.2f} / {hit[4]:.1f} |" if hit else " not reached |"
        lines.append(row)
    if teacher is not None:
        lines.append(f"\nteacher test accuracy {100 * teacher:.1f}% (greedy, 630 test problems); gap recovered = "
                     "(after - before) / (teacher - before); val gain, last quarter: the seeds' mean val accuracy "
                     "at the end minus at 3/4 of the run, in points; TFLOP, min, samples: training compute (matmul FLOPs "
                     "counted from shapes, flops.py; evals excluded), training minutes, student samples")
    return "\n".join(lines)


def plot_runs(run_dirs, out):
    """Val accuracy against steps, FLOPs and training minutes (log axes, from the first eval on): one line per
    arm (the seeds' mean) with a band of +- one std over seeds; the teacher's test accuracy dashed where a
    run logged it."""
    arms = load_arms(run_dirs)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)")
    fig, axes = plt.subplots(1, 3, figsize=(17, 5), sharey=True)
    xs = [("step", 0, "optimizer steps"), ("flops", 3, "training FLOPs (student + teacher, matmuls)"),
          ("minutes", 4, "training minutes (1 thread)")]
    for arm, rs in arms.items():
        curve = mean_curve(rs)
        for ax, (_, i, _) in zip(axes, xs):
            pts = curve if i == 0 else curve[1:]  # FLOPs and minutes on log axes: from the first eval on
            x = [c[i] for c in pts]
            m, sd = [c[1] for c in pts], [c[2] for c in pts]
            line, = ax.plot(x, m, label=f"{arm} ({len(rs)} seeds)" if ax is axes[0] else None, lw=1.6)
            ax.fill_between(x, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                            color=line.get_color(), alpha=0.15, lw=0)
    teachers = [r["teacher"] for rs in arms.values() for r in rs if r["teacher"] is not None]
    for ax, (_, _, label) in zip(axes, xs):
        if teachers:
            ax.axhline(sum(teachers) / len(teachers), color="k", ls="--", lw=1)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which="both")
    for ax in axes[1:]:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labels on the decades only
    axes[0].set_ylabel("val accuracy (307 held-out problems, greedy)")
    fig.legend(loc="lower center", ncol=min(5, len(arms)), frameon=False)
    fig.tight_layout(rect=(0, 0.1 if len(arms) > 5 else 0.06, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


@torch.no_grad()  # and grad mode is back on return: main also runs in-process (tests)
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt", nargs="?", help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--table", nargs="+", metavar="RUN_DIR", help="print a Markdown table of these distill runs")
    p.add_argument("--study", nargs="+", metavar="RUN_DIR", help="print a Markdown table of these runs of any stage, "
                   "with their compute (seeds of an arm: the same directory name but -s<seed>)")
    p.add_argument("--reach", nargs="+", help="with --study: also the compute at which an arm's mean val accuracy "
                   "first reached each of these: a fraction (e.g. 0.3), or an arm's name for its final mean val "
                   "accuracy")
    p.add_argument("--plot", nargs="+", metavar="RUN_DIR", help="plot val accuracy against steps, FLOPs and minutes "
                   "to --out (needs matplotlib)")
    p.add_argument("--out", help="with --plot: the image file (e.g. docs/study.png)")
    p.add_argument("--show", metavar="CKPT", help="show student rollouts shaded by per-token KL to --teacher")
    p.add_argument("--teacher", help="teacher checkpoint for --show")
    p.add_argument("--html", help="with --show: also write an HTML page (hover a token: both models' top tokens)")
    p.add_argument("--keep-layers", metavar="START:STOP:STEP", help="with --show: keep these layers of the shown "
                   "checkpoint (as train.py --keep-layers, e.g. 0::3: a student pruned from its teacher)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--n", type=int, default=0, help="first N problems of the split (0 = all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=24, help="answer budget in tokens (chat models need more: "
                   "64-256)")
    p.add_argument("--sample-temperature", type=float, default=None, help="also report sampled accuracy (with "
                   "--show: the rollouts' temperature, default 1; 0 is greedy)")
    p.add_argument("--samples", type=int, default=1, help="samples per problem for sampled accuracy "
                   "and pass@k (the share of problems one of whose samples is right: RL's groups with a success)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--examples", type=int, default=5, help="examples to print")
    p.add_argument("--tokenizer", default=TOKENIZER_PATH, help="used when the checkpoint has no tokenizer.json")
    args = p.parse_args(argv)
    if sum(x is not None for x in (args.ckpt, args.table, args.study, args.plot, args.show)) != 1:
        p.error("give one of: CKPT, --table RUN_DIR..., --study RUN_DIR..., --plot RUN_DIR... --out FILE, --show CKPT")
    if args.plot and not args.out:
        p.error("--plot needs --out FILE.png")
    if not args.show and (args.keep_layers or args.html or args.teacher):
        p.error("--teacher, --html and --keep-layers go with --show")
    try:
        if args.table:
            print(run_table(args.table))
            return 0
        if args.study:
            print(study_table(args.study, args.reach))
            return 0
        if args.plot:
            plot_runs(args.plot, args.out)
            print(f"wrote {args.out}")
            return 0
        if args.show:
            temperature = 1.0 if args.sample_temperature is None else args.sample_temperature
            if not args.teacher:
                p.error("--show needs --teacher DIR")
            if args.n < 0 or args.max_new_tokens < 1 or temperature < 0:
                p.error("--show needs --n >= 0, --max-new-tokens >= 1 and --sample-temperature >= 0")
            show_forks(args.show, args.teacher, args.tokenizer, args.n or 8, args.seed, temperature, args.html,
                       args.max_new_tokens, args.split, args.keep_layers, sys.stdout.isatty())
            return 0
    except (CheckpointError, ValueError) as e:
        print(f"eval_countdown.py: error: {e}", file=sys.stderr)
        return 2
    if args.n < 0 or args.batch_size < 1 or args.samples < 1 or args.max_new_tokens < 1:
        p.error("--n must be >= 0, --batch-size, --samples and --max-new-tokens >= 1")
    if args.sample_temperature is not None and args.sample_temperature <= 0:
        p.error("--sample-temperature must be > 0")
    try:
        path, model, fmt = load_for_eval(args.ckpt, args.tokenizer)
    except (CheckpointError, ValueError) as e:
        print(f"eval_countdown.py: error: {e}", file=sys.stderr)
        return 2
    problems = load_split(args.split)
    problems = problems[:args.n] if args.n else problems
    t0 = time.time()
    rows = countdown_eval(model, fmt, problems, args.batch_size, 0.0, max_new_tokens=args.max_new_tokens)
    result = dict(ckpt=path, split=args.split, **{f"greedy_{k}" if k != "n" else k: v for k, v in summarize(rows).items()})
    for r in rows[:args.examples]:  # one line each: a chat model's answer may span several
        print(f"{'ok ' if r['correct'] else 'BAD'} {r['prompt']}{r['answer']}".replace("\n", "\\n"))
    if args.sample_temperature is not None:
        g = torch.Generator().manual_seed(args.seed)
        srows = [r for _ in range(args.samples) for r in
                 countdown_eval(model, fmt, problems, args.batch_size, args.sample_temperature, g, args.max_new_tokens)]
        n = len(problems)  # srows: every problem once per sample; pass@k: one of a problem's samples is right
        result.update(sample_temperature=args.sample_temperature, samples=args.samples,
                      sampled_accuracy=summarize(srows)["accuracy"],
                      sampled_pass_at_k=sum(any(srows[j * n + i]["correct"] for j in range(args.samples))
                                            for i in range(n)) / n)
    result["seconds"] = round(time.time() - t0, 2)
    print(f"{args.split}: greedy accuracy {result['greedy_accuracy']:.3f}, format-valid {result['greedy_format_valid']:.3f}, "
          f"mean answer {result['greedy_mean_tokens']:.1f} tokens, n={result['n']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How far --teacher-top-k K moves the loss and its gradient from the full-vocabulary loss, as K falls.

    python tools/topk_bias.py                                   # the shipped Countdown pair (char vocabulary)
    python tools/topk_bias.py --teacher hf/smollm2-135m-instruct --student hf/smollm2-135m-instruct \
        --keep-layers 0::3 --rows 8 --max-new-tokens 48        # SmolLM2-135M into its every-third-layer copy

The student (built as train.py builds it: train.load_models) samples one completion for each of --rows val
prompts (temperature 1, seeded; --samples teacher: the teacher samples them, as seq-KD rows); both models
score them. On the completion tokens, for each loss and K: the loss against the full one, (L_K - L) / L,
and for its gradient w.r.t. the student's logits and w.r.t. the student's parameters, the cosine with the
full loss's gradient and the relative norm of the difference ||g_K - g|| / ||g||. `t tail` and `s tail`
are the teacher's and the student's mean mass outside the teacher's top K (the bucket). Then the bytes
per position of the teacher's signal: logits, hidden states, top K. The last line is one JSON object.
The loss is losses.divergence_loss (the chunked path; the head-fused one equals it, tested).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import train  # noqa: E402
from data import TASK_SPLITS  # noqa: E402
from losses import divergence_loss  # noqa: E402
from model import forward_from  # noqa: E402
from rollout import generate, left_pad  # noqa: E402


def signal_bytes(vocab, d_model, ks):
    """Bytes per position of what the teacher hands the loss: its logits (fp32), its final hidden states
    (fp32 and bf16; the loss multiplies them by the head), or its top K (fp32 values, int32 ids: a vocabulary
    below 2^31, plus one fp32 bucket)."""
    return dict(logits_fp32=4 * vocab, hidden_fp32=4 * d_model, hidden_bf16=2 * d_model,
                **{f"top{k}": 8 * k + 4 for k in ks})


def compare(g, g_full):
    g, g_full = g.flatten().double(), g_full.flatten().double()
    return dict(cos=(g @ g_full / (g.norm() * g_full.norm())).item(),
                rel_norm=((g - g_full).norm() / g_full.norm()).item())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=os.path.join(train.ROOT, "checkpoints", "teacher"))
    p.add_argument("--student", default=os.path.join(train.ROOT, "checkpoints", "student"))
    p.add_argument("--keep-layers", default=None, help="the student keeps these blocks of --student (train.py's)")
    p.add_argument("--rows", type=int, default=64, help="val prompts, one student sample each")
    p.add_argument("--samples", default="student", choices=["student", "teacher"], help="who samples the rows")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--ks", default=[1, 8, 64, 512], type=lambda s: [int(k) for k in s.split(",")],
                   help="comma-separated K values")
    p.add_argument("--losses", default="fkl,rkl,jsd")
    p.add_argument("--beta", type=float, default=0.5, help="jsd's beta")
    p.add_argument("--loss-temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ks = args.ks
    names = args.losses.split(",")
    targs = ["--teacher", args.teacher, "--student", args.student, "--max-new-tokens", str(args.max_new_tokens),
             "--out", os.devnull] + (["--keep-layers", args.keep_layers] if args.keep_layers else [])
    try:  # every loss and K through train.py's own checks, the models as train.py loads them
        for name in names:
            train.parse_args(targs + ["--loss", name, "--beta", str(args.beta), "--teacher-top-k", str(min(ks))])
        student, fmt, teacher = train.load_models(train.parse_args(targs + ["--teacher-top-k", str(min(ks))]))[:3]
    except ValueError as e:
        sys.exit(f"topk_bias.py: error: {e}")
    t0 = time.time()
    problems = TASK_SPLITS["countdown"]("val")[:args.rows]
    ids, valid = left_pad(fmt.prompts(problems), fmt.pad_id)
    with torch.no_grad():
        sampler = student if args.samples == "student" else teacher
        batch = generate(sampler, ids, valid, args.max_new_tokens, fmt.eos_ids, fmt.pad_id, temperature=1.0,
                         generator=torch.Generator().manual_seed(args.seed))
        t_logits = forward_from(teacher, batch.tokens, batch.pos, batch.valid, batch.prompt_len)
    s_logits = forward_from(student, batch.tokens, batch.pos, batch.valid, batch.prompt_len)
    mask = batch.mask[:, batch.prompt_len:]
    n_tok = int(mask.sum())
    params = [q for q in student.parameters() if q.requires_grad]
    V = t_logits.size(-1)
    # each model's mass outside the teacher's top K, summed over the rest (not 1 - sum: no cancellation)
    pt, order = torch.softmax(t_logits[mask].float() / args.loss_temperature, -1).sort(-1, descending=True)
    ps = torch.softmax(s_logits[mask].detach().float() / args.loss_temperature, -1).gather(-1, order)
    tail = {k: (pt[:, k:].sum(-1).mean().item(), ps[:, k:].sum(-1).mean().item()) for k in ks}
    del pt, ps, order
    print(f"{args.teacher} -> {args.student}" + (f" (layers {args.keep_layers})" if args.keep_layers else "") +
          f": {len(problems)} {args.samples} samples, {n_tok} completion tokens, vocabulary {V}")
    print(f"{'loss':5} {'K':>5} {'t tail':>9} {'s tail':>9} {'loss':>9} {'rel loss':>10} {'cos logits':>11} "
          f"{'rel |dg| logits':>15} {'cos params':>11} {'rel |dg| params':>15}")
    rows, full_loss = [], {}
    for name in names:
        grads = {}
        for k in [None] + ks:
            x = s_logits.detach().requires_grad_(True)
            val = divergence_loss(x, t_logits, mask, name, n_tok, args.beta, args.loss_temperature, top_k=k)
            (g_logits,) = torch.autograd.grad(val, x)
            g_params = torch.autograd.grad(s_logits, params, g_logits, retain_graph=True)
            g_params = torch.cat([g.flatten() for g in g_params])
            grads[k] = val.item(), g_logits, g_params
            if k is None:
                full_loss[name] = val.item()
                continue
            full = grads[None]
            row = dict(loss=name, k=k, teacher_tail=tail[k][0], student_tail=tail[k][1], value=val.item(),
                       rel_loss=(val.item() - full[0]) / full[0],
                       logits=compare(g_logits, full[1]), params=compare(g_params, full[2]))
            rows.append(row)
            print(f"{name:5} {k:>5} {tail[k][0]:>9.2e} {tail[k][1]:>9.2e} {val.item():>9.4f} {row['rel_loss']:>+10.2e} "
                  f"{row['logits']['cos']:>11.6f} {row['logits']['rel_norm']:>15.2e} {row['params']['cos']:>11.6f} "
                  f"{row['params']['rel_norm']:>15.2e}")
        grads.clear()
    mem = signal_bytes(V, teacher.cfg.d_model, ks)
    print(f"teacher signal per position (vocabulary {V}, width {teacher.cfg.d_model}): " +
          ", ".join(f"{k} {v:,} B" for k, v in mem.items()))
    print(json.dumps(dict(teacher=args.teacher, student=args.student, keep_layers=args.keep_layers,
                          samples=args.samples, rows=len(problems), tokens=n_tok, vocab=V, seed=args.seed,
                          full_loss=full_loss, results=rows, bytes_per_position=mem,
                          seconds=round(time.time() - t0, 1))))


if __name__ == "__main__":
    main()

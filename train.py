"""Training: on-policy distillation (the main job), supervised fine-tuning and RL on Countdown.

    python train.py --stage distill                                 # shipped teacher -> shipped student
    python train.py --stage distill --lmbda 0.5 --loss jsd --beta 0.5 --seed 1 --out runs/jsd-l0.5-s1
    torchrun --standalone --nproc_per_node=2 train.py --stage distill --out runs/d2
    python train.py --stage sft --out runs/sft                      # a small model in minutes on CPU
    python train.py --stage sft --out runs/sft --resume             # continue from runs/sft/latest
    python train.py --stage rl --samples-per-prompt 8 --lr 2e-5     # policy gradient on the verifier's reward

This file holds the loop and its flags, in reading order: the step, setup, main, then the flags. The step
(train_step) reads like the method:
  rows       the first lambda x batch rows of the step's problems are on-policy (rollout.step_rows)
  rollouts   the --rollout scheme makes their completions (the student samples; speculative KD); the other
             rows are ground truth, or teacher samples with --seq-kd (rollout.make_batch)
  teacher    the frozen teacher scores every completion token in one forward (teacher.py; with another
             tokenizer, the same text in its own tokens: crosstok.py)
  loss       the stage's objective (losses.OBJECTIVES) as the student's output head, over the step's
             completion tokens / their count
  update     backward, clip, AdamW
SFT is the same step with cross-entropy on given completions; RL with every row sampled, no teacher, and
the verifier's reward advantage in place of the teacher's log-ratio; --reward-weight adds that advantage to
--loss sampled's (distillation plus reward). A checkpoint's Countdown format comes with it (chat.py,
data/countdown.py): char models answer a step list, chat models <answer>expression</answer> (give them
--max-new-tokens 64-256). Every step logs its FLOPs (flops.py): all runs share one compute axis.

One code path for 1 and N processes: the models are sharded with FSDP2 (distributed.py), also in a single
process. Each step's problems are drawn by a generator seeded with (seed, step), rank r takes rows r::world,
and sampling noise is drawn per global row, so N processes sample and compute what one does.

Run directory: args.json, metrics.jsonl (one JSON object per logged step / eval), ckpt/step_XXXXXX/ and
`latest` (checkpoint.py). The last stdout line is one JSON object.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from chat import load_chat
from checkpoint import (CheckpointError, check_resume, latest_checkpoint, load_config, load_pretrained,
                        load_train_state, open_metrics, resolve_checkpoint, restore, save_checkpoint, text_files)
from crosstok import cross_distill_loss, shared_vocab
from data import TASK_SPLITS, check_task_args, longest_prompt, task_format
from data.countdown import TOKENIZER_PATH, countdown_format
from distributed import all_sum, compute_dtype, peak_mem_mb, setup_dist, shard
from eval_countdown import (collapse_warning, end_of_run, evaluate, rewards, rkl_text, start_of_run, step_metrics,
                            step_record, validate)
from flops import flops_train_step
from lora import add_lora, add_lora_args, check_lora_args, trainable_params
from losses import OBJECTIVES, add_loss_args, check_loss_args, step_reward_advantage
from model import GPT, GPTConfig, GradKV, forward_from, keep_layers, layer_slice, num_params
from rollout import add_rollout_args, check_context, check_rollout_args, make_batch, shared_prompts, step_rows
from selfdistill import (SELF, ContextPrompts, add_self_args, check_context_fits, check_self_args, self_teacher,
                         self_view)
from teacher import check_teacher, head_weight, load_teacher, reuses_rollout, teacher_scores

ROOT = os.path.dirname(os.path.abspath(__file__))


def fail(msg):
    sys.stderr.write(f"train.py: error: {msg}\n")  # one write: ranks share the terminal
    sys.exit(2)

# ---------------------------------------------------------------------------------------------- the step

@dataclass
class Run:
    """What a step reads besides the models (library functions take it as `run`)."""
    args: argparse.Namespace
    fmt: object             # the student's Countdown format (data.countdown.countdown_format): tokenizer, prompts
    t_fmt: object           # the teacher's (None without a teacher)
    cross: bool             # the teacher has another tokenizer: span-aligned losses (crosstok.py)
    shared: tuple           # (student ids, teacher ids) of the token strings both vocabularies hold (cross)
    rank: int
    world: int
    device: torch.device
    pad: int                # the student format's pad id
    eos: object             # the ids a rollout stops at (the student format's eos_ids; an int also does)
    t_head: torch.Tensor    # the teacher's output head, whole on every rank (teacher.head_weight); distill only
    cache_len: int = None   # --compile: the rollouts' KV cache slots, fixed (the longest prompt + budget)
    mix_fmt: object = None  # --sft-mix: the mixed-in task's format (data.arith.ArithFormat)
    context: object = None  # --teacher self: the teacher's prompt of a problem (selfdistill.ContextPrompts)

    def sync(self):  # part timings mean something on CUDA only after the queued kernels ran
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def train_step(step, rows, model, teacher, optimizer, run):
    """One optimizer step on this rank's rows (teacher: None, or only a sampler for sft --seq-kd, unless
    distilling), --micro-batch-size rows at a time from the teacher on. Returns the step's metrics summed
    over ranks, its FLOPs (flops.py) and each part's seconds."""
    args, distill, times, t = run.args, run.args.stage == "distill", {}, time.perf_counter()

    def lap(part):
        nonlocal t
        run.sync()
        times[part], t = times.get(part, 0.0) + time.perf_counter() - t, time.perf_counter()

    batch, flops = make_batch(step, rows, model, teacher, run)
    n_tok = all_sum(batch.mask.sum().item(), run.device)  # completion tokens of the whole step, all ranks
    # the verifier on the student's samples (bench.py's synthetic rows have no problem to verify)
    reward = rewards(batch, rows, run.fmt) if batch.on_policy.any() and rows[0].problem else None
    reward_adv = None
    if args.stage == "rl" or args.reward_weight:
        reward_adv = step_reward_advantage(reward, args.samples_per_prompt, args.adv_norm, run.rank, run.world)
    lap("rollout")
    loss, rkl, one_to_one = 0.0, 0.0, 0
    for sl in micro_batches(len(rows), args.micro_batch_size):  # the same count on every rank
        mb, adv = batch.select(sl), reward_adv[sl] if reward_adv is not None else None
        groups = shared_prompts(mb)  # each distinct prompt runs once in the forwards below
        # --teacher self reads the rows' completions after its own context prompts (selfdistill.py)
        t_mb, t_groups, t_flops = self_view(mb, rows[sl], groups, teacher, run) if distill else (mb, groups, 0)
        reuse = distill and reuses_rollout(t_mb)  # --rollout skd: the teacher's states from decoding, no forward
        t_out, cb = teacher_scores(teacher, t_mb, rows[sl], t_groups, run, reuse) if distill else (None, None)
        lap("teacher")
        if cb is None:  # the objective runs as the student's head: logits only a chunk of positions at a time
            objective = OBJECTIVES[args.stage]
            mb_loss, mb_rkl = forward_from(model, mb.tokens, mb.pos, mb.valid, mb.prompt_len, cache_cls=GradKV,
                                           head=lambda h, w: objective(h, w, mb, n_tok, run, t_out, adv),
                                           groups=None if args.activation_checkpointing else groups)
        else:  # another tokenizer: both models' logits of the whole text, span-aligned
            s_logits = forward_from(model, mb.tokens, mb.pos, mb.valid, 1)
            mb_loss, mb_rkl = cross_distill_loss(s_logits, t_out, mb, cb, run.shared, n_tok, args)
            one_to_one += cb.one_to_one.sum().item()
        (mb_loss * run.world).backward()  # FSDP averages gradients over ranks; the loss is already per step token
        lap("student")
        loss, rkl = loss + mb_loss.detach(), rkl + (mb_rkl.detach() if mb_rkl is not None else 0.0)
        flops += flops_train_step(model.cfg, teacher.cfg if distill else None, mb,
                                  len(groups[0]) if groups is not None else len(mb.tokens), cb and cb.teacher,
                                  args.loss == "sampled", args.activation_checkpointing, scored=not reuse) + t_flops
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, args)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lap("optimizer")
    return step_metrics(batch, n_tok, loss, rkl, reward, gnorm, lr_at(step, args), flops, times, one_to_one, run)


def micro_batches(n, size):
    """Slices of n rows, `size` at a time (0: all at once)."""
    size = size or n
    return [slice(i, i + size) for i in range(0, n, size)]


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

# ------------------------------------------------------------------------------------------------ setup

def load_models(args):
    """Everything a run reads from disk, checked before a process group starts or the run directory is
    touched: (student, its format, teacher or None, its format, cross, resume state or None, the student's
    text files). A checkpoint's format comes with it (chat.load_chat: its own tokenizer.json, chat template,
    eos ids); a fresh model takes --tokenizer. Raises CheckpointError / ValueError with one line."""
    if args.resume:
        init_path = latest_checkpoint(args.out)
        if init_path is None:
            raise CheckpointError(f"--resume: {os.path.join(args.out, 'latest')} does not exist")
    elif latest_checkpoint(args.out) is not None:
        raise CheckpointError(f"{args.out} already holds a run; pass --resume to continue it or choose another --out")
    else:
        init_path = resolve_checkpoint(args.student) if args.student else None
    torch.manual_seed(args.seed)  # a fresh model's initial weights: the same on every rank and world size
    fmt, resume_state = None if init_path else countdown_format(load_chat(None, args.tokenizer)), None
    if init_path and args.resume:
        student, resume_state = GPT(load_config(init_path)), load_train_state(init_path)
        check_resume(resume_state[1].get("args", {}), args, init_path)
    elif init_path:
        student = load_pretrained(init_path).train()
        if args.keep_layers:
            student = keep_layers(student, layer_slice(args.keep_layers, student.cfg.n_layer))
    else:
        student = GPT(GPTConfig(vocab_size=fmt.tok.get_vocab_size(), n_layer=args.n_layer, n_head=args.n_head,
                                d_model=args.d_model, d_mlp=args.d_mlp))
    fmt = task_format(args.task, fmt or countdown_format(load_chat(init_path)))  # the weights' errors first
    if args.sft_mix:
        task_format(args.sft_mix, fmt)  # refuses a chat model here, before anything runs
    if args.lora_rank:  # before sharding, so FSDP shards the adapters with their blocks
        add_lora(student, args.lora_rank, args.lora_alpha, args.seed)
    files = text_files(init_path, args.tokenizer)
    if args.stage == "rl" or (args.stage == "sft" and not args.seq_kd):  # no teacher
        return student, fmt, None, None, False, resume_state, files
    if args.teacher == SELF:  # the student's own weights read the solution (selfdistill.py)
        teacher = self_teacher(args, student)
        check_context_fits(ContextPrompts(fmt, args.self_context), teacher.cfg, args.max_new_tokens)
        return student, fmt, teacher, fmt, False, resume_state, files
    teacher, t_fmt = load_teacher(args.teacher)
    t_fmt = task_format(args.task, t_fmt)
    cross = check_teacher(t_fmt, fmt, teacher.cfg, args)
    check_context(fmt, t_fmt if cross else fmt, student.cfg, teacher.cfg, args.max_new_tokens, args.task)
    return student, fmt, teacher, t_fmt, cross, resume_state, files


def setup(args):
    """Models from disk, a writable run directory, the process group, the sharded models and the Run every
    step reads: (run, student, teacher or None, resume state or None, the student's text files). Bad input
    stops here with one line, before any training."""
    try:
        student, fmt, teacher, t_fmt, cross, resume_state, files = load_models(args)
    except (CheckpointError, ValueError) as e:
        fail(str(e))
    try:
        os.makedirs(os.path.join(args.out, "ckpt"), exist_ok=True)
        probe = os.path.join(args.out, f".write_test.{os.getpid()}")  # one per process: ranks run this together
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"cannot write to run directory {args.out}: {e.strerror}")
    try:
        rank, world, device = setup_dist(args.device)
    except ValueError as e:
        fail(str(e))
    n_on = on_policy_rows(args)
    if args.eval_n and args.eval_n < world:  # every rank decodes some of them
        fail(f"--eval-n {args.eval_n} is below the {world} processes")
    if args.batch_size % world or n_on % args.samples_per_prompt or n_on % world:
        fail(f"--batch-size {args.batch_size} and its {n_on} on-policy rows (--lmbda x --batch-size) must be "
             f"multiples of the {world} processes, and the on-policy rows of --samples-per-prompt")
    student.checkpoint_blocks = args.activation_checkpointing
    model = shard(student.to(device), device)
    if teacher is student:  # --teacher self --self-teacher live: one model
        teacher = model
    elif teacher is not None:
        teacher = shard(teacher.to(device), device)
    run = Run(args, fmt, t_fmt, cross, shared_vocab(fmt.tok, t_fmt.tok, device) if cross else None, rank, world,
              device, fmt.pad_id, fmt.eos_ids, head_weight(teacher, compute_dtype(device)) if args.stage == "distill"
              else None, mix_fmt=task_format(args.sft_mix, fmt) if args.sft_mix else None,
              context=ContextPrompts(fmt, args.self_context) if args.teacher == SELF else None)
    if args.compile:  # compiled blocks for the step's forwards; one static cache shape for every rollout: the
        for m in (model, teacher) if teacher not in (None, model) else (model,):  # longest prompt + the budget
            m.compile_blocks()
        run.cache_len = max(longest_prompt(fmt, args.task), longest_prompt(t_fmt, args.task) if t_fmt else 0) + args.max_new_tokens
    if rank == 0 and cross and args.loss != "sampled":
        print(f"warning: --loss {args.loss} across tokenizers is the GOLD hybrid (shared token strings + ULD); it "
              "collapsed a number-level student under a char-level teacher on Countdown (docs/cross_tokenizer.md);"
              " --loss sampled is the per-span policy gradient", file=sys.stderr)
    if rank == 0:
        print(f"student: {num_params(model) / 1e6:.3f}M params, {num_params(model, trainable=True) / 1e6:.3f}M "
              f"trainable, {model.cfg}" +
              (f"\nteacher: {num_params(teacher) / 1e6:.3f}M params {teacher.cfg}" if teacher is not None else ""))
    return run, model, teacher, resume_state, files


def on_policy_rows(args):
    """The student-sampled rows of every step (parse_args: lambda x batch is whole); RL samples every row."""
    return {"sft": 0, "rl": args.batch_size, "distill": round(args.lmbda * args.batch_size)}[args.stage]

# ------------------------------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0 and latest_checkpoint(args.out) is not None:
        args.resume = True  # torchrun --max-restarts restarted this job: continue from the latest checkpoint
    run, model, teacher, resume_state, files = setup(args)
    optimizer = torch.optim.AdamW(trainable_params(model), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay, fused=run.device.type == "cuda")
    state = dict(step=0, train_seconds=0.0, flops=0.0, samples=0)  # where the run is on its compute axes
    if resume_state is not None:
        msd, saved = resume_state
        restore(model, optimizer, msd, saved["optimizer"])
        state |= {k: saved.get(k, state[k]) for k in state}
    if run.rank == 0:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args) | {"world_size": run.world}, f, indent=1)
    metrics = open_metrics(os.path.join(args.out, "metrics.jsonl"), state["step"]) if run.rank == 0 else None

    def log(rec):
        if metrics:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()

    train, val, test = (TASK_SPLITS[args.task](s) for s in ("train", "val", "test"))
    val, test = (val[:args.eval_n], test[:args.eval_n]) if args.eval_n else (val, test)
    # eval lets every model answer in at least 24 tokens (a step list takes up to 18) even when rollouts are
    # cut shorter, e.g. to fit a cross-tokenizer teacher's context; chat models get --max-new-tokens
    eval_tokens = max(24, args.max_new_tokens)
    summary, before = {}, []
    if state["step"] == 0:
        summary = start_of_run(model, teacher, run, val, test, eval_tokens, before)
        log(dict(step=0, **summary, val_accuracy=evaluate(model, run.fmt, val, run, eval_tokens)["accuracy"]))
    elif run.rank == 0:  # resumed: the start-of-run accuracies were logged at step 0
        with open(os.path.join(args.out, "metrics.jsonl")) as f:
            summary = {k: v for rec in map(json.loads, f) if rec["step"] == 0 for k, v in rec.items()
                       if k not in ("step", "val_accuracy")}
    last = train_loop(model, teacher, optimizer, run, state, train, val, eval_tokens, log, files)
    summary |= end_of_run(model, optimizer, run, test, eval_tokens, before)
    log(dict(step=last.get("step", state["step"]), **summary))
    if run.rank == 0:
        print(json.dumps(dict(out=args.out, **last, **summary, peak_mem_mb=round(peak_mem_mb(run.device)))))
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()


def train_loop(model, teacher, optimizer, run, state, train, val, eval_tokens, log, files):
    """Steps from state["step"] to --steps (or --max-minutes): train, log, eval, save. Returns the last
    step's record."""
    args, mix, last = run.args, None, {}
    if args.sft_mix:
        mix = (TASK_SPLITS[args.sft_mix]("train"), run.mix_fmt)
    # a bar in a terminal; in a log file only the eval lines and the final JSON
    bar = tqdm(total=args.steps, initial=state["step"], disable=run.rank != 0 or not sys.stderr.isatty(),
               dynamic_ncols=True)
    for step in range(state["step"], args.steps):
        t0 = time.time()
        rows = step_rows(train, step, args, on_policy_rows(args), run.fmt, run.rank, run.world, mix)
        try:
            m = train_step(step, rows, model, teacher, optimizer, run)
        except ValueError as e:  # text a cross-tokenizer teacher cannot reproduce: stop, never misalign
            fail(f"step {step + 1}: {e}; {last_good(args.out)}")
        if not math.isfinite(m["loss"]):
            bar.close()
            fail(f"loss is {m['loss']} at step {step + 1}; stopping. {last_good(args.out)}")
        dt = time.time() - t0
        state |= dict(step=step + 1, train_seconds=state["train_seconds"] + dt, flops=state["flops"] + m["flops"],
                      samples=state["samples"] + m["samples"])
        last = step_record(step + 1, m, dt, state)
        log(last)
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.4f}")
        # --max-minutes on the ranks' mean training time, so every rank stops at the same step
        out_of_time = args.max_minutes and all_sum(state["train_seconds"], run.device) / run.world / 60 >= args.max_minutes
        done = step + 1 == args.steps or bool(out_of_time)
        if (args.eval_every and (step + 1) % args.eval_every == 0) or done:
            ev = validate(model, teacher, val, eval_tokens, run)
            last |= {f"val_{k}": None if v is None else round(v, 4) for k, v in ev.items()}
            log(dict(step=step + 1, **{f"val_{k}": v for k, v in ev.items()}))
            if run.rank == 0:
                bar.write(f"step {step + 1}: loss {m['loss']:.4f}" +  # --task instruct: no accuracy
                          rkl_text(" val accuracy {:.3f}", ev["accuracy"]) +
                          rkl_text(" format-valid {:.3f}", ev["format_valid"]) + rkl_text(" rkl {:.3f}", ev.get("rkl")) +
                          f" ({state['train_seconds'] / 60:.1f} min)")
                if collapse_warning(ev, step + 1):
                    print(collapse_warning(ev, step + 1), file=sys.stderr)
        if (step + 1) % args.save_every == 0 or done:
            save_checkpoint(args.out, model, optimizer, step + 1, files[0],
                            dict(train_seconds=state["train_seconds"], flops=state["flops"], samples=state["samples"],
                                 args=vars(args)), args.keep, side=files[1:])
            # the next one copies them from this one: --keep may delete the checkpoint a resumed run started from
            files = text_files(latest_checkpoint(args.out), args.tokenizer)
        if done:
            break
    bar.close()
    return last


def last_good(out):
    latest = latest_checkpoint(out)
    return f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved yet"


# -------------------------------------------------------------------------------------------- arguments

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SFT, on-policy distillation and RL on Countdown")
    g = p.add_argument_group("the run")
    g.add_argument("--stage", default="distill", choices=["sft", "distill", "rl"])
    g.add_argument("--out", default=None, help="run directory (default runs/<stage>-<loss>-l<lmbda>-s<seed>)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--tokenizer", default=TOKENIZER_PATH)
    g = p.add_argument_group("the models")
    g.add_argument("--student", default=None, help="initial student checkpoint (distill and rl default: "
                   "checkpoints/student; sft default: a fresh model of the shape below)")
    g.add_argument("--teacher", default=os.path.join(ROOT, "checkpoints", "teacher"), help="frozen teacher (distill, "
                   "and sft --seq-kd); 'self': the student, reading the solution, is its own teacher (selfdistill.py)")
    add_self_args(g)
    g.add_argument("--keep-layers", default=None, metavar="START:STOP:STEP", help="start the student from these "
                   "blocks of --student only (a Python slice, e.g. 0::3: every third layer of a teacher copy)")
    g.add_argument("--n-layer", type=int, default=4)
    g.add_argument("--n-head", type=int, default=4)
    g.add_argument("--d-model", type=int, default=128)
    g.add_argument("--d-mlp", type=int, default=0, help="0 = 4 * d-model")
    add_lora_args(g)
    g = p.add_argument_group("the rows of a batch")
    g.add_argument("--lmbda", type=float, default=1.0, help="fraction of each batch's rows sampled by the student")
    g.add_argument("--samples-per-prompt", type=int, default=1, help="student samples per on-policy prompt")
    g.add_argument("--seq-kd", action="store_true", help="off-policy rows are teacher samples, not ground truth "
                   "(with --stage sft: SFT on teacher samples)")
    g.add_argument("--task", default="countdown", choices=["countdown", "arith", "instruct"], help="the rows' task "
                   "(arith: data/arith.py, the continual-learning recipe's new task, SFT only; instruct: "
                   "data/instructions.py, general chat instructions for chat models, no verifier)")
    g.add_argument("--sft-mix", default=None, choices=["arith"], help="distill: the off-policy rows are this task's "
                   "ground truth, learnt by cross-entropy, while the on-policy rows are distilled (docs/continual.md)")
    g.add_argument("--augment", action="store_true", help="sft: shuffle each prompt's numbers and pick a random "
                   "valid solution (fights memorising the small problem universe)")
    add_rollout_args(p)
    add_loss_args(p)
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None, help="default: sft 1000, distill 800")
    g.add_argument("--batch-size", type=int, default=None, help="global rows per optimizer step (sft 256, distill 64)")
    g.add_argument("--lr", type=float, default=None, help="default: sft 2e-3, distill 2e-4")
    g.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine decays to lr * this")
    g.add_argument("--warmup", type=int, default=None, help="default: sft 100, distill 20")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--micro-batch-size", type=int, default=0, help="rows per process in one forward and backward "
                   "(teacher scoring, student, loss); the step accumulates their gradients (0 = all at once)")
    g.add_argument("--activation-checkpointing", action="store_true", help="keep only each student block's "
                   "input in forward and recompute the block in backward: less memory for ~1/3 more student FLOPs")
    g = p.add_argument_group("eval, logging, checkpoints")
    g.add_argument("--eval-every", type=int, default=None, help="val accuracy every N steps (0 = only at the end)")
    g.add_argument("--eval-n", type=int, default=0, help="val (and distill's test) problems to evaluate (0 = all)")
    g.add_argument("--save-every", type=int, default=500)
    g.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    g.add_argument("--max-minutes", type=float, default=0, help="stop (and save) after this much training time")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p, args):
    """Fill the stage's defaults and refuse flags that contradict each other (p.error: one line, exit 2)."""
    sft = args.stage == "sft"
    for name, dflt in (("steps", (1000, 800)), ("batch_size", (256, 64)), ("lr", (2e-3, 2e-4)),
                       ("warmup", (100, 20)), ("eval_every", (250, 200))):
        if getattr(args, name) is None:
            setattr(args, name, dflt[0] if sft else dflt[1])
    if args.student is None and not sft:  # distill and rl start from the shipped student
        args.student = os.path.join(ROOT, "checkpoints", "student")
    if args.out is None:
        name = f"{args.loss}-l{args.lmbda:g}" if args.stage == "distill" else args.stage
        args.out = os.path.join("runs", f"{name}-s{args.seed}")
    for name in ("steps", "batch_size", "n_layer", "n_head", "d_model", "save_every", "keep", "max_new_tokens",
                 "samples_per_prompt"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("lmbda", "beta", "temperature", "loss_temperature", "uld_weight", "lr", "min_lr_frac",
                 "weight_decay", "grad_clip", "max_minutes", "reward_weight"):
        if not math.isfinite(getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    if args.lr <= 0 or not 0 <= args.min_lr_frac <= 1 or args.warmup < 0 or args.eval_every < 0:
        p.error("need --lr > 0, 0 <= --min-lr-frac <= 1, --warmup >= 0, --eval-every >= 0")
    if args.micro_batch_size < 0:
        p.error(f"--micro-batch-size must be >= 0, got {args.micro_batch_size}")
    if not 0 <= args.lmbda <= 1:
        p.error(f"--lmbda must be in [0, 1], got {args.lmbda}")
    n_on = args.lmbda * args.batch_size
    if args.stage == "distill" and abs(n_on - round(n_on)) > 1e-9:  # so the on-policy fraction is lambda in every batch
        lo, hi = math.floor(n_on), math.ceil(n_on)
        p.error(f"--lmbda {args.lmbda} x --batch-size {args.batch_size} = {n_on:g} rows is not a whole number; "
                f"use --lmbda {lo / args.batch_size:g} ({lo} rows) or {hi / args.batch_size:g} ({hi})")
    if args.temperature < 0 or args.top_k < 0:
        p.error("need --temperature >= 0, --top-k >= 0")
    if args.d_model % args.n_head or (args.d_model // args.n_head) % 2:
        p.error("--d-model must be a multiple of --n-head with an even head size")
    args.d_mlp = args.d_mlp or 4 * args.d_model
    for check in (check_task_args, check_loss_args, check_rollout_args, check_lora_args, check_self_args):
        try:
            check(args)
        except ValueError as e:
            p.error(str(e))


if __name__ == "__main__":
    main()
    # A finished run has nothing left to do (metrics flushed, checkpoints fsynced, the group destroyed): skip
    # the interpreter's teardown, where gloo's C++ threads can abort a finished multi-process run with
    # SIGABRT and no Python frame left.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

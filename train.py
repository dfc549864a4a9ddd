"""Training: on-policy distillation (the main job) and supervised fine-tuning on Countdown.

    python train.py --stage distill                                 # shipped teacher -> shipped student
    python train.py --stage distill --lmbda 0.5 --loss jsd --beta 0.5 --seed 1 --out runs/jsd-l0.5-s1
    torchrun --standalone --nproc_per_node=2 train.py --stage distill --out runs/d2
    python train.py --stage sft --out runs/sft                      # a small model in minutes on CPU
    python train.py --stage sft --out runs/sft --resume             # continue from runs/sft/latest

main() sets up and then loops over train_step, which reads like the method:
  rows       the step's problems; the first lambda * batch rows are on-policy, the rest off-policy
  rollouts   the student samples the on-policy rows (rollout.py: KV cache, no grad); the off-policy rows
             are ground truth, or teacher samples with --seq-kd
  teacher    the frozen teacher scores every completion token in one forward (teacher.py; with another
             tokenizer it scores the same text in its own tokens: crosstok.py)
  student    the student forward with grad
  loss       the divergence (losses.py) summed over the step's completion tokens / their count
  update     backward, clip, AdamW
SFT is the same step with cross-entropy on ground-truth answers (it trains the teacher and the student
warm start).

One code path for 1 and N processes: the models are sharded with FSDP2 (fully_shard per block, then the
root) over gloo on CPU or nccl on CUDA, also when there is a single process. The global batch does not
depend on the number of processes: each step's problems are drawn by a generator seeded with (seed,
step), rank r takes rows r::world, and sampling noise is drawn per global row (rollout.generate), so N
processes sample and compute what one does.

Run directory: args.json, metrics.jsonl (one JSON object per logged step / eval), ckpt/step_XXXXXX/ and
`latest` (checkpoint.py). The last stdout line is one JSON object.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import (CheckpointError, latest_checkpoint, load_config, load_pretrained, load_tokenizer_for,
                        load_train_state, resolve_checkpoint, restore, save_checkpoint)
from crosstok import cross_tokenizer_batch, cross_tokenizer_loss, shared_vocab
from data.countdown import (EOS, PAD, TOKENIZER_PATH, answer_ids, augment, load_split, load_tokenizer, prompt_ids,
                            prompt_text)
from eval_countdown import countdown_eval, summarize
from losses import (LOSSES, distill_advantage, divergence_loss, per_token_divergence, policy_gradient_loss,
                    token_logprobs)
from model import GPT, GPTConfig, num_params
from rollout import generate, left_pad, pack
from teacher import check_same_tokenizer, load_teacher, score

ROOT = os.path.dirname(os.path.abspath(__file__))


# -------------------------------------------------------------------------------------------- arguments

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SFT and on-policy distillation on Countdown")
    p.add_argument("--stage", default="distill", choices=["sft", "distill"])
    p.add_argument("--out", default=None, help="run directory (default runs/<stage>-<loss>-l<lmbda>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    # models
    p.add_argument("--student", default=None, help="initial student checkpoint (distill default: checkpoints/student;"
                   " sft default: a fresh model of the shape below)")
    p.add_argument("--teacher", default=os.path.join(ROOT, "checkpoints", "teacher"), help="frozen teacher (distill)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-mlp", type=int, default=0, help="0 = 4 * d-model")
    # distillation
    p.add_argument("--lmbda", type=float, default=1.0, help="fraction of each batch's rows sampled by the student")
    p.add_argument("--loss", default="rkl", choices=LOSSES)
    p.add_argument("--beta", type=float, default=0.5, help="jsd interpolation, in (0, 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of rollouts")
    p.add_argument("--top-k", type=int, default=0, help="sample from the top k tokens (0 = all)")
    p.add_argument("--loss-temperature", type=float, default=1.0, help="softmax temperature inside the divergence")
    p.add_argument("--augment", action="store_true", help="sft: shuffle each prompt's numbers and pick a random "
                   "valid solution (fights memorising the small problem universe)")
    p.add_argument("--seq-kd", action="store_true", help="off-policy rows are teacher samples, not ground truth")
    p.add_argument("--cross-tokenizer", default="auto", choices=["auto", "on", "off"],
                   help="span-aligned losses for a teacher with another tokenizer (auto: when the vocabularies "
                   "differ; off: refuse such a teacher)")
    p.add_argument("--uld-weight", type=float, default=1.0, help="cross-tokenizer fkl/rkl/jsd: weight of the ULD "
                   "term on the tokens the two vocabularies do not share")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--samples-per-prompt", type=int, default=1, help="student samples per on-policy prompt")
    p.add_argument("--chunk-size", type=int, default=0, help="divergence over positions in chunks (0 = all at once)")
    # optimisation
    p.add_argument("--steps", type=int, default=None, help="default: sft 1000, distill 800")
    p.add_argument("--batch-size", type=int, default=None, help="global rows per optimizer step (sft 256, distill 64)")
    p.add_argument("--lr", type=float, default=None, help="default: sft 2e-3, distill 2e-4")
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--warmup", type=int, default=None, help="default: sft 100, distill 20")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    # eval, logging, checkpoints
    p.add_argument("--eval-every", type=int, default=None, help="val accuracy every N steps (0 = only at the end)")
    p.add_argument("--eval-n", type=int, default=0, help="val (and distill's test) problems to evaluate (0 = all)")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    p.add_argument("--max-minutes", type=float, default=0, help="stop (and save) after this much training time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tokenizer", default=TOKENIZER_PATH)
    args = p.parse_args(argv)
    sft = args.stage == "sft"
    for name, dflt in (("steps", (1000, 800)), ("batch_size", (256, 64)), ("lr", (2e-3, 2e-4)),
                       ("warmup", (100, 20)), ("eval_every", (250, 200))):
        if getattr(args, name) is None:
            setattr(args, name, dflt[0] if sft else dflt[1])
    if args.student is None and not sft:
        args.student = os.path.join(ROOT, "checkpoints", "student")
    if args.out is None:
        args.out = os.path.join("runs", f"sft-s{args.seed}" if sft else f"{args.loss}-l{args.lmbda:g}-s{args.seed}")
    for name in ("steps", "batch_size", "n_layer", "n_head", "d_model", "save_every", "keep", "max_new_tokens",
                 "samples_per_prompt"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("lmbda", "beta", "temperature", "loss_temperature", "uld_weight", "lr", "min_lr_frac",
                 "weight_decay", "grad_clip", "max_minutes"):
        if not math.isfinite(getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    if args.lr <= 0 or not 0 <= args.min_lr_frac <= 1 or args.warmup < 0 or args.eval_every < 0:
        p.error("need --lr > 0, 0 <= --min-lr-frac <= 1, --warmup >= 0, --eval-every >= 0")
    if not 0 <= args.lmbda <= 1:
        p.error(f"--lmbda must be in [0, 1], got {args.lmbda}")
    n_on = args.lmbda * args.batch_size
    if not sft and abs(n_on - round(n_on)) > 1e-9:  # so the on-policy fraction is lambda in every batch
        lo, hi = math.floor(n_on), math.ceil(n_on)
        p.error(f"--lmbda {args.lmbda} x --batch-size {args.batch_size} = {n_on:g} rows is not a whole number; "
                f"use --lmbda {lo / args.batch_size:g} ({lo} rows) or {hi / args.batch_size:g} ({hi})")
    if args.loss == "sampled" and not sft and args.lmbda != 1:
        p.error("--loss sampled needs --lmbda 1: its p_old is the distribution the student sampled from, and "
                "off-policy rows were not sampled by the student")
    if args.loss == "jsd" and not 0 < args.beta < 1:
        p.error(f"--beta must be in (0, 1) for jsd, got {args.beta} (the GKD JSD vanishes at 0 and 1)")
    if args.temperature < 0 or args.loss_temperature <= 0 or args.top_k < 0:
        p.error("need --temperature >= 0, --loss-temperature > 0, --top-k >= 0")
    if args.loss == "sampled" and (args.temperature != 1 or args.top_k):
        p.error("--loss sampled needs the student's own distribution: --temperature 1 and no --top-k")
    if args.d_model % args.n_head or (args.d_model // args.n_head) % 2:
        p.error("--d-model must be a multiple of --n-head with an even head size")
    args.d_mlp = args.d_mlp or 4 * args.d_model
    return args



def fail(msg):
    print(f"train.py: error: {msg}", file=sys.stderr)
    sys.exit(2)

# ------------------------------------------------------------------------------------------ distributed

def setup_dist(device_arg):
    """Process group for 1 or N processes (torchrun sets RANK/WORLD_SIZE); returns (rank, world, device)."""
    cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but CUDA is not available")
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device if cuda else None)
    else:  # plain `python train.py`: a group of one, so the FSDP code path is the same
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def shard(model, device):
    """FSDP2: each block is one all-gather unit, the root holds the embedding, final norm and head."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextmanager
def decoding(model):
    """Keep FSDP's blocks unsharded between decode steps, or every token re-gathers every block."""
    fsdp = hasattr(model, "set_reshard_after_forward")
    if fsdp:
        model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        if fsdp:
            model.set_reshard_after_forward(True)


def all_sum(x, device):
    t = torch.tensor(float(x), device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()

# ---------------------------------------------------------------------------------------------- the step

@dataclass
class Run:
    """What every step reads and nothing changes: flags, tokenizers, process layout."""
    args: argparse.Namespace
    tok: object                 # the student's tokenizer
    t_tok: object               # the teacher's (None for SFT)
    cross: bool                 # the teacher has another tokenizer: span-aligned losses (crosstok.py)
    shared: tuple               # (student ids, teacher ids) of the token strings both vocabularies hold
    rank: int
    world: int
    device: torch.device
    pad: int
    eos: int
    autocast: bool              # bf16 autocast (CUDA); CPU runs fp32
    share_prompts: bool = True  # one prefill per distinct prompt (rollout and teacher); False to measure it

    def sync(self):  # part timings mean something on CUDA only after the queued kernels ran
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class Row:
    prompt: list          # prompt token ids
    answer: list          # ground-truth completion ids (off-policy rows), None for on-policy rows
    on_policy: bool       # the student samples this row's completion
    problem: tuple        # (numbers, target, solution): a cross-tokenizer teacher builds its own prompt


def step_rows(problems, step, args, n_on, tok, rank, world):
    """This rank's rows of step `step`: the global batch is drawn by a generator seeded with (seed, step), its
    first n_on rows on-policy (n_on / spp problems, each spp times in a row), the rest off-policy; rank r
    takes rows r::world (n_on is a multiple of world, so every rank gets the same share of each kind)."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    idx = torch.randint(len(problems), (args.batch_size,), generator=g).tolist()
    probs = [problems[i] for i in idx]
    if args.augment:
        rng = random.Random(args.seed * 1_000_003 + step)
        probs = [augment(p, rng) for p in probs]
    n_prompts = n_on // args.samples_per_prompt
    on = [p for p in probs[:n_prompts] for _ in range(args.samples_per_prompt)]
    off = probs[n_prompts:n_prompts + args.batch_size - n_on]
    rows = ([Row(prompt_ids(tok, n, t), None, True, (n, t, a)) for n, t, a in on] +
            [Row(prompt_ids(tok, n, t), answer_ids(tok, a), False, (n, t, a)) for n, t, a in off])
    return rows[rank::world]


def rollout_seed(seed, step, stream):
    return (seed * 1_000_003 + step) * 2 + stream


def sample(model, prompts, run, step, stream):
    """(completions, their logprobs) as lists, sampled from `model` for this rank's share of the step's rows
    of a stream (0: the student's on-policy rows, 1: the teacher's seq-KD rows). Seeded by (seed, step,
    stream) on every rank and drawn per global row, so N processes sample what one process does."""
    args = run.args
    g = torch.Generator(run.device).manual_seed(rollout_seed(args.seed, step, stream))
    ids, valid = left_pad(prompts, run.pad, run.device)
    n_rows = len(prompts) * run.world  # every rank holds the same number of this stream's rows
    with decoding(model), torch.autocast(run.device.type, torch.bfloat16, enabled=run.autocast):
        batch = generate(model, ids, valid, args.max_new_tokens, run.eos, run.pad, temperature=args.temperature,
                         top_k=args.top_k or None, generator=g, rows=range(run.rank, n_rows, run.world),
                         n_rows=n_rows, share_prompts=run.share_prompts)
    return batch.completions(), batch.completion_logprobs()


def make_batch(step, rows, model, teacher, run):
    """The step's batch: the student's rollouts of the on-policy rows (which come first), then the
    off-policy rows' completions: ground truth, or the teacher's samples with --seq-kd."""
    on, off = [r for r in rows if r.on_policy], [r for r in rows if not r.on_policy]
    completions, logprobs = sample(model, [r.prompt for r in on], run, step, 0) if on else ([], [])
    if off and run.args.seq_kd:
        completions += sample(teacher, [r.prompt for r in off], run, step, 1)[0]
    else:
        completions += [r.answer for r in off]
    return pack([r.prompt for r in on + off], completions, run.pad, run.device,
                logprobs=logprobs + [None] * len(off), on_policy=[True] * len(on) + [False] * len(off))


def teacher_scores(teacher, batch, rows, step, run):
    """(teacher logits for the loss, the cross-tokenizer alignment or None). With the student's tokenizer,
    logits predicting the completion tokens only; with another, the same text in the teacher's tokens."""
    if not run.cross:
        return score(teacher, batch, run.autocast, batch.prompt_len, run.share_prompts), None
    try:
        cb = cross_tokenizer_batch(batch, [r.problem for r in rows], run.tok, run.t_tok, teacher.cfg.max_seq_len)
    except ValueError as e:  # text the teacher's tokenizer cannot reproduce: stop, never misalign
        fail(f"step {step + 1}: {e}; the last good checkpoint is {run.args.out}/latest")
    return score(teacher, cb.teacher, run.autocast), cb


def student_logits(model, batch, c, autocast):
    """Student logits (fp32, with grad) predicting tokens c.. of the batch: the forward computes the head only
    for the columns a loss reads (model.GPT.forward's out_from)."""
    with torch.autocast(batch.tokens.device.type, torch.bfloat16, enabled=autocast):
        return model(batch.tokens, batch.pos, batch.valid, out_from=c - 1)[:, :-1].float()


def distill_loss(s_logits, t_logits, batch, cb, n_tok, run):
    """(the loss, the student's reverse KL to the teacher summed over its own samples' tokens, for the log).

    Same tokenizer: the divergence over the full vocabularies, or the sampled estimator (a policy gradient
    with the teacher's log-ratio as advantage and the rollout's logprobs as p_old). Across tokenizers:
    crosstok.cross_tokenizer_loss, and the reverse KL is its sequence-level sample estimate."""
    args, on_rows = run.args, batch.on_policy
    if cb is not None:
        loss, s_span_lp, t_span_lp = cross_tokenizer_loss(
            s_logits, t_logits, batch, cb, run.shared, n_tok, args.loss, args.beta, args.loss_temperature,
            args.uld_weight, args.chunk_size)
        return loss, (s_span_lp - t_span_lp)[on_rows].sum()
    c = batch.prompt_len
    tgt, m = batch.tokens[:, c:], batch.mask[:, c:]
    if args.loss == "sampled":
        s_lp, old_lp = token_logprobs(s_logits, tgt), batch.logprobs[:, c:]
        adv = distill_advantage(token_logprobs(t_logits, tgt), old_lp)
        loss = policy_gradient_loss(s_lp, old_lp, adv, m, n_tok)
    else:
        loss = divergence_loss(s_logits, t_logits, m, args.loss, n_tok, args.beta, args.loss_temperature,
                               args.chunk_size)
    on = m & on_rows[:, None]
    return loss, per_token_divergence(s_logits[on], t_logits[on], "rkl").sum()


def sft_loss(s_logits, batch, n_tok):
    c = batch.prompt_len
    ce = F.cross_entropy(s_logits.flatten(0, 1), batch.tokens[:, c:].flatten(), reduction="none")
    return (ce * batch.mask[:, c:].flatten()).sum() / n_tok


def train_step(step, rows, model, teacher, optimizer, run):
    """One optimizer step on this rank's rows (teacher None: SFT). Returns the step's metrics, summed over
    ranks, and the seconds each part took."""
    args, times = run.args, {}
    t = time.perf_counter()

    def lap(part):
        nonlocal t
        run.sync()
        times[part], t = time.perf_counter() - t, time.perf_counter()

    batch = make_batch(step, rows, model, teacher, run)
    n_tok = all_sum(batch.mask.sum().item(), run.device)  # completion tokens of the whole step, all ranks
    lap("rollout")
    # logits only where a loss reads them: predictions of completion tokens (across tokenizers the spans
    # index the whole layout)
    c = 1 if run.cross else batch.prompt_len
    t_logits, cb = teacher_scores(teacher, batch, rows, step, run) if teacher is not None else (None, None)
    lap("teacher")
    s_logits = student_logits(model, batch, c, run.autocast)
    if teacher is None:
        loss, rkl = sft_loss(s_logits, batch, n_tok), None
    else:
        loss, rkl = distill_loss(s_logits, t_logits, batch, cb, n_tok, run)
    (loss * run.world).backward()  # FSDP averages gradients over ranks; the loss is already per step token
    lap("student")
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, args)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lap("optimizer")
    out = dict(loss=all_sum(loss.item(), run.device), lr=lr_at(step, args), grad_norm=float(gnorm),
               tokens=all_sum(batch.valid.sum().item(), run.device), times=times)
    if teacher is not None:  # what the student does on its own samples
        n_on_tok = all_sum((batch.mask & batch.on_policy[:, None]).sum().item(), run.device)
        out |= dict(on_policy_frac=all_sum(batch.on_policy.sum().item(), run.device) / args.batch_size,
                    student_rkl=all_sum(rkl.item(), run.device) / n_on_tok if n_on_tok else None,
                    completion_len=n_tok / args.batch_size)
        if cb is not None:  # share of completion tokens in spans of one token on each side
            out["one_to_one_frac"] = all_sum(cb.one_to_one.sum().item(), run.device) / n_tok
    return out


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

# ------------------------------------------------------------------------------------ eval and logging

def evaluate(model, tok, problems, rank, world, device):
    """Greedy accuracy on `problems`, each rank decoding its share."""
    mine = problems[rank::world]
    with torch.no_grad(), decoding(model):
        rows = countdown_eval(model, tok, mine, batch_size=512)
    s = summarize(rows)
    n = all_sum(s["n"], device)
    return {k: all_sum(s[k] * s["n"], device) / n for k in ("accuracy", "format_valid", "mean_tokens")}


def open_metrics(path, start):
    """metrics.jsonl for appending, holding only the records of steps <= start (a killed run may have
    logged steps after its last checkpoint; the resumed run logs them again)."""
    keep = []
    if start and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= start:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:
                    pass  # a line cut by the kill
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)
    return open(path, "a")

# ------------------------------------------------------------------------------------------------ setup

def longest_prompt(tok):
    """The most tokens any Countdown prompt ([BOS] + text) takes in this tokenizer."""
    texts = [prompt_text(n, t) for split in ("train", "val", "test") for n, t, _ in load_split(split)]
    return 1 + max(len(e.ids) for e in tok.encode_batch(texts))


def check_context(tok, t_tok, cfg, t_cfg, max_new_tokens):
    """Refuse (ValueError) a --max-new-tokens whose longest rollout would not fit the student's or the
    teacher's context. Across tokenizers the teacher needs at most one token per character of the
    completion (+ EOS), and a student token is at most `chars` characters."""
    n = longest_prompt(tok) + max_new_tokens
    if n > cfg.max_seq_len:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: the longest prompt + completion is {n} tokens, "
                         f"over the student's context of {cfg.max_seq_len}")
    if t_tok is not tok:
        special = set(tok.get_added_tokens_decoder())
        chars = max(len(t) for t, i in tok.get_vocab().items() if i not in special)
        n = longest_prompt(t_tok) + max_new_tokens * chars + 1
        if n > t_cfg.max_seq_len:
            raise ValueError(f"--max-new-tokens {max_new_tokens}: a completion of up to {max_new_tokens * chars} "
                             f"characters needs up to {n} teacher tokens with its prompt, over the teacher's "
                             f"context of {t_cfg.max_seq_len}")


def load_models(args):
    """Everything a run reads from disk, checked before a process group starts or the run directory is
    touched: (student, its tokenizer, teacher or None, its tokenizer, cross, resume state or None).
    Raises CheckpointError / ValueError with one line."""
    if args.resume:
        init_path = latest_checkpoint(args.out)
        if init_path is None:
            raise CheckpointError(f"--resume: {os.path.join(args.out, 'latest')} does not exist")
    elif latest_checkpoint(args.out) is not None:
        raise CheckpointError(f"{args.out} already holds a run; pass --resume to continue it or choose another --out")
    else:
        init_path = resolve_checkpoint(args.student) if args.student else None
    torch.manual_seed(args.seed)  # a fresh model's initial weights: the same on every rank and world size
    resume_state = None
    if init_path:
        cfg, tok = load_config(init_path), load_tokenizer_for(init_path, args.tokenizer)
        if os.path.isfile(os.path.join(init_path, "tokenizer.json")):
            args.tokenizer = os.path.join(init_path, "tokenizer.json")
        if args.resume:
            student, resume_state = GPT(cfg), load_train_state(init_path)
        else:
            student = load_pretrained(init_path).train()
    else:
        tok = load_tokenizer(args.tokenizer)
        student = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), n_layer=args.n_layer, n_head=args.n_head,
                                d_model=args.d_model, d_mlp=args.d_mlp))
    if args.stage != "distill":
        return student, tok, None, None, False, resume_state
    teacher, t_tok = load_teacher(args.teacher, default_tokenizer=args.tokenizer)
    same = tok.get_vocab() == t_tok.get_vocab()
    if args.cross_tokenizer == "off" or (same and args.cross_tokenizer == "auto"):
        check_same_tokenizer(tok, t_tok)
    cross = args.cross_tokenizer == "on" or not same
    if cross and args.seq_kd:
        raise ValueError("--seq-kd with a cross-tokenizer teacher is not supported (its samples are in the "
                         "teacher's tokens)")
    check_context(tok, t_tok if cross else tok, student.cfg, teacher.cfg, args.max_new_tokens)
    return student, tok, teacher, t_tok, cross, resume_state

# ------------------------------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    distill = args.stage == "distill"
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0 and latest_checkpoint(args.out) is not None:
        args.resume = True  # torchrun --max-restarts restarted this job: continue from the latest checkpoint
    try:
        student, tok, teacher, t_tok, cross, resume_state = load_models(args)
    except (CheckpointError, ValueError) as e:
        fail(str(e))
    try:
        os.makedirs(os.path.join(args.out, "ckpt"), exist_ok=True)
        probe = os.path.join(args.out, f".write_test.{os.getpid()}")  # one per process: ranks run this together
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"cannot write to run directory {args.out}: {e.strerror}")

    rank, world, device = setup_dist(args.device)
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    n_on = round(args.lmbda * args.batch_size) if distill else 0  # on-policy rows of every step (parse_args: whole)
    if n_on % args.samples_per_prompt or n_on % world:
        fail(f"--lmbda * --batch-size = {n_on} on-policy rows is not a multiple of --samples-per-prompt "
             f"{args.samples_per_prompt} and of the {world} processes")
    model = shard(student.to(device), device)
    teacher = shard(teacher.to(device), device) if distill else None
    run = Run(args, tok, t_tok, cross, shared_vocab(tok, t_tok, device) if cross else None, rank, world, device,
              tok.token_to_id(PAD), tok.token_to_id(EOS), autocast=device.type == "cuda")
    if rank == 0 and cross and args.loss != "sampled":
        print(f"warning: --loss {args.loss} across tokenizers is the GOLD hybrid (shared token strings + ULD); it "
              "collapsed a number-level student under a char-level teacher on Countdown (docs/cross_tokenizer.md);"
              " --loss sampled is the per-span policy gradient", file=sys.stderr)
    if rank == 0:
        print(f"student: {num_params(model) / 1e6:.3f}M params {model.cfg}" +
              (f"\nteacher: {num_params(teacher) / 1e6:.3f}M params {teacher.cfg}" if distill else ""))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")
    start, t_train = 0, 0.0
    if resume_state is not None:
        msd, state = resume_state
        restore(model, optimizer, msd, state["optimizer"])
        start, t_train = state["step"], state.get("train_seconds", 0.0)
    if rank == 0:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args) | {"world_size": world}, f, indent=1)
    metrics = open_metrics(os.path.join(args.out, "metrics.jsonl"), start) if rank == 0 else None

    def log(rec):
        if metrics:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()

    train, val, test = load_split("train"), load_split("val"), load_split("test")
    val, test = (val[:args.eval_n], test[:args.eval_n]) if args.eval_n else (val, test)
    summary = {}
    if distill and start == 0:  # where the student starts, and where the teacher is
        summary["teacher_test_accuracy"] = evaluate(teacher, t_tok, test, rank, world, device)["accuracy"]
        summary["student_test_accuracy_before"] = evaluate(model, tok, test, rank, world, device)["accuracy"]
        log(dict(step=0, **summary))
        if rank == 0:
            print(f"test accuracy: teacher {summary['teacher_test_accuracy']:.3f}, "
                  f"student before {summary['student_test_accuracy_before']:.3f}")
    elif distill and rank == 0:  # resumed: the start-of-run accuracies were logged at step 0
        with open(os.path.join(args.out, "metrics.jsonl")) as f:
            summary = {k: v for rec in map(json.loads, f) if rec["step"] == 0 for k, v in rec.items() if k != "step"}

    bar = tqdm(total=args.steps, initial=start, disable=rank != 0, dynamic_ncols=True)
    last = {}
    for step in range(start, args.steps):
        t0 = time.time()
        m = train_step(step, step_rows(train, step, args, n_on, tok, rank, world), model, teacher, optimizer, run)
        if not math.isfinite(m["loss"]):
            bar.close()
            fail(f"loss is {m['loss']} at step {step + 1}; stopping. The last good checkpoint is {args.out}/latest")
        dt = time.time() - t0
        t_train += dt
        last = dict(step=step + 1, loss=round(m["loss"], 5), lr=m["lr"], grad_norm=round(m["grad_norm"], 4),
                    tokens_per_s=round(m["tokens"] / dt), minutes=round(t_train / 60, 3))
        if distill:
            last |= dict(on_policy_frac=m["on_policy_frac"],
                         student_rkl=None if m["student_rkl"] is None else round(m["student_rkl"], 5),
                         completion_len=round(m["completion_len"], 3), rollout_s=round(m["times"]["rollout"], 3))
            if cross:
                last["one_to_one_frac"] = round(m["one_to_one_frac"], 4)
        log(last)
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.4f}")
        # --max-minutes on the ranks' mean training time, so every rank stops at the same step
        out_of_time = args.max_minutes and all_sum(t_train, device) / world / 60 >= args.max_minutes
        done = step + 1 == args.steps or bool(out_of_time)
        if (args.eval_every and (step + 1) % args.eval_every == 0) or done:
            ev = evaluate(model, tok, val, rank, world, device)
            last |= {f"val_{k}": round(v, 4) for k, v in ev.items()}
            log(dict(step=step + 1, **{f"val_{k}": v for k, v in ev.items()}))
            if rank == 0:
                bar.write(f"step {step + 1}: loss {m['loss']:.4f} val accuracy {ev['accuracy']:.3f} "
                          f"format-valid {ev['format_valid']:.3f} ({t_train / 60:.1f} min)")
        if (step + 1) % args.save_every == 0 or done:
            save_checkpoint(args.out, model, optimizer, step + 1, args.tokenizer,
                            dict(train_seconds=t_train, args=vars(args)), args.keep)
        if done:
            break
    bar.close()
    if distill:
        summary["student_test_accuracy_after"] = evaluate(model, tok, test, rank, world, device)["accuracy"]
        log(dict(step=last.get("step", start), **summary))
        if rank == 0:
            print(f"test accuracy: student after {summary['student_test_accuracy_after']:.3f}")
    if rank == 0:
        print(json.dumps(dict(out=args.out, **last, **summary)))
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # A finished run has nothing left to do (metrics flushed, checkpoints fsynced, the group destroyed): skip
    # the interpreter's teardown, where gloo's C++ threads can abort a finished multi-process run with
    # SIGABRT and no Python frame left.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

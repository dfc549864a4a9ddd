"""Training: on-policy distillation (the main job) and supervised fine-tuning on Countdown.

    python train.py --stage distill                                 # shipped teacher -> shipped student
    python train.py --stage distill --lmbda 0.5 --loss jsd --beta 0.5 --seed 1 --out runs/jsd-l0.5-s1
    torchrun --standalone --nproc_per_node=2 train.py --stage distill --out runs/d2
    python train.py --stage sft --out runs/sft                      # a small model in minutes on CPU
    python train.py --stage sft --out runs/sft --resume             # continue from runs/sft/latest

One distill step, as the loop below reads:
  1. the step's problems; the first round(lambda * batch) rows are on-policy, the rest off-policy
  2. completions: the student samples the on-policy rows (rollout.py, KV cache, no grad); the off-policy
     rows are ground truth, or teacher samples with --seq-kd
  3. the frozen teacher scores every token in one forward (teacher.py); with another tokenizer it scores
     the same text in its own tokens, aligned into spans
  4. the student forward with grad
  5. the divergence (losses.py) summed over the step's completion tokens / their count; backward, clip,
     AdamW, log, eval, checkpoint
SFT is the same loop with cross-entropy on ground-truth answers (it trains the teacher and the student
warm start).

One code path for 1 and N processes: the models are sharded with FSDP2 (fully_shard per block, then the
root) over gloo on CPU or nccl on CUDA, also when there is a single process. The global batch does not
depend on the number of processes: each step's problems are drawn by a generator seeded with (seed,
step), rank r takes rows r::world, and sampling noise is drawn per global row (rollout.generate), so N
processes sample and compute what one does. The loss is normalised by the completion tokens of the whole
step (all ranks).

Run directory: args.json, metrics.jsonl (one JSON object per logged step / eval), ckpt/step_XXXXXX/
(model.safetensors, config.json, tokenizer.json, train_state.pt) and `latest`, the name of the newest
complete checkpoint, replaced atomically. The last stdout line is one JSON object.
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data.countdown import (EOS, PAD, TOKENIZER_PATH, answer_ids, augment, load_split, load_tokenizer, prompt_ids,
                            prompt_text)
from eval_countdown import countdown_eval, summarize
from losses import (LOSSES, divergence_loss, hybrid_uld_loss, per_token_divergence, sampled_token_loss,
                    span_sampled_token_loss)
from model import (GPT, CheckpointError, GPTConfig, load_config, load_pretrained, load_tokenizer_for, num_params,
                   resolve_checkpoint, save_pretrained)
from rollout import generate, left_pad, pack
from teacher import (check_same_tokenizer, cross_tokenizer_batch, load_teacher, score, shared_vocab, span_logprobs,
                     token_logprobs)

ROOT = os.path.dirname(os.path.abspath(__file__))


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
    if args.lr <= 0 or not 0 <= args.min_lr_frac <= 1 or args.warmup < 0 or args.eval_every < 0:
        p.error("need --lr > 0, 0 <= --min-lr-frac <= 1, --warmup >= 0, --eval-every >= 0")
    if not 0 <= args.lmbda <= 1:
        p.error(f"--lmbda must be in [0, 1], got {args.lmbda}")
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
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def all_sum(x, device):
    t = torch.tensor(float(x), device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()

# ------------------------------------------------------------------------------------------ checkpoints

def full_state(model, optimizer):
    """Full (unsharded, CPU) model and optimizer state dicts; complete on rank 0."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def save_checkpoint(args, model, optimizer, step, rank, minutes_s=0.0):
    msd, osd = full_state(model, optimizer)  # collective: every rank takes part
    if rank == 0:
        name = f"step_{step:06d}"
        ckdir = os.path.join(args.out, "ckpt")
        save_pretrained(msd, model.cfg, os.path.join(ckdir, name), args.tokenizer,
                        extra={"train_state.pt": {"optimizer": osd, "step": step, "train_seconds": minutes_s,
                                                  "args": vars(args)}})
        tmp = os.path.join(args.out, "latest.tmp")
        with open(tmp, "w") as f:
            f.write(name)
        os.replace(tmp, os.path.join(args.out, "latest"))  # atomic: `latest` always names a whole checkpoint
        old = sorted(d for d in os.listdir(ckdir) if d.startswith("step_") and d[5:].isdigit())
        for d in old[:-args.keep]:
            shutil.rmtree(os.path.join(ckdir, d), ignore_errors=True)
    dist.barrier()


def load_checkpoint(args, model, optimizer):
    """Restore weights and optimizer from OUT/latest; returns (step to continue from, training seconds)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    with open(os.path.join(args.out, "latest")) as f:
        path = os.path.join(args.out, "ckpt", f.read().strip())
    msd = load_file(os.path.join(path, "model.safetensors"))
    state = torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", weights_only=False)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, msd, options=opts)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
    return state["step"], state.get("train_seconds", 0.0)

# ---------------------------------------------------------------------------------------------- helpers

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


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def step_problems(problems, step, args):
    """Step `step`'s global batch of problems, drawn by a generator seeded with (seed, step): the same for
    any number of processes, and after a resume."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    idx = torch.randint(len(problems), (args.batch_size,), generator=g).tolist()
    probs = [problems[i] for i in idx]
    if args.augment:
        rng = random.Random(args.seed * 1_000_003 + step)
        probs = [augment(p, rng) for p in probs]
    return probs


def split_rows(probs, n_on, spp):
    """The step's global rows: n_on on-policy rows (n_on / spp problems, each spp times in a row), then
    the off-policy rows (the next batch - n_on problems). Returns (on-policy problems, off-policy problems)."""
    n_prompts = n_on // spp
    return [p for p in probs[:n_prompts] for _ in range(spp)], probs[n_prompts:n_prompts + len(probs) - n_on]


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


def cross_tokenizer_loss(s_logits, t_logits, tgt, cb, shared, args, n_tok):
    """The loss across tokenizers (teacher.cross_tokenizer_batch aligned the rows into spans).

    sampled: the span-level sampled estimator on every completion token. fkl / rkl / jsd: on spans of one
    token on each side, the divergence over the shared vocabulary + ULD on the rest (losses.hybrid_uld_loss);
    on the other spans, which have no token-level distribution to compare, the span-level sampled estimator.
    Returns (loss, student span logprobs, teacher span logprobs) [B, S]."""
    s_lp = token_logprobs(s_logits, tgt)
    t_lp = token_logprobs(t_logits, cb.teacher.tokens[:, 1:])
    s_span_lp, t_span_lp = span_logprobs(s_lp, t_lp, cb)
    if args.loss == "sampled":  # one optimizer step per rollout, so p_old is the current student
        loss = span_sampled_token_loss(s_lp, s_lp.detach(), t_span_lp, cb.s_span, n_tok)
    else:
        rows, s_cols, t_cols = cb.pairs
        loss = span_sampled_token_loss(s_lp, s_lp.detach(), t_span_lp, cb.s_span, n_tok, mask=~cb.one_to_one)
        if rows.numel():
            loss = loss + hybrid_uld_loss(s_logits[rows, s_cols], t_logits[rows, t_cols], *shared, n_tok, args.loss,
                                          args.beta, args.loss_temperature, args.uld_weight, args.chunk_size)
    return loss, s_span_lp.detach(), t_span_lp


def evaluate(model, tok, problems, rank, world, device):
    """Greedy accuracy on `problems`, each rank decoding its share."""
    mine = problems[rank::world]
    with torch.no_grad():
        model.set_reshard_after_forward(False)  # decode without re-gathering every block each token
        rows = countdown_eval(model, tok, mine, batch_size=512)
        model.set_reshard_after_forward(True)
    s = summarize(rows)
    n = all_sum(s["n"], device)
    return {k: all_sum(s[k] * s["n"], device) / n for k in ("accuracy", "format_valid", "mean_tokens")}

# ------------------------------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    distill = args.stage == "distill"
    # -- validate everything before touching the run directory or starting a process group
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0 and os.path.isfile(os.path.join(args.out, "latest")):
        args.resume = True  # torchrun --max-restarts restarted this job: continue from the latest checkpoint
    cross, t_tok = False, None
    try:
        if args.resume:
            latest = os.path.join(args.out, "latest")
            if not os.path.isfile(latest):
                raise CheckpointError(f"--resume: {latest} does not exist")
            with open(latest) as f:
                init_path = os.path.join(args.out, "ckpt", f.read().strip())
        elif os.path.exists(os.path.join(args.out, "latest")):
            raise CheckpointError(f"{args.out} already holds a run; pass --resume to continue it or choose another --out")
        else:
            init_path = resolve_checkpoint(args.student) if args.student else None
        if init_path:
            cfg, tok = load_config(init_path), load_tokenizer_for(init_path, args.tokenizer)
            args.tokenizer = os.path.join(init_path, "tokenizer.json") if os.path.isfile(
                os.path.join(init_path, "tokenizer.json")) else args.tokenizer
        else:
            tok = load_tokenizer(args.tokenizer)
            cfg = GPTConfig(vocab_size=tok.get_vocab_size(), n_layer=args.n_layer, n_head=args.n_head,
                            d_model=args.d_model, d_mlp=args.d_mlp)
        if distill:
            teacher_path = resolve_checkpoint(args.teacher)
            t_tok = load_tokenizer_for(teacher_path, args.tokenizer)
            same = tok.get_vocab() == t_tok.get_vocab()
            if args.cross_tokenizer == "off" or (same and args.cross_tokenizer == "auto"):
                check_same_tokenizer(tok, t_tok)
            cross = args.cross_tokenizer == "on" or not same
            if cross and args.seq_kd:
                raise ValueError("--seq-kd with a cross-tokenizer teacher is not supported (its samples are in "
                                 "the teacher's tokens)")
            check_context(tok, t_tok if cross else tok, cfg, load_config(teacher_path), args.max_new_tokens)
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
    # on-policy rows of the step: exactly lambda of every batch, the same share on every rank (SFT: none)
    n_on = round(args.lmbda * args.batch_size) if distill else 0
    if n_on % args.samples_per_prompt or n_on % world:
        fail(f"--lmbda * --batch-size = {n_on} on-policy rows is not a multiple of --samples-per-prompt "
             f"{args.samples_per_prompt} and of the {world} processes")
    torch.manual_seed(args.seed)  # same initial weights on every rank and for every world size
    model = GPT(cfg)
    if init_path and not args.resume:
        model.load_state_dict(load_pretrained(init_path).state_dict())
    model = shard(model.to(device), device)
    teacher = shard(load_teacher(teacher_path)[0].to(device), device) if distill else None
    shared = shared_vocab(tok, t_tok, device) if distill and cross else None
    if rank == 0 and cross and args.loss != "sampled":
        print(f"warning: --loss {args.loss} across tokenizers is the GOLD hybrid (shared token strings + ULD); it "
              "collapsed a number-level student under a char-level teacher on Countdown (README); --loss sampled "
              "is exact on spans", file=sys.stderr)
    if rank == 0:
        print(f"student: {num_params(model) / 1e6:.3f}M params {cfg}" +
              (f"\nteacher: {num_params(teacher) / 1e6:.3f}M params {teacher.cfg}" if distill else ""))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")
    start, t_train = load_checkpoint(args, model, optimizer) if args.resume else (0, 0.0)
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
    pad, eos, autocast = tok.token_to_id(PAD), tok.token_to_id(EOS), device.type == "cuda"
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
        # 1. the step's global rows (the first n_on on-policy, the rest off-policy); rank r takes r::world
        on_rows, off_rows = split_rows(step_problems(train, step, args), n_on, args.samples_per_prompt)
        on_mine, off_mine = on_rows[rank::world], off_rows[rank::world]
        on_prompts = [prompt_ids(tok, n, t) for n, t, _ in on_mine]
        off_prompts = [prompt_ids(tok, n, t) for n, t, _ in off_mine]
        # 2. completions: on-policy rows sampled by the student, the rest ground truth (or teacher samples)
        t_roll = time.time()
        completions = sample(model, on_prompts, args, step, 0, rank, world, pad, eos) if on_prompts else []
        if args.seq_kd and off_prompts:
            completions += sample(teacher, off_prompts, args, step, 1, rank, world, pad, eos)
        else:
            completions += [answer_ids(tok, a) for _, _, a in off_mine]
        prompts = on_prompts + off_prompts
        t_roll = time.time() - t_roll
        batch = pack(prompts, completions, pad, device)
        # the losses read only predictions of completion tokens: columns c.. (c = the prompt length; the
        # cross-tokenizer spans index the whole layout, so there c = 1)
        c = 1 if distill and cross else batch.prompt_len
        tgt, m = batch.tokens[:, c:], batch.mask[:, c:]
        n_tok = all_sum(m.sum().item(), device)  # completion tokens of the whole step, all ranks
        # 3. the frozen teacher scores every token in one forward pass (across tokenizers: the same text in
        #    its own tokens, aligned with the student's into spans)
        if distill and cross:
            try:
                cb = cross_tokenizer_batch(batch, on_mine + off_mine, tok, t_tok, teacher.cfg.max_seq_len)
            except ValueError as e:  # text the teacher's tokenizer cannot reproduce: stop, never misalign
                fail(f"step {step + 1}: {e}; the last good checkpoint is {args.out}/latest")
            t_logits = score(teacher, cb.teacher, autocast)
        else:
            t_logits = score(teacher, batch, autocast, c) if distill else None
        # 4. the student forward with grad
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            s_logits = model(batch.tokens, batch.pos, batch.valid, out_from=c - 1)[:, :-1].float()
        # 5. the loss: summed over the step's completion tokens / their count (FSDP averages over ranks)
        if not distill:
            ce = F.cross_entropy(s_logits.flatten(0, 1), tgt.flatten(), reduction="none")
            loss = (ce * m.flatten()).sum() / n_tok
        elif cross:
            loss, s_span_lp, t_span_lp = cross_tokenizer_loss(s_logits, t_logits, tgt, cb, shared, args, n_tok)
        elif args.loss == "sampled":  # one optimizer step per rollout, so p_old is the current student
            s_lp = token_logprobs(s_logits, tgt)
            loss = sampled_token_loss(s_lp, s_lp.detach(), token_logprobs(t_logits, tgt), m, n_tok)
        else:
            loss = divergence_loss(s_logits, t_logits, m, args.loss, n_tok, args.beta, args.loss_temperature,
                                   args.chunk_size)
        (loss * world).backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_val = all_sum(loss.item(), device)
        if not math.isfinite(loss_val):
            bar.close()
            fail(f"loss is {loss_val} at step {step + 1}; stopping. The last good checkpoint is {args.out}/latest")
        dt = time.time() - t0
        t_train += dt
        last = dict(step=step + 1, loss=round(loss_val, 5), lr=lr_at(step, args), grad_norm=round(float(gnorm), 4),
                    tokens_per_s=round(all_sum(batch.valid.sum().item(), device) / dt), minutes=round(t_train / 60, 3))
        if distill:  # what the student does on its own samples
            k, on_m = len(on_prompts), m[:len(on_prompts)]
            with torch.no_grad():
                if cross:  # sequence-level: sum over the rows' spans of log p_S - log p_T (a sample estimate)
                    rkl = (s_span_lp[:k] - t_span_lp[:k]).sum()
                else:  # exact per-token KL(p_S || p_T) over the full vocabulary
                    rkl = per_token_divergence(s_logits[:k][on_m], t_logits[:k][on_m], "rkl").sum()
            n_on_tok = all_sum(on_m.sum().item(), device)
            last |= dict(on_policy_frac=all_sum(k, device) / args.batch_size,
                         student_rkl=round(all_sum(rkl.item(), device) / n_on_tok, 5) if n_on_tok else None,
                         completion_len=round(all_sum(m.sum().item(), device) / args.batch_size, 3),
                         rollout_s=round(t_roll, 3))
            if cross:  # share of completion tokens in spans of one token on each side
                last["one_to_one_frac"] = round(all_sum(cb.one_to_one.sum().item(), device) / n_tok, 4)
        log(last)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.4f}")
        # --max-minutes on the ranks' mean training time, so every rank stops at the same step
        out_of_time = args.max_minutes and all_sum(t_train, device) / world / 60 >= args.max_minutes
        done = step + 1 == args.steps or bool(out_of_time)
        if (args.eval_every and (step + 1) % args.eval_every == 0) or done:
            ev = evaluate(model, tok, val, rank, world, device)
            last |= {f"val_{k}": round(v, 4) for k, v in ev.items()}
            log(dict(step=step + 1, **{f"val_{k}": v for k, v in ev.items()}))
            if rank == 0:
                bar.write(f"step {step + 1}: loss {loss_val:.4f} val accuracy {ev['accuracy']:.3f} "
                          f"format-valid {ev['format_valid']:.3f} ({t_train / 60:.1f} min)")
        if (step + 1) % args.save_every == 0 or done:
            save_checkpoint(args, model, optimizer, step + 1, rank, t_train)
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


def rollout_seed(seed, step, stream):
    return (seed * 1_000_003 + step) * 2 + stream


def sample(model, prompts, args, step, stream, rank, world, pad, eos):
    """Completions (id lists, up to and including EOS) sampled from `model` for this rank's rows r::world
    of the step's global rows of this stream (0: the student's on-policy rows, 1: the teacher's seq-KD
    rows). Seeded by (seed, step, stream) on every rank, so N processes sample what one process does."""
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(rollout_seed(args.seed, step, stream))
    ids, valid = left_pad(prompts, pad, device)
    n_rows = len(prompts) * world  # every rank holds the same number of this stream's rows
    model.set_reshard_after_forward(False)  # decode without re-gathering every block each token
    batch = generate(model, ids, valid, args.max_new_tokens, eos, pad, temperature=args.temperature,
                     top_k=args.top_k or None, generator=g, rows=range(rank, n_rows, world), n_rows=n_rows)
    model.set_reshard_after_forward(True)
    return batch.completions()


if __name__ == "__main__":
    main()
    # A finished run has nothing left to do: metrics flushed, checkpoints fsynced, the process group
    # destroyed. Skip the interpreter's teardown, where gloo's C++ threads can still abort a finished
    # multi-process run with "terminate called without an active exception" (SIGABRT with no Python frame
    # left on the stack: in 5 of about 320 looped 2-process runs here, torch 2.13 CPU).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

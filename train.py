"""Training: supervised fine-tuning on Countdown (the teacher and the student warm start).

    python train.py --stage sft --out runs/sft                      # a small model in minutes on CPU
    torchrun --standalone --nproc_per_node=2 train.py --stage sft --out runs/sft2
    python train.py --stage sft --out runs/sft --resume             # continue from runs/sft/latest

One code path for 1 and N processes: the model is sharded with FSDP2 (fully_shard per block, then the
root) over gloo on CPU or nccl on CUDA, also when there is a single process. The global batch does not
depend on the number of processes: each step's problems are drawn by a generator seeded with (seed,
step), and rank r takes rows r::world. The loss is summed over the answer tokens of the whole step (all
ranks) and divided by their count.

Run directory: args.json, metrics.jsonl (one JSON object per logged step / eval), ckpt/step_XXXXXX/
(model.safetensors, config.json, tokenizer.json, train_state.pt) and `latest`, the name of the newest
complete checkpoint, replaced atomically. The last stdout line is one JSON object.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data.countdown import EOS, PAD, TOKENIZER_PATH, answer_ids, load_split, load_tokenizer, prompt_ids
from eval_countdown import countdown_eval, summarize
from model import GPT, CheckpointError, GPTConfig, load_config, num_params, save_pretrained
from rollout import pack


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SFT on Countdown (on-policy distillation comes next)")
    p.add_argument("--stage", default="sft", choices=["sft"])
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    # model
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-mlp", type=int, default=0, help="0 = 4 * d-model")
    # optimisation
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256, help="global batch (rows per optimizer step)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    # eval, logging, checkpoints
    p.add_argument("--eval-every", type=int, default=250, help="greedy val accuracy every N steps (0 = only at end)")
    p.add_argument("--eval-n", type=int, default=0, help="val problems to evaluate (0 = all)")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    p.add_argument("--max-minutes", type=float, default=0, help="stop (and save) after this much training time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tokenizer", default=TOKENIZER_PATH)
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "n_layer", "n_head", "d_model", "save_every", "keep"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or not 0 <= args.min_lr_frac <= 1 or args.warmup < 0 or args.eval_every < 0:
        p.error("need --lr > 0, 0 <= --min-lr-frac <= 1, --warmup >= 0, --eval-every >= 0")
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


def save_checkpoint(args, model, optimizer, step, rank):
    msd, osd = full_state(model, optimizer)  # collective: every rank takes part
    if rank == 0:
        name = f"step_{step:06d}"
        ckdir = os.path.join(args.out, "ckpt")
        save_pretrained(msd, model.cfg, os.path.join(ckdir, name), args.tokenizer,
                        extra={"train_state.pt": {"optimizer": osd, "step": step, "args": vars(args)}})
        tmp = os.path.join(args.out, "latest.tmp")
        with open(tmp, "w") as f:
            f.write(name)
        os.replace(tmp, os.path.join(args.out, "latest"))  # atomic: `latest` always names a whole checkpoint
        old = sorted(d for d in os.listdir(ckdir) if d.startswith("step_") and d[5:].isdigit())
        for d in old[:-args.keep]:
            shutil.rmtree(os.path.join(ckdir, d), ignore_errors=True)
    dist.barrier()


def load_checkpoint(args, model, optimizer):
    """Restore weights and optimizer from OUT/latest; returns the step to continue from."""
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
    return state["step"]

# ---------------------------------------------------------------------------------------------- helpers

def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def step_problems(problems, step, args, rank, world):
    """This rank's share of step `step`'s global batch: the same for any number of processes."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    idx = torch.randint(len(problems), (args.batch_size,), generator=g).tolist()
    return [problems[i] for i in idx[rank::world]]


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
    # -- validate everything that can be validated before touching the run directory or any process group
    try:
        tok = load_tokenizer(args.tokenizer)
    except ValueError as e:
        fail(str(e))
    latest = os.path.join(args.out, "latest")
    if args.resume:
        if not os.path.isfile(latest):
            fail(f"--resume: {latest} does not exist")
        try:
            with open(latest) as f:
                cfg = load_config(os.path.join(args.out, "ckpt", f.read().strip()))
        except CheckpointError as e:
            fail(f"--resume: {e}")
    else:
        if os.path.exists(latest):
            fail(f"{args.out} already holds a run; pass --resume to continue it or choose another --out")
        cfg = GPTConfig(vocab_size=tok.get_vocab_size(), n_layer=args.n_layer, n_head=args.n_head,
                        d_model=args.d_model, d_mlp=args.d_mlp)
    if cfg.vocab_size != tok.get_vocab_size():
        fail(f"tokenizer vocab {tok.get_vocab_size()} != checkpoint vocab {cfg.vocab_size}")
    try:
        os.makedirs(os.path.join(args.out, "ckpt"), exist_ok=True)
        probe = os.path.join(args.out, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"cannot write to run directory {args.out}: {e.strerror}")

    rank, world, device = setup_dist(args.device)
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    torch.manual_seed(args.seed)  # same initial weights on every rank and for every world size
    model = GPT(cfg)
    if rank == 0:
        print(f"model: {num_params(model) / 1e6:.3f}M params {cfg}")
    model = shard(model.to(device), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")
    start = load_checkpoint(args, model, optimizer) if args.resume else 0
    if rank == 0:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args) | {"world_size": world}, f, indent=1)
    metrics = open(os.path.join(args.out, "metrics.jsonl"), "a") if rank == 0 else None

    def log(rec):
        if metrics:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()

    train, val = load_split("train"), load_split("val")
    val = val[:args.eval_n] if args.eval_n else val
    pad, autocast = tok.token_to_id(PAD), device.type == "cuda"
    bar = tqdm(total=args.steps, initial=start, disable=rank != 0, dynamic_ncols=True)
    t_train, last, step = 0.0, {}, start
    for step in range(start, args.steps):
        t0 = time.time()
        # -- SFT: cross-entropy on the answer tokens (incl. the EOS), normalised over the whole step
        probs = step_problems(train, step, args, rank, world)
        batch = pack([prompt_ids(tok, n, t) for n, t, _ in probs], [answer_ids(tok, a) for _, _, a in probs],
                     pad, device)
        tgt, m = batch.tokens[:, 1:], batch.mask[:, 1:]
        n_tok = all_sum(m.sum().item(), device)
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            logits = model(batch.tokens, batch.pos, batch.valid)
        ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tgt.flatten(), reduction="none")
        loss = (ce * m.flatten()).sum() * world / n_tok  # FSDP averages over ranks: this makes it sum / n_tok
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_val = all_sum(loss.item() / world, device)
        if not math.isfinite(loss_val):
            fail(f"loss is {loss_val} at step {step}; the last good checkpoint is {args.out}/latest")
        dt = time.time() - t0
        t_train += dt
        last = dict(step=step + 1, loss=round(loss_val, 5), lr=lr_at(step, args), grad_norm=round(float(gnorm), 4),
                    tokens_per_s=round(all_sum(batch.valid.sum().item(), device) / dt), minutes=round(t_train / 60, 3))
        log(last)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.4f}")
        done = step + 1 == args.steps or (args.max_minutes and t_train / 60 >= args.max_minutes)
        if (args.eval_every and (step + 1) % args.eval_every == 0) or done:
            ev = evaluate(model, tok, val, rank, world, device)
            last |= {f"val_{k}": round(v, 4) for k, v in ev.items()}
            log(dict(step=step + 1, **{f"val_{k}": v for k, v in ev.items()}))
            if rank == 0:
                bar.write(f"step {step + 1}: loss {loss_val:.4f} val accuracy {ev['accuracy']:.3f} "
                          f"format-valid {ev['format_valid']:.3f} ({t_train / 60:.1f} min)")
        if (step + 1) % args.save_every == 0 or done:
            save_checkpoint(args, model, optimizer, step + 1, rank)
        if done:
            break
    bar.close()
    if rank == 0:
        print(json.dumps(dict(out=args.out, **last)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Training: on-policy distillation (the main job), supervised fine-tuning and RL on Countdown.

    python train.py --stage distill                                 # shipped teacher -> shipped student
    python train.py --stage distill --lmbda 0.5 --loss jsd --beta 0.5 --seed 1 --out runs/jsd-l0.5-s1
    torchrun --standalone --nproc_per_node=2 train.py --stage distill --out runs/d2
    python train.py --stage sft --out runs/sft                      # a small model in minutes on CPU
    python train.py --stage sft --out runs/sft --resume             # continue from runs/sft/latest
    python train.py --stage rl --samples-per-prompt 8 --lr 2e-5     # policy gradient on the verifier's reward

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
warm start). RL is the same step with every row on-policy, no teacher, and the policy gradient of the
sampled estimator with the verifier's reward advantage in place of the teacher's log-ratio (losses.py);
--reward-weight adds that advantage to --loss sampled's: distillation plus reward.

Variations on the rows and the student: --rollout skd lets the teacher correct the student's samples as
they are drawn (speculative KD); --sft-mix mixes another task's ground truth into a distillation run (the
continual-learning recipe, with --task for SFT on that task); --lora-rank trains low-rank adapters
(lora.py) instead of all the student's weights, saved merged; --compile decodes with a compiled step.

Every step logs its FLOPs (flops.py, from the shapes it ran), so that all of them can be drawn on one
compute axis. Each model's Countdown format comes with its checkpoint (chat.py, data/countdown.py): this
codebase's char models read "3 7 13>88:" and answer a step list; a chat model reads its chat template and
answers <answer>expression</answer> + its end-of-turn token (give it --max-new-tokens 64-256).

One code path for 1 and N processes: the models are sharded with FSDP2 (distributed.py) over gloo on CPU
or nccl on CUDA, also when there is a single process. The global batch does not
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
import resource
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

from chat import load_chat
from checkpoint import (CheckpointError, latest_checkpoint, load_config, load_pretrained, load_train_state,
                        resolve_checkpoint, restore, save_checkpoint, side_files)
from crosstok import cross_tokenizer_batch, cross_tokenizer_loss, shared_vocab
from data import arith
from data.countdown import TOKENIZER_PATH, CharFormat, augment, countdown_format, load_split
from distributed import all_sum, any_rank, compute_dtype, decoding, full_parameters, setup_dist, shard
from eval_countdown import countdown_eval, summarize
from flops import flops_fused_loss, flops_generate, flops_score, flops_train
from lora import add_lora, merge, scale_of, trainable_params
from losses import (LOSSES, distill_advantage, head_divergence_loss, head_divergence_sum, head_token_logprobs,
                    policy_gradient_loss, reward_advantage)
from model import GPT, GPTConfig, GradKV, distinct_rows, keep_layers, num_params, prefill
from rollout import generate, left_pad, pack
from teacher import check_same_tokenizer, head_weight, hidden, load_teacher, score

ROOT = os.path.dirname(os.path.abspath(__file__))


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
                   "and sft --seq-kd)")
    g.add_argument("--keep-layers", default=None, metavar="START:STOP:STEP", help="start the student from these "
                   "blocks of --student only (a Python slice, e.g. 0::3: every third layer of a teacher copy)")
    g.add_argument("--n-layer", type=int, default=4)
    g.add_argument("--n-head", type=int, default=4)
    g.add_argument("--d-model", type=int, default=128)
    g.add_argument("--d-mlp", type=int, default=0, help="0 = 4 * d-model")
    g.add_argument("--lora-rank", type=int, default=None, help="train rank-r adapters on the student's attention "
                   "and MLP linears, everything else frozen (lora.py; default: full fine-tuning); checkpoints are "
                   "saved merged, as plain weights")
    g.add_argument("--lora-alpha", type=float, default=None, help="the adapters' update is scaled by alpha / rank "
                   "(default 2 * rank: a scale of 2 at every rank)")
    g = p.add_argument_group("the rows of a batch")
    g.add_argument("--lmbda", type=float, default=1.0, help="fraction of each batch's rows sampled by the student")
    g.add_argument("--samples-per-prompt", type=int, default=1, help="student samples per on-policy prompt")
    g.add_argument("--seq-kd", action="store_true", help="off-policy rows are teacher samples, not ground truth "
                   "(with --stage sft: SFT on teacher samples)")
    g.add_argument("--task", default="countdown", choices=["countdown", "arith"], help="the rows' task (arith: "
                   "data/arith.py, the continual-learning recipe's new task; SFT only)")
    g.add_argument("--sft-mix", default=None, choices=["arith"], help="distill: the off-policy rows are this task's "
                   "ground truth, learnt by cross-entropy, while the on-policy rows are distilled (docs/continual.md)")
    g.add_argument("--augment", action="store_true", help="sft: shuffle each prompt's numbers and pick a random "
                   "valid solution (fights memorising the small problem universe)")
    g = p.add_argument_group("rollouts")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of rollouts")
    g.add_argument("--top-k", type=int, default=0, help="sample from the top k tokens (0 = all)")
    g.add_argument("--max-new-tokens", type=int, default=24, help="rollout budget in tokens (eval: at least 24); a "
                   "chat model's <answer> needs more: 64-256")
    g.add_argument("--rollout", default="student", choices=["student", "skd"], help="on-policy rows: the student "
                   "samples (student), or speculative KD: the teacher keeps each student token that is in its "
                   "top --skd-top-k and replaces the others by its own (skd)")
    g.add_argument("--skd-top-k", type=int, default=5, help="--rollout skd: the teacher's top k (vocabulary = "
                   "plain on-policy sampling, 1 = the teacher's greedy tokens)")
    g.add_argument("--compile", action="store_true", help="rollouts decode with a compiled one-token step over a "
                   "static KV cache (torch.compile; CUDA graphs on GPU); the first rollout pays the compile")
    g = p.add_argument_group("the loss")
    g.add_argument("--loss", default="rkl", choices=LOSSES)
    g.add_argument("--beta", type=float, default=0.5, help="jsd interpolation, in (0, 1)")
    g.add_argument("--loss-temperature", type=float, default=1.0, help="softmax temperature inside the divergence")
    g.add_argument("--cross-tokenizer", default="auto", choices=["auto", "on", "off"],
                   help="span-aligned losses for a teacher with another tokenizer (auto: when the vocabularies "
                   "differ; off: refuse such a teacher)")
    g.add_argument("--uld-weight", type=float, default=1.0, help="cross-tokenizer fkl/rkl/jsd: weight of the ULD "
                   "term on the tokens the two vocabularies do not share")
    g.add_argument("--adv-norm", default="mean", choices=["mean", "std", "none"], help="the reward's advantage: "
                   "mean = reward - its prompt's group mean; std = that / the group std (GRPO); none = the reward")
    g.add_argument("--reward-weight", type=float, default=0.0, help="distill with --loss sampled: advantage = "
                   "log p_T - log p_S + this * the reward's advantage (distillation plus reward)")
    g.add_argument("--chunk-size", type=int, default=0, help="positions per chunk in the losses and metrics "
                   "(0 = as many as fit 2^22 logits: one chunk for the char vocabulary)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None, help="default: sft 1000, distill 800")
    g.add_argument("--batch-size", type=int, default=None, help="global rows per optimizer step (sft 256, distill 64)")
    g.add_argument("--lr", type=float, default=None, help="default: sft 2e-3, distill 2e-4")
    g.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine decays to lr * this")
    g.add_argument("--warmup", type=int, default=None, help="default: sft 100, distill 20")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
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
    sft, rl = args.stage == "sft", args.stage == "rl"
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
    if not 0 <= args.lmbda <= 1:
        p.error(f"--lmbda must be in [0, 1], got {args.lmbda}")
    n_on = args.lmbda * args.batch_size
    if args.stage == "distill" and abs(n_on - round(n_on)) > 1e-9:  # so the on-policy fraction is lambda in every batch
        lo, hi = math.floor(n_on), math.ceil(n_on)
        p.error(f"--lmbda {args.lmbda} x --batch-size {args.batch_size} = {n_on:g} rows is not a whole number; "
                f"use --lmbda {lo / args.batch_size:g} ({lo} rows) or {hi / args.batch_size:g} ({hi})")
    if args.loss == "sampled" and args.stage == "distill" and args.lmbda != 1:
        p.error("--loss sampled needs --lmbda 1: its p_old is the distribution the student sampled from, and "
                "off-policy rows were not sampled by the student")
    if args.loss == "jsd" and not 0 < args.beta < 1:
        p.error(f"--beta must be in (0, 1) for jsd, got {args.beta} (the GKD JSD vanishes at 0 and 1)")
    if args.temperature < 0 or args.loss_temperature <= 0 or args.top_k < 0:
        p.error("need --temperature >= 0, --loss-temperature > 0, --top-k >= 0")
    if (args.loss == "sampled" or rl) and (args.temperature != 1 or args.top_k):
        p.error(f"--{'stage rl' if rl else 'loss sampled'} needs the student's own distribution: --temperature 1 "
                "and no --top-k")
    if args.reward_weight < 0:
        p.error(f"--reward-weight must be >= 0, got {args.reward_weight}")
    if args.reward_weight and (args.stage != "distill" or args.loss != "sampled"):
        p.error("--reward-weight needs --stage distill --loss sampled: it adds to that loss's per-token advantage")
    if (rl or args.reward_weight) and args.adv_norm != "none" and args.samples_per_prompt < 2:
        p.error(f"--adv-norm {args.adv_norm} compares a prompt's samples: it needs --samples-per-prompt >= 2 "
                "(or --adv-norm none)")
    if args.rollout == "skd" and (args.stage != "distill" or args.loss == "sampled"):
        p.error("--rollout skd needs --stage distill and a full-vocabulary loss (fkl, rkl, jsd): the sampled "
                "estimator's p_old is the student's distribution, and a teacher-corrected token was not drawn from it")
    if args.rollout == "skd" and args.skd_top_k < 1:
        p.error(f"--skd-top-k must be >= 1, got {args.skd_top_k}")
    if args.task != "countdown" and (args.stage != "sft" or args.seq_kd or args.augment):
        p.error(f"--task {args.task} trains by SFT on its ground truth: it needs --stage sft, without --seq-kd "
                "and --augment")
    if args.sft_mix and (args.stage != "distill" or args.lmbda == 1 or args.loss == "sampled" or args.seq_kd):
        p.error("--sft-mix needs --stage distill, --lmbda < 1 (its rows are the off-policy ones), no --seq-kd "
                "and a full-vocabulary loss")
    if args.d_model % args.n_head or (args.d_model // args.n_head) % 2:
        p.error("--d-model must be a multiple of --n-head with an even head size")
    args.d_mlp = args.d_mlp or 4 * args.d_model
    if args.lora_rank is not None and args.lora_rank < 1:
        p.error(f"--lora-rank must be >= 1, got {args.lora_rank} (leave it out for full fine-tuning)")
    if args.lora_alpha is not None and args.lora_rank is None:
        p.error("--lora-alpha needs --lora-rank (without adapters it would do nothing)")
    if args.lora_alpha is not None and not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        p.error(f"--lora-alpha must be a finite number > 0, got {args.lora_alpha}")
    if args.lora_rank and args.student is None:
        p.error("--lora-rank needs a --student to adapt (a fresh model has no base worth freezing)")
    if args.lora_rank and args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_rank



def fail(msg):
    print(f"train.py: error: {msg}", file=sys.stderr)
    sys.exit(2)

# ---------------------------------------------------------------------------------------------- the step

@dataclass
class Run:
    """What every step reads and nothing changes: flags, Countdown formats, process layout."""
    args: argparse.Namespace
    fmt: object                 # the student's Countdown format (data.countdown.countdown_format): tokenizer, prompts
    t_fmt: object               # the teacher's (None for SFT)
    cross: bool                 # the teacher has another tokenizer: span-aligned losses (crosstok.py)
    shared: tuple               # (student ids, teacher ids) of the token strings both vocabularies hold
    rank: int
    world: int
    device: torch.device
    pad: int                    # the student format's pad id
    eos: object                 # the ids a rollout stops at (the student format's eos_ids; an int also does)
    autocast: bool              # bf16 autocast, for unsharded models (bench.py); train.py's sharded models get
                                # bf16 on CUDA from FSDP's policy (shard) and run fp32 on CPU
    share_prompts: bool = True  # one prefill per distinct prompt (rollout and teacher); False to measure it
    t_head: torch.Tensor = None  # the teacher's output head, whole on every rank (teacher.head_weight)
    cache_len: int = None       # --compile: the rollouts' KV cache slots, fixed (the longest prompt + budget)
    mix_fmt: object = None      # --sft-mix: the mixed-in task's format (data.arith.ArithFormat)
    replicas: dict = field(default_factory=dict)  # --compile: id(model) -> its plain copy (decode_replica)

    def sync(self):  # part timings mean something on CUDA only after the queued kernels ran
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class Row:
    prompt: list          # prompt token ids
    answer: list          # ground-truth completion ids (off-policy rows), None for on-policy rows
    on_policy: bool       # the student samples this row's completion
    problem: tuple        # (numbers, target, solution): a cross-tokenizer teacher builds its own prompt


def step_rows(problems, step, args, n_on, fmt, rank, world, mix=None):
    """This rank's rows of step `step`: the global batch is drawn by a generator seeded with (seed, step), its
    first n_on rows on-policy (n_on / spp problems, each spp times in a row), the rest off-policy; rank r
    takes rows r::world (n_on is a multiple of world, so every rank gets the same share of each kind).
    mix: (problems, format) of --sft-mix's task, which the off-policy rows then come from."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    idx = torch.randint(len(problems), (args.batch_size,), generator=g).tolist()
    probs = [problems[i] for i in idx]
    if args.augment:
        rng = random.Random(args.seed * 1_000_003 + step)
        probs = [augment(p, rng) for p in probs]
    n_prompts = n_on // args.samples_per_prompt
    on = [p for p in probs[:n_prompts] for _ in range(args.samples_per_prompt)]
    off, off_fmt = probs[n_prompts:n_prompts + args.batch_size - n_on], fmt
    if mix is not None:
        off, off_fmt = [mix[0][i] for i in torch.randint(len(mix[0]), (len(off),), generator=g).tolist()], mix[1]
    rows = ([Row(fmt.prompt_ids(n, t), None, True, (n, t, a)) for n, t, a in on] +
            [Row(off_fmt.prompt_ids(n, t), off_fmt.answer_ids(a), False, (n, t, a)) for n, t, a in off])
    return rows[rank::world]


def rollout_seed(seed, step, stream):
    return (seed * 1_000_003 + step) * 2 + stream


def sample(model, prompts, run, step, stream, teacher=None):
    """(completions, their logprobs, the FLOPs it took, which tokens were kept proposals or None) as lists,
    sampled from `model` for this rank's share of the step's rows of a stream (0: the student's on-policy
    rows, 1: the teacher's seq-KD rows). Seeded by (seed, step, stream) on every rank and drawn per global
    row, so N processes sample what one does. teacher: speculative KD (--rollout skd), the teacher keeping
    or replacing each of the model's proposals (rollout.speculative_choice), its noise from its own seed."""
    args = run.args
    g = torch.Generator(run.device).manual_seed(rollout_seed(args.seed, step, stream))
    ids, valid = left_pad(prompts, run.pad, run.device)
    n_rows = len(prompts) * run.world  # every rank holds the same number of this stream's rows
    decoder = decode_replica(model, run) if args.compile else model
    skd = {}
    if teacher is not None:
        skd = dict(teacher=decode_replica(teacher, run) if args.compile else teacher, skd_top_k=args.skd_top_k,
                   teacher_generator=torch.Generator(run.device).manual_seed(
                       rollout_seed(args.seed, step, stream) + (1 << 48)))  # no step's stream seed
    with decoding(decoder), decoding(skd.get("teacher")), \
            torch.autocast(run.device.type, torch.bfloat16, enabled=run.autocast):
        batch = generate(decoder, ids, valid, args.max_new_tokens, run.eos, run.pad, temperature=args.temperature,
                         top_k=args.top_k or None, generator=g, rows=range(run.rank, n_rows, run.world),
                         n_rows=n_rows, share_prompts=run.share_prompts, compile=args.compile,
                         cache_len=run.cache_len, **skd)
    P, K = ids.size(1), prefill_rows(ids, valid, run.share_prompts)
    flops = flops_generate(model.cfg, len(ids), P, batch.tokens.size(1) - P, K)
    if teacher is not None:
        flops += flops_generate(teacher.cfg, len(ids), P, batch.tokens.size(1) - P, K)
    kept = batch.completion_values(batch.kept) if teacher is not None else None
    return batch.completions(), batch.completion_logprobs(), flops, kept


def decode_replica(model, run):
    """--compile: a plain, unsharded GPT holding model's current weights in the compute dtype, for the compiled
    decode step (FSDP's hooks do not compile). One per model, kept across steps and refreshed in place while
    the model trains (a frozen teacher's once), so its weights stay at the addresses CUDA graphs replay on.
    Costs a whole copy of the model per rank (and, while refreshing, its fp32 weights gathered whole); FSDP
    holds every block whole while decoding anyway."""
    replica = run.replicas.get(id(model))
    if replica is not None and not any(p.requires_grad for p in model.parameters()):
        return replica
    if replica is None:
        replica = GPT(model.cfg).to(run.device, compute_dtype(run.device)).requires_grad_(False)
        run.replicas[id(model)] = replica
    weights = full_parameters(model)
    if scale_of(model):  # LoRA: the replica decodes with the merged weights, W + (alpha / r) B A
        weights, _ = merge(weights, scale_of(model))
    with torch.no_grad():
        for name, p in replica.named_parameters():
            p.copy_(weights[name])
    return replica


def prefill_rows(ids, valid, share):
    """The rows a prefill runs (rollout.generate, teacher.score): one per distinct prompt when shared."""
    return len(distinct_rows(ids, valid)[0]) if share else len(ids)


def make_batch(step, rows, model, teacher, run, skd=False):
    """(the step's batch, the FLOPs its sampling took): the student's rollouts of the on-policy rows (which
    come first; skd: speculative KD rollouts, the teacher correcting them), then the off-policy rows'
    completions: ground truth, or the teacher's samples with --seq-kd."""
    on, off = [r for r in rows if r.on_policy], [r for r in rows if not r.on_policy]
    completions, logprobs, flops, kept = [], [], 0, None
    if on:
        completions, logprobs, flops, kept = sample(model, [r.prompt for r in on], run, step, 0,
                                                    teacher if skd else None)
    if off and run.args.seq_kd:
        t_completions, _, t_flops, _ = sample(teacher, [r.prompt for r in off], run, step, 1)
        completions, flops = completions + t_completions, flops + t_flops
    else:
        completions += [r.answer for r in off]
    batch = pack([r.prompt for r in on + off], completions, run.pad, run.device,
                 logprobs=logprobs + [None] * len(off), on_policy=[True] * len(on) + [False] * len(off),
                 kept=kept + [None] * len(off) if kept is not None else None)
    return batch, flops


def rewards(batch, rows, run):
    """The Countdown verifier's reward per row [B]: 1 for an on-policy completion that ended (an eos id) and
    reaches the target with every number once, else 0 (data/countdown.py; never eval)."""
    out = []
    for r, comp in zip(rows, batch.completions()):
        if not r.on_policy:  # a given row's answer is no sample of the student's
            out.append(0.0)
            continue
        ended = len(comp) > 0 and comp[-1] in run.fmt.eos_ids
        numbers, target, _ = r.problem
        out.append(float(ended and run.fmt.verify(numbers, target, run.fmt.decode(comp[:-1] if ended else comp))))
    return torch.tensor(out, device=run.device)


def step_reward_advantage(reward, run):
    """This rank's rows' reward advantage (losses.reward_advantage). A prompt's samples are consecutive
    global rows and rank r holds rows r::world, so the step's rewards are gathered first."""
    full = torch.zeros(len(reward) * run.world, device=run.device)
    full[run.rank::run.world] = reward
    dist.all_reduce(full)
    return reward_advantage(full, run.args.samples_per_prompt, run.args.adv_norm)[run.rank::run.world]


def teacher_scores(teacher, batch, rows, step, run):
    """(the teacher's output for the loss, the cross-tokenizer alignment or None). With the student's
    tokenizer, its final hidden states where they predict the completion tokens: the losses make the logits
    from them and run.t_head a chunk of positions at a time. With another, the logits of the same text in the
    teacher's tokens."""
    if not run.cross:
        return score(teacher, batch, run.autocast, batch.prompt_len, run.share_prompts, hidden_states=True), None
    try:
        cb = cross_tokenizer_batch(batch, [r.problem for r in rows], run.fmt.tok, run.t_fmt.tok,
                                   teacher.cfg.max_seq_len, run.t_fmt)
    except ValueError as e:  # text the teacher's tokenizer cannot reproduce: stop, never misalign
        fail(f"step {step + 1}: {e}; the last good checkpoint is {run.args.out}/latest")
    return score(teacher, cb.teacher, run.autocast), cb


def student_forward(model, batch, c, autocast, loss_fn=None, share_prompts=False):
    """The student forward (with grad) where it predicts tokens c.. of the batch (GPT's out_from).
    loss_fn(h, W): a loss from the final-normed hidden states [B, T - c, d] and the head weight, run inside
    the forward (the head fused with the loss, losses.head_*: the logits never exist whole); its result is
    returned. None: the logits [B, T - c, V] in the model's dtype (what the cross-tokenizer losses read).

    share_prompts, when rows share a prompt (--samples-per-prompt > 1) and c is the prompt length: each
    distinct prompt runs once, its keys and values (model.GradKV) are gathered into its rows, and the
    completions run on top; the gradient flows back through the gathered keys and values into the one
    prompt forward. The same loss and gradients as every row's own forward (tested), for 1/k of the
    prompt's compute."""
    P = batch.prompt_len
    with torch.autocast(batch.tokens.device.type, torch.bfloat16, enabled=autocast):
        if loss_fn is not None and share_prompts and c == P > 1:
            groups = distinct_rows(batch.tokens[:, :P], batch.valid[:, :P])
            if any_rank(len(groups[0]) < len(batch.tokens), batch.tokens.device):
                pos, valid = batch.pos, batch.valid
                last, cache = prefill(model, batch.tokens[:, :P], pos[:, :P], valid[:, :P], batch.tokens.size(1),
                                      groups, head=hidden, cache_cls=GradKV)
                return model(batch.tokens[:, P:], pos[:, P:], valid[:, P:], cache,
                             head=lambda h, w: loss_fn(torch.cat([last[:, None], h[:, :-1]], 1), w))
        head = None if loss_fn is None else (lambda h, w: loss_fn(h[:, :-1], w))
        out = model(batch.tokens, batch.pos, batch.valid, out_from=c - 1, head=head)
    return out[:, :-1] if loss_fn is None else out


def distill_loss(h, w, t_h, batch, n_tok, run, reward_adv=None):
    """(the loss, the student's reverse KL to the teacher summed over its own samples' tokens, for the log),
    from the student's hidden states h and head weight w and the teacher's hidden states t_h (its head weight
    is run.t_head).

    The divergence over the full vocabularies, or the sampled estimator (a policy gradient with the
    teacher's log-ratio as advantage and the rollout's logprobs as p_old, plus --reward-weight x the rows'
    reward advantage when given; the teacher gives only log p_T of the sampled tokens, and the logged reverse
    KL is its one-sample estimate)."""
    args, c = run.args, batch.prompt_len
    tgt, m, on = batch.tokens[:, c:], batch.mask[:, c:], batch.on_policy[:, None]
    ce = 0.0
    if args.sft_mix:  # the mixed-in task's rows learn their ground truth; only the on-policy rows distill
        ce = -head_token_logprobs(h, w, tgt, m & ~on, args.chunk_size).sum() / n_tok
        m = m & on
    if args.loss == "sampled":
        s_lp, old_lp = head_token_logprobs(h, w, tgt, m, args.chunk_size), batch.logprobs[:, c:]
        with torch.no_grad():
            t_lp = head_token_logprobs(t_h, run.t_head, tgt, m, args.chunk_size)
        adv = distill_advantage(t_lp, old_lp)
        if reward_adv is not None:
            adv = adv + args.reward_weight * reward_adv[:, None]
        return policy_gradient_loss(s_lp, old_lp, adv, m, n_tok), ((old_lp - t_lp) * (m & on)).sum()
    loss, rkl = head_divergence_loss(h, w, t_h, run.t_head, m, args.loss, n_tok, args.beta, args.loss_temperature,
                                     args.chunk_size, metric=on.expand_as(m))
    return loss + ce, rkl


def cross_distill_loss(s_logits, t_logits, batch, cb, n_tok, run):
    """distill_loss across tokenizers (crosstok.cross_tokenizer_loss) on both models' logits; the reverse
    KL is its sequence-level sample estimate."""
    args = run.args
    loss, s_span_lp, t_span_lp = cross_tokenizer_loss(
        s_logits, t_logits, batch, cb, run.shared, n_tok, args.loss, args.beta, args.loss_temperature,
        args.uld_weight, args.chunk_size)
    return loss, (s_span_lp - t_span_lp)[batch.on_policy].sum()


def rl_loss(h, w, batch, reward_adv, n_tok, chunk_size=0):
    """The policy gradient of distill_loss's sampled estimator with the reward's advantage on every token of
    a row in place of the teacher's log-ratio."""
    c = batch.prompt_len
    m = batch.mask[:, c:]
    s_lp, old_lp = head_token_logprobs(h, w, batch.tokens[:, c:], m, chunk_size), batch.logprobs[:, c:]
    return policy_gradient_loss(s_lp, old_lp, reward_adv[:, None], m, n_tok)


def sft_loss(h, w, batch, n_tok, chunk_size=0):
    """Cross-entropy of the given completions, summed over the step's completion tokens / their count."""
    c = batch.prompt_len
    m = batch.mask[:, c:]
    return -head_token_logprobs(h, w, batch.tokens[:, c:], m, chunk_size).sum() / n_tok


def train_step(step, rows, model, teacher, optimizer, run):
    """One optimizer step on this rank's rows (teacher: None, or only a sampler for sft --seq-kd, unless
    distilling). Returns the step's metrics, summed over ranks, its FLOPs (flops.py) and each part's seconds."""
    args, times = run.args, {}
    t = time.perf_counter()

    def lap(part):
        nonlocal t
        run.sync()
        times[part], t = time.perf_counter() - t, time.perf_counter()

    batch, flops = make_batch(step, rows, model, teacher, run, skd=args.rollout == "skd")
    n_tok = all_sum(batch.mask.sum().item(), run.device)  # completion tokens of the whole step, all ranks
    # the verifier on the student's samples (bench.py's synthetic rows have no problem to verify)
    reward = rewards(batch, rows, run) if batch.on_policy.any() and rows[0].problem else None
    reward_adv = step_reward_advantage(reward, run) if args.stage == "rl" or args.reward_weight else None
    lap("rollout")
    # logits only where a loss reads them: predictions of completion tokens (across tokenizers the spans
    # index the whole layout)
    c = 1 if run.cross else batch.prompt_len
    distill = args.stage == "distill"
    t_out, cb = teacher_scores(teacher, batch, rows, step, run) if distill else (None, None)
    lap("teacher")
    if cb is not None:
        loss, rkl = cross_distill_loss(student_forward(model, batch, c, run.autocast), t_out, batch, cb, n_tok, run)
    else:
        loss_fn = {"sft": lambda h, w: (sft_loss(h, w, batch, n_tok, args.chunk_size), None),
                   "rl": lambda h, w: (rl_loss(h, w, batch, reward_adv, n_tok, args.chunk_size), None),
                   "distill": lambda h, w: distill_loss(h, w, t_out, batch, n_tok, run, reward_adv)}[args.stage]
        loss, rkl = student_forward(model, batch, c, run.autocast, loss_fn, run.share_prompts)
    (loss * run.world).backward()  # FSDP averages gradients over ranks; the loss is already per step token
    lap("student")
    flops += teacher_flops(teacher, batch, cb, run) if distill else 0
    flops += student_flops(model, teacher if distill else None, batch, c, cb, run)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, args)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lap("optimizer")
    n_on = round(all_sum(batch.on_policy.sum().item(), run.device))
    out = dict(loss=all_sum(loss.item(), run.device), lr=lr_at(step, args), grad_norm=float(gnorm),
               tokens=all_sum(batch.valid.sum().item(), run.device), flops=all_sum(flops, run.device),
               samples=n_on, times=times)
    if reward is not None:  # the verifier on the student's own samples
        out["reward"] = all_sum(reward.sum().item(), run.device) / n_on
    if distill:  # what the student does on its own samples
        n_on_tok = all_sum((batch.mask & batch.on_policy[:, None]).sum().item(), run.device)
        out |= dict(on_policy_frac=n_on / args.batch_size,
                    student_rkl=all_sum(rkl.item(), run.device) / n_on_tok if n_on_tok else None,
                    completion_len=n_tok / args.batch_size)
        if batch.kept is not None:  # speculative KD: the share of the student's proposals the teacher kept
            out["skd_accept"] = all_sum(batch.kept.sum().item(), run.device) / n_on_tok if n_on_tok else None
        if cb is not None:  # share of completion tokens in spans of one token on each side
            out["one_to_one_frac"] = all_sum(cb.one_to_one.sum().item(), run.device) / n_tok
    return out


def student_flops(model, teacher, batch, c, cb, run):
    """FLOPs of the student's part: its forward + backward (3x) laid out as teacher.score's forward (prompts
    once per group when shared), then the heads the fused loss runs on the completion tokens (the teacher's
    too: None for SFT and RL); across tokenizers a plain forward + backward with logits everywhere."""
    if cb is not None:
        return flops_train(model.cfg, *batch.tokens.shape, n_out=batch.tokens.size(1))
    share = run.share_prompts and c > 1
    body = 3 * flops_score(model.cfg, len(batch.tokens), c, batch.tokens.size(1),
                           prefill_rows(batch.tokens[:, :c], batch.valid[:, :c], share), head=False)
    return body + flops_fused_loss(model.cfg, teacher.cfg if teacher is not None else None, batch.mask.sum().item(),
                                   teacher_passes=1 if run.args.loss == "sampled" else 2)


def teacher_flops(teacher, batch, cb, run):
    """FLOPs of teacher_scores: teacher.score of the completion region up to the hidden states (prompts
    prefilled once when shared), or across tokenizers a forward of the teacher's whole layout with logits."""
    if cb is not None:
        B, T = cb.teacher.tokens.shape
        return flops_score(teacher.cfg, B, 1, T)
    P = batch.prompt_len
    share = run.share_prompts and P > 1
    return flops_score(teacher.cfg, len(batch.tokens), P, batch.tokens.size(1),
                       prefill_rows(batch.tokens[:, :P], batch.valid[:, :P], share), head=False)


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

# ------------------------------------------------------------------------------------ eval and logging

def evaluate(model, fmt, problems, rank, world, device, max_new_tokens, examples=None):
    """Greedy accuracy on `problems` in the model's format, each rank decoding its share. examples: a list
    that receives this rank's first answers (problem, answer text), to show what the model writes."""
    mine = problems[rank::world]
    with torch.no_grad(), decoding(model):
        rows = countdown_eval(model, fmt, mine, batch_size=512, max_new_tokens=max_new_tokens)
    if examples is not None:
        examples += [(r["prompt"], r["answer"]) for r in rows[:N_EXAMPLES]]
    s = summarize(rows)
    n = all_sum(s["n"], device)
    return {k: all_sum(s[k] * s["n"], device) / n for k in ("accuracy", "format_valid", "mean_tokens")}


N_EXAMPLES = 3  # test answers printed before and after distillation, side by side


def evaluate_rkl(model, teacher, problems, run):
    """The student's mean per-token reverse KL to the teacher, KL(p_S || p_T) over the full vocabularies, on
    its own samples (fixed noise) for held-out prompts: what on-policy distillation lowers. Same-tokenizer
    teachers only (None otherwise)."""
    if run.cross:
        return None
    problems = problems[:len(problems) // run.world * run.world]  # every rank decodes as many rows
    rows = [Row(run.fmt.prompt_ids(n, t), None, True, (n, t, a)) for n, t, a in problems]
    total, count, B = 0.0, 0, run.args.batch_size
    with torch.no_grad():
        for i in range(0, len(rows), B):  # step -1, -2, ...: sampling noise no training step uses
            batch, _ = make_batch(-1 - i // B, rows[i:i + B][run.rank::run.world], model, teacher, run)
            t_h, _ = teacher_scores(teacher, batch, None, -1, run)
            m = batch.mask[:, batch.prompt_len:]
            total += student_forward(model, batch, batch.prompt_len, run.autocast, lambda h, w: head_divergence_sum(
                h, w, t_h, run.t_head, m, "rkl", chunk_size=run.args.chunk_size)).item()
            count += m.sum().item()
    return all_sum(total, run.device) / max(1.0, all_sum(count, run.device))


def optimizer_state_bytes(optimizer):
    """Bytes of this rank's optimizer state (AdamW: two moments per trainable number, and a step count)."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731  an FSDP2 shard
    return sum(local(t).nbytes for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t))


def peak_mem_mb(device):
    """CUDA: the most memory allocated; CPU: the process's peak resident set (only grows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10


def rkl_text(template, value):
    return "" if value is None else template.format(value)


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

TASK_SPLITS = {"countdown": load_split, "arith": arith.load_split}  # task -> split name -> problems


def task_format(task, fmt):
    """The format of a task in a model's text interface, given its Countdown format."""
    if task == "countdown":
        return fmt
    if not isinstance(fmt, CharFormat):
        raise ValueError(f"--task/--sft-mix {task} needs a char-tokenizer model (the Countdown char format), not a "
                         "chat model")
    return arith.ArithFormat(fmt.tok)


def longest_prompt(fmt, task="countdown"):
    """The most tokens any prompt of the task takes in this format."""
    return max(len(p) for split in ("train", "val", "test") for p in fmt.prompts(TASK_SPLITS[task](split)))


def check_context(fmt, t_fmt, cfg, t_cfg, max_new_tokens, task="countdown"):
    """Refuse (ValueError) a --max-new-tokens whose longest rollout would not fit the student's or the
    teacher's context (max_seq_len: a Hugging Face model's max_position_embeddings). Across tokenizers the
    teacher needs at most one token per character of the completion (+ EOS), and a student token is at most
    `chars` characters."""
    tok = fmt.tok
    n = longest_prompt(fmt, task) + max_new_tokens
    # with one tokenizer the teacher scores the student's sequences as they are
    contexts = {"student": cfg.max_seq_len} | ({"teacher": t_cfg.max_seq_len} if t_fmt is fmt else {})
    for who, context in contexts.items():
        if n > context:
            raise ValueError(f"--max-new-tokens {max_new_tokens}: the longest prompt + completion is {n} tokens, "
                             f"over the {who}'s context of {context}")
    if t_fmt is not fmt:
        special = set(tok.get_added_tokens_decoder())
        chars = max(len(t) for t, i in tok.get_vocab().items() if i not in special)
        n = longest_prompt(t_fmt) + max_new_tokens * chars + 1
        if n > t_cfg.max_seq_len:
            raise ValueError(f"--max-new-tokens {max_new_tokens}: a completion of up to {max_new_tokens * chars} "
                             f"characters needs up to {n} teacher tokens with its prompt, over the teacher's "
                             f"context of {t_cfg.max_seq_len}")


def load_models(args):
    """Everything a run reads from disk, checked before a process group starts or the run directory is
    touched: (student, its Countdown format, teacher or None, its format, cross, resume state or None, the
    student's text files: text_files).
    A model's format comes with its checkpoint (chat.load_chat: tokenizer, chat template, eos ids).
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
        cfg = load_config(init_path)
        fmt = countdown_format(load_chat(init_path, args.tokenizer))
        if os.path.isfile(os.path.join(init_path, "tokenizer.json")):
            args.tokenizer = os.path.join(init_path, "tokenizer.json")
        if args.resume:
            student, resume_state = GPT(cfg), load_train_state(init_path)
            check_same_lora(resume_state[1].get("args", {}), args, init_path)
        else:
            student = load_pretrained(init_path).train()
            if args.keep_layers:
                student = keep_layers(student, layer_slice(args.keep_layers, student.cfg.n_layer))
    else:
        fmt = countdown_format(load_chat(None, args.tokenizer))
        student = GPT(GPTConfig(vocab_size=fmt.tok.get_vocab_size(), n_layer=args.n_layer, n_head=args.n_head,
                                d_model=args.d_model, d_mlp=args.d_mlp))
    fmt = task_format(args.task, fmt)
    if args.sft_mix:
        task_format(args.sft_mix, fmt)  # refuses a chat model here, before anything runs
    if args.lora_rank:  # before sharding, so FSDP shards the adapters with their blocks
        add_lora(student, args.lora_rank, args.lora_alpha, args.seed)
    if args.stage == "rl" or (args.stage == "sft" and not args.seq_kd):  # no teacher
        return student, fmt, None, None, False, resume_state, text_files(init_path, args.tokenizer)
    teacher, t_fmt = load_teacher(args.teacher, args.tokenizer)
    same = fmt.tok.get_vocab() == t_fmt.tok.get_vocab()
    if args.cross_tokenizer == "off" or (same and args.cross_tokenizer == "auto"):
        check_same_tokenizer(fmt.tok, t_fmt.tok)
    cross = args.cross_tokenizer == "on" or not same
    if cross and args.seq_kd:
        raise ValueError("--seq-kd with a cross-tokenizer teacher is not supported (its samples are in the "
                         "teacher's tokens)")
    if cross and args.rollout == "skd":
        raise ValueError("--rollout skd needs the teacher's tokenizer: across tokenizers a student token is not "
                         "one of the teacher's, so 'in the teacher's top k' is not defined")
    if args.rollout == "skd" and args.skd_top_k > teacher.cfg.vocab_size:
        raise ValueError(f"--skd-top-k {args.skd_top_k} is above the vocabulary ({teacher.cfg.vocab_size})")
    check_context(fmt, t_fmt if cross else fmt, student.cfg, teacher.cfg, args.max_new_tokens)
    return student, fmt, teacher, t_fmt, cross, resume_state, text_files(init_path, args.tokenizer)


def check_same_lora(saved, args, path):
    """Resume with the adapters the checkpoint was trained with (its training state holds them unmerged)."""
    have, want = (saved.get("lora_rank"), saved.get("lora_alpha")), (args.lora_rank, args.lora_alpha)
    if have != want:
        show = lambda r, a: f"--lora-rank {r} --lora-alpha {a:g}" if r else "no --lora-rank"  # noqa: E731
        raise CheckpointError(f"--resume: {path} was trained with {show(*have)}, not {show(*want)}")


def layer_slice(spec, n_layer):
    """The block indices a START:STOP:STEP slice keeps out of n_layer; ValueError (one line) when malformed."""
    try:
        parts = [int(x) if x.strip() else None for x in spec.split(":")]
        layers = list(range(n_layer))[slice(*parts)] if 1 <= len(parts) <= 3 else []
    except ValueError:
        layers = []
    if not layers:
        raise ValueError(f"--keep-layers {spec!r}: not a START:STOP:STEP slice that keeps some of {n_layer} layers")
    return layers


def text_files(ckpt, tokenizer):
    """What a checkpoint of the student copies to keep its text interface: its tokenizer.json (`tokenizer`
    when the checkpoint `ckpt` has none or is None), then the chat template, tokenizer and generation configs
    beside it."""
    own = os.path.join(ckpt, "tokenizer.json") if ckpt else None
    others = [f for f in side_files(ckpt) if os.path.basename(f) != "tokenizer.json"] if ckpt else []
    return [own if own and os.path.isfile(own) else tokenizer] + others

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
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    n_on = on_policy_rows(args)
    if n_on % args.samples_per_prompt or n_on % world:
        fail(f"--lmbda * --batch-size = {n_on} on-policy rows is not a multiple of --samples-per-prompt "
             f"{args.samples_per_prompt} and of the {world} processes")
    model = shard(student.to(device), device)
    teacher = shard(teacher.to(device), device) if teacher is not None else None
    run = Run(args, fmt, t_fmt, cross, shared_vocab(fmt.tok, t_fmt.tok, device) if cross else None, rank, world,
              device, fmt.pad_id, fmt.eos_ids, autocast=False,  # CUDA: bf16 through FSDP's policy (shard)
              t_head=head_weight(teacher, compute_dtype(device)) if args.stage == "distill" else None)
    if args.compile:
        run.cache_len = max(longest_prompt(fmt, args.task), longest_prompt(t_fmt) if t_fmt else 0) + args.max_new_tokens
    if args.sft_mix:
        run.mix_fmt = task_format(args.sft_mix, fmt)
    if rank == 0 and cross and args.loss != "sampled":
        print(f"warning: --loss {args.loss} across tokenizers is the GOLD hybrid (shared token strings + ULD); it "
              "collapsed a number-level student under a char-level teacher on Countdown (docs/cross_tokenizer.md);"
              " --loss sampled is the per-span policy gradient", file=sys.stderr)
    if rank == 0:
        print(f"student: {num_params(model) / 1e6:.3f}M params, {num_params(model, trainable=True) / 1e6:.3f}M "
              f"trainable, {model.cfg}" +
              (f"\nteacher: {num_params(teacher) / 1e6:.3f}M params {teacher.cfg}" if teacher is not None else ""))
    return run, model, teacher, resume_state, files


def mix_test(args):
    test = TASK_SPLITS[args.sft_mix]("test")
    return test[:args.eval_n] if args.eval_n else test


def on_policy_rows(args):
    """The student-sampled rows of every step (parse_args: lambda x batch is whole); RL samples every row."""
    return {"sft": 0, "rl": args.batch_size, "distill": round(args.lmbda * args.batch_size)}[args.stage]


def start_of_run(model, teacher, run, val, test, eval_tokens, log, examples):
    """Where the student starts and where the teacher is: test accuracies, the student's held-out reverse KL
    (distill) and its val accuracy (the curves' origin), logged at step 0; their summary dict."""
    summary = {"trainable_params": num_params(model, trainable=True)}
    if teacher is not None:
        summary["teacher_test_accuracy"] = evaluate(teacher, run.t_fmt, test, run.rank, run.world, run.device,
                                                    eval_tokens)["accuracy"]
    summary["student_test_accuracy_before"] = evaluate(model, run.fmt, test, run.rank, run.world, run.device,
                                                       eval_tokens, examples)["accuracy"]
    if run.args.stage == "distill":
        summary["student_val_rkl_before"] = evaluate_rkl(model, teacher, val, run)
    if run.args.sft_mix:
        summary["mix_test_accuracy_before"] = evaluate(model, run.mix_fmt, mix_test(run.args), run.rank, run.world,
                                                       run.device, eval_tokens)["accuracy"]
    val_before = evaluate(model, run.fmt, val, run.rank, run.world, run.device, eval_tokens)["accuracy"]
    log(dict(step=0, **summary, val_accuracy=val_before))
    if run.rank == 0:
        print("test accuracy: " + (f"teacher {summary['teacher_test_accuracy']:.3f}, " if teacher is not None else "")
              + f"student before {summary['student_test_accuracy_before']:.3f}"
              + rkl_text(" (val per-token KL(student || teacher) {:.3f})", summary.get("student_val_rkl_before")))
    return summary

def step_record(step, m, seconds, compute):
    """The metrics.jsonl record of a step from train_step's metrics m; compute: the cumulative axes."""
    rec = dict(step=step, loss=round(m["loss"], 5), lr=m["lr"], grad_norm=round(m["grad_norm"], 4),
               tokens_per_s=round(m["tokens"] / seconds), **compute)
    if "reward" in m:
        rec["reward"] = round(m["reward"], 4)
    if "on_policy_frac" in m:  # distillation
        rec |= dict(on_policy_frac=m["on_policy_frac"],
                    student_rkl=None if m["student_rkl"] is None else round(m["student_rkl"], 5),
                    completion_len=round(m["completion_len"], 3), rollout_s=round(m["times"]["rollout"], 3))
    for k in ("one_to_one_frac", "skd_accept"):  # across tokenizers; speculative KD
        if m.get(k) is not None:
            rec[k] = round(m[k], 4)
    return rec


def validate(model, teacher, val, eval_tokens, run):
    """Val accuracy (and, distilling, the student's held-out reverse KL)."""
    ev = evaluate(model, run.fmt, val, run.rank, run.world, run.device, eval_tokens)
    if run.args.stage == "distill":
        ev["rkl"] = evaluate_rkl(model, teacher, val, run)
    return ev


def end_of_run(model, optimizer, run, test, eval_tokens, before):
    """Test accuracy after training (and the mixed-in task's), the optimizer's memory; prints the examples
    of the start next to the same problems now."""
    args, after = run.args, []
    out = dict(optimizer_state_bytes=round(all_sum(optimizer_state_bytes(optimizer), run.device)),
               student_test_accuracy_after=evaluate(model, run.fmt, test, run.rank, run.world, run.device,
                                                    eval_tokens, after)["accuracy"])
    if args.sft_mix:  # the mixed-in task kept? (its test split, as many problems as --eval-n)
        out["mix_test_accuracy_after"] = evaluate(model, run.mix_fmt, mix_test(args), run.rank, run.world,
                                                  run.device, eval_tokens)["accuracy"]
    if run.rank == 0:
        for (problem, a), (_, b) in zip(before, after):  # empty after a resume: the start was not kept
            print(f"{problem!r}\n  before: {a!r}\n  after:  {b!r}")
        print(f"test accuracy: student after {out['student_test_accuracy_after']:.3f}")
    return out

# ------------------------------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0 and latest_checkpoint(args.out) is not None:
        args.resume = True  # torchrun --max-restarts restarted this job: continue from the latest checkpoint
    run, model, teacher, resume_state, files = setup(args)
    rank, world, device, fmt = run.rank, run.world, run.device, run.fmt
    n_on = on_policy_rows(args)
    optimizer = torch.optim.AdamW(trainable_params(model), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")
    start, t_train, flops, samples = 0, 0.0, 0.0, 0  # the compute axis: training time, FLOPs, student samples
    if resume_state is not None:
        msd, state = resume_state
        restore(model, optimizer, msd, state["optimizer"])
        start, t_train = state["step"], state.get("train_seconds", 0.0)
        flops, samples = state.get("flops", 0.0), state.get("samples", 0)
    if rank == 0:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args) | {"world_size": world}, f, indent=1)
    metrics = open_metrics(os.path.join(args.out, "metrics.jsonl"), start) if rank == 0 else None

    def log(rec):
        if metrics:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()

    train, val, test = (TASK_SPLITS[args.task](s) for s in ("train", "val", "test"))
    mix = (TASK_SPLITS[args.sft_mix]("train"), run.mix_fmt) if args.sft_mix else None
    val, test = (val[:args.eval_n], test[:args.eval_n]) if args.eval_n else (val, test)
    # eval lets every model answer in at least 24 tokens (a step list takes up to 18) even when rollouts are
    # cut shorter, e.g. to fit a cross-tokenizer teacher's context; chat models get --max-new-tokens
    eval_tokens = max(24, args.max_new_tokens)
    summary, before = {}, []
    if start == 0:
        summary = start_of_run(model, teacher, run, val, test, eval_tokens, log, before)
    elif rank == 0:  # resumed: the start-of-run accuracies were logged at step 0
        with open(os.path.join(args.out, "metrics.jsonl")) as f:
            summary = {k: v for rec in map(json.loads, f) if rec["step"] == 0 for k, v in rec.items()
                       if k not in ("step", "val_accuracy")}

    bar = tqdm(total=args.steps, initial=start, disable=rank != 0, dynamic_ncols=True)
    last = {}
    for step in range(start, args.steps):
        t0 = time.time()
        m = train_step(step, step_rows(train, step, args, n_on, fmt, rank, world, mix), model, teacher, optimizer,
                       run)
        if not math.isfinite(m["loss"]):
            bar.close()
            fail(f"loss is {m['loss']} at step {step + 1}; stopping. The last good checkpoint is {args.out}/latest")
        dt = time.time() - t0
        t_train, flops, samples = t_train + dt, flops + m["flops"], samples + m["samples"]
        last = step_record(step + 1, m, dt, dict(minutes=round(t_train / 60, 3), flops=flops, samples=samples))
        log(last)
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.4f}")
        # --max-minutes on the ranks' mean training time, so every rank stops at the same step
        out_of_time = args.max_minutes and all_sum(t_train, device) / world / 60 >= args.max_minutes
        done = step + 1 == args.steps or bool(out_of_time)
        if (args.eval_every and (step + 1) % args.eval_every == 0) or done:
            ev = validate(model, teacher, val, eval_tokens, run)
            last |= {f"val_{k}": None if v is None else round(v, 4) for k, v in ev.items()}
            log(dict(step=step + 1, **{f"val_{k}": v for k, v in ev.items()}))
            if rank == 0:
                bar.write(f"step {step + 1}: loss {m['loss']:.4f} val accuracy {ev['accuracy']:.3f} "
                          f"format-valid {ev['format_valid']:.3f}" + rkl_text(" rkl {:.3f}", ev.get("rkl")) +
                          f" ({t_train / 60:.1f} min)")
        if (step + 1) % args.save_every == 0 or done:
            save_checkpoint(args.out, model, optimizer, step + 1, files[0],
                            dict(train_seconds=t_train, flops=flops, samples=samples, args=vars(args)), args.keep,
                            side=files[1:])
            # the next one copies them from this one: --keep may delete the checkpoint a resumed run started from
            files = text_files(latest_checkpoint(args.out), args.tokenizer)
        if done:
            break
    bar.close()
    summary |= end_of_run(model, optimizer, run, test, eval_tokens, before)
    log(dict(step=last.get("step", start), **summary))
    if rank == 0:
        print(json.dumps(dict(out=args.out, **last, **summary, peak_mem_mb=round(peak_mem_mb(device)))))
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

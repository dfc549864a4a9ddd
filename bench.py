"""Benchmark of one on-policy distillation step on a fixed reference workload, measured side by side in one
run (ratios mean something on a noisy machine; absolute times only on a quiet one or a GPU).

    python bench.py                                   # the reference workload, fp32 on CPU
    OMP_WAIT_POLICY=PASSIVE python bench.py           # beside another job: OpenMP threads sleep, not spin
    python bench.py --threads 1                       # the same, one thread
    python bench.py --device cuda --dtype bf16        # the same workload on a GPU, bf16 autocast
    python bench.py --device cuda --batch-size 256 --student-width 512 --teacher-layers 16   # bigger
    python bench.py --repeats 1 --new-tokens 8        # a quick smoke run
    python bench.py --samples-per-prompt 4            # 8 prompts x 4 samples: shared prefills vs not, side by side
    python bench.py --compile                         # + the compiled decode step (train.py --compile), side by side

On the quiet 2-core CPU the default run takes about 30 s. Beside a 2-thread training job it took 2.3 min
with 2 repeats (spinning OpenMP threads fighting the other job) and about 20 s with --threads 1 or
OMP_WAIT_POLICY=PASSIVE; the header says "the CPU is busy" when the load average at start suggests this.

Reference workload (the defaults): student 4 layers, width 256, 4 heads, MLP 1024; teacher 8 layers, width
512, 8 heads, MLP 2048; random weights; the Countdown tokenizer's vocabulary (data/tokenizer.json, 23 ids);
32 prompts of 33 tokens (BOS + 32 random characters, no padding); 32 new tokens per row with no early stop
(eos id -1 never occurs); loss jsd (beta 0.5), train.py's (losses.OBJECTIVES); AdamW; fp32 on CPU.

What is measured, each the median of --repeats runs after one warm-up:
  rollout      tokens/s of the student's greedy decode with the KV cache (rollout.generate) and with full
               recompute (generate_no_cache below), whether both give the same tokens, the prefill time and
               the time per one-token decode step next to its FLOP floor and to its matmul and attention
               kernels alone; with --compile the same for the compiled step, and its compile time;
  distill step seconds per call of train.py's own train_step at lambda = 1 (the student samples at
               temperature 1) and at lambda = 0 (given completions: random ids), split into its parts: rollout
               (sampling + packing the batch), teacher scoring, student forward + loss + backward, and
               optimizer (clip + AdamW + zero_grad); the step is the whole call, its metrics included; with
               --samples-per-prompt > 1 the lambda = 1 step again with no prefill shared. The models are not
               sharded (a process group of one, for train_step's all-reduces): --dtype bf16 runs the step's
               forwards under torch.autocast, its backward and optimizer outside (step_as_benched).
  what bounds  each part of the lambda = 1 step again, its matmul and attention kernels alone (kernel_floor:
               recorded below autograd, replayed back to back on random tensors of the same shapes), so the
               MFU the part would have if its norms, GELU, rotary, copies, sampling and Python were free.
FLOPs are counted from the shapes of what is computed (flops.py: logits only where the loss reads
them; with --samples-per-prompt > 1 one prefill per distinct prompt); MFU = (FLOPs / time) / the fp32 (or
bf16) matmul peak measured in the same run on a big square matmul (best of 10). Peak memory: CUDA
max_memory_allocated per section; CPU the process's max RSS (getrusage), which only grows, read at the end
of each section.
The last stdout line is one JSON object.
"""
import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, replace
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import rollout
import train
from checkpoint import load_pretrained
from data.countdown import TOKENIZER_PATH, CharFormat, load_tokenizer
from distributed import peak_mem_mb
from flops import flops_forward, flops_fused_loss, flops_generate, flops_score, matmul_params
from losses import OBJECTIVES, chunk_rows, divergence_loss
from model import (GPT, GPTConfig, GradKV, distinct_rows, forward_from, keep_layers, layer_slice, num_params,
                   positions_from_valid, prefill)
from rollout import Row, generate, left_pad, make_batch, sample_token, shared_prompts
from teacher import head_weight, load_teacher, score, teacher_scores

# ---------------------------------------------------------------------------------------------- FLOPs

def flops_no_cache(cfg, batch, prompt_len, new_tokens):
    """generate_no_cache: new_tokens full causal forwards of length prompt_len, prompt_len + 1, ..."""
    return sum(flops_forward(cfg, batch, prompt_len + i) for i in range(new_tokens))


def step_flops(scfg, tcfg, B, P, N, K, lmbda):
    """The parts of a distill step's FLOPs on bench's shapes: B rows, prompts of P tokens (K distinct ones),
    N completion tokens each; the student samples them at lambda = 1 and is given them at lambda = 0."""
    fl = dict(rollout=flops_generate(scfg, B, P, N, K) if lmbda else 0,
              teacher=flops_score(tcfg, B, P, P + N, K, head=False),  # its head runs in the student's fused loss
              student=3 * flops_score(scfg, B, P, P + N, K, head=False) + flops_fused_loss(scfg, tcfg, B * N),
              optimizer=0)
    return fl | dict(step=sum(fl.values()))


# -------------------------------------------------------------------------------------------- helpers

@torch.no_grad()
def generate_no_cache(model, ids, valid, max_new_tokens, temperature=0.0):
    """The reference: recompute the whole (left-padded) sequence for every new token."""
    for _ in range(max_new_tokens):
        logits = model(ids, positions_from_valid(valid), valid)[:, -1]
        tok = sample_token(logits, temperature)
        ids = torch.cat([ids, tok[:, None]], 1)
        valid = torch.cat([valid, torch.ones_like(tok[:, None], dtype=torch.bool)], 1)
    return ids


def median_times(fns, repeats, warmups=None):
    """fns: name -> fn() returning (dict of part -> seconds, output). Every fn runs once to warm up (or its
    cheaper stand-in from `warmups`), then `repeats` rounds run them in turn (side by side, so load on a
    shared machine hits all alike). Returns name -> {part: median seconds} and name -> the last output."""
    for name, fn in fns.items():
        (warmups or {}).get(name, fn)()
    runs, last = {name: [] for name in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, last[name] = fn()
            runs[name].append(t)
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}, last


class KernelRecorder(TorchDispatchMode):
    """Records the matmul and attention kernels a piece of code runs (aten mm/addmm/bmm/baddbmm and the
    scaled_dot_product attention ops, forward and backward), with the shapes, strides and dtypes of their
    arguments, below autograd: what the hardware is asked to multiply, nothing else."""

    MATMULS = ("mm", "addmm", "bmm", "baddbmm")

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in self.MATMULS or "scaled_dot_product" in name:
            spec = lambda a: (a.shape, a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a  # noqa: E731
            self.calls.append((func, [spec(a) for a in args], {k: spec(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def kernel_floor(fn, repeats, sync):
    """Seconds that only the matmul and attention kernels of fn() take: fn runs once under a
    KernelRecorder, then the recorded calls are replayed back to back on fresh random tensors of the same
    shapes and strides (median of `repeats`). Everything else fn does (norms, GELU, rotary, residual adds,
    cache writes, sampling, Python) is left out, so this is what the part would cost if all of that were
    free: the bound on its MFU with these kernels on this machine."""
    rec = KernelRecorder()
    with rec:
        fn()

    def make(a):
        if not (isinstance(a, tuple) and len(a) == 4 and isinstance(a[0], torch.Size)):
            return a
        shape, stride, dtype, dev = a
        t = torch.empty_strided(shape, stride, dtype=dtype, device=dev)
        return t.fill_(True) if dtype == torch.bool else t.normal_() if dtype.is_floating_point else t.zero_()
    calls = [(f, [make(a) for a in args], {k: make(v) for k, v in kw.items()}) for f, args, kw in rec.calls]

    def run():
        sync()
        t0 = time.perf_counter()
        for f, args, kw in calls:
            f(*args, **kw)
        sync()
        return {"s": time.perf_counter() - t0}, None
    return median_times({"replay": run}, repeats)[0]["replay"]["s"], len(calls)


def matmul_peak(n, device, dtype, repeats, sync):
    """GFLOP/s of an n x n x n matmul in the dtype the workload computes in: the best of max(10, repeats)
    runs after a warm-up (a peak is what the machine can do; a median of a few let one slow run set it)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(max(10, repeats)):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def rounded(x, digits=4):
    """Floats to `digits` significant digits, through dicts, for a readable JSON line."""
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    return float(f"{x:.{digits}g}") if isinstance(x, float) else x


def model_cfg(args, who, vocab, max_len):
    layers, width, heads, mlp = (getattr(args, f"{who}_{k}") for k in ("layers", "width", "heads", "mlp"))
    if width % heads or (width // heads) % 2:
        sys.exit(f"bench.py: error: --{who}-width must be a multiple of --{who}-heads with an even head size")
    return GPTConfig(vocab_size=vocab, n_layer=layers, n_head=heads, d_model=width, d_mlp=mlp or 4 * width,
                     max_seq_len=max_len)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for who, (layers, width, heads) in (("student", (4, 256, 4)), ("teacher", (8, 512, 8))):
        p.add_argument(f"--{who}-layers", type=int, default=layers)
        p.add_argument(f"--{who}-width", type=int, default=width)
        p.add_argument(f"--{who}-heads", type=int, default=heads)
        p.add_argument(f"--{who}-mlp", type=int, default=0, help="MLP width (0 = 4 * width)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per step")
    p.add_argument("--prompt-len", type=int, default=33, help="tokens per prompt, BOS included")
    p.add_argument("--new-tokens", type=int, default=32, help="completion tokens per row (no early stop)")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="rows per distinct prompt (the batch holds "
                   "batch-size / this distinct prompts); > 1 adds the lambda=1 step without shared prefills")
    p.add_argument("--loss", default="jsd", choices=["fkl", "rkl", "jsd"])
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement, after one warm-up "
                   "(5: about 20 s on the quiet 2-core CPU; use 2 on a busy one)")
    p.add_argument("--matmul-size", type=int, default=0, help="n of the peak matmul (0 = 2048 CPU, 8192 CUDA)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast (meant for CUDA)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default, one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="time the rollout with the compiled decode step too, "
                   "side by side with eager (the first call's compile reported), and the distill step with "
                   "train.py --compile")
    p.add_argument("--teacher", help="a checkpoint directory (e.g. hf/smollm2-135m-instruct): benchmark real shapes "
                   "(bench_checkpoints) instead of the reference workload")
    p.add_argument("--student", help="with --teacher: the student's checkpoint directory")
    p.add_argument("--student-keep-layers", default=None, metavar="START:STOP:STEP", help="with --student: keep "
                   "these blocks (as train.py --keep-layers, e.g. 0::3)")
    p.add_argument("--part", default="all", choices=["all", "times", "memory"], help="with --teacher: measure only "
                   "the times or only the memory (all: the times here, then the memory in a fresh process, whose "
                   "fixed mmap threshold would slow the step)")
    p.add_argument("--teacher-top-k", type=int, default=64, help="with --teacher: the memory part also runs the step "
                   "with train.py --teacher-top-k K and makes the teacher's top-K signal for the batch beside its whole logits")
    args = p.parse_args(argv)
    if bool(args.teacher) != bool(args.student):
        p.error("--teacher and --student go together")
    if min(args.batch_size, args.prompt_len, args.repeats, args.samples_per_prompt) < 1 or args.new_tokens < 2:
        p.error("--batch-size, --prompt-len, --repeats and --samples-per-prompt must be >= 1, --new-tokens >= 2")
    if args.batch_size % args.samples_per_prompt:
        p.error(f"--batch-size {args.batch_size} is not a multiple of --samples-per-prompt {args.samples_per_prompt}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    return args

# --------------------------------------------------------------------------------- memory, on CPU too

class PeakRSS:
    """The process's resident set, sampled every 0.2 ms on a thread while the block runs: `above` is its peak
    over its value at entry, in bytes (CPU has no allocator statistics; tensors of a few MB and more are
    their own mmaps, which glibc gives back on free once the threshold below is fixed)."""

    def __enter__(self):
        self.page, self.stop = os.sysconf("SC_PAGE_SIZE"), threading.Event()
        self.base = self.peak = self.rss()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(2e-4)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.above = max(self.peak, self.rss()) - self.base


class PeakCUDA:
    """PeakRSS's interface on CUDA, from the allocator: `above` is the peak allocated over the allocated at entry."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.above = torch.cuda.max_memory_allocated() - self.base


def fixed_mmap_threshold(nbytes=1 << 16):
    """glibc raises its mmap threshold after frees (up to 32 MB), after which freed blocks stay in the heap
    and the RSS no longer falls; a fixed threshold keeps big tensors as mmaps returned on free."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except OSError:
        pass

# ------------------------------------------------------------------------------ how bench runs train_step

def machine(args):
    """What every measurement reads about the device: args, device, bf16, cuda, sync, amp (bf16 autocast,
    off for fp32) and the peak matmul size."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    return SimpleNamespace(args=args, device=device, bf16=args.dtype == "bf16", cuda=cuda,
                           sync=torch.cuda.synchronize if cuda else (lambda: None),
                           amp=lambda: torch.autocast(device.type, torch.bfloat16, enabled=args.dtype == "bf16"),
                           matmul_n=args.matmul_size or (8192 if cuda else 2048), mem={})


def measure_peak(w):
    w.peak = matmul_peak(w.matmul_n, w.device, torch.bfloat16 if w.bf16 else torch.float32, w.args.repeats, w.sync)


def timed(fn, w):
    """fn as a function returning ({"s": seconds}, fn's output), under no_grad and bench's autocast: for
    median_times."""
    def run():
        w.sync()
        t0 = time.perf_counter()
        with torch.no_grad(), w.amp():
            out = fn()
        w.sync()
        return {"s": time.perf_counter() - t0}, out
    return run


@contextmanager
def group_of_one(device):
    """A process group of one for train_step's all-reduces, unless one is up already. The models stay
    unsharded, so bench's numbers compare across runs without FSDP's hooks in them."""
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    try:
        yield
    finally:
        if own:
            dist.destroy_process_group()


@contextmanager
def patched(module, **names):
    """module's attributes `names` replaced by the given values inside the block."""
    old = {k: getattr(module, k) for k in names}
    for k, v in names.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def under(amp, fn):
    """fn, called under amp()."""
    def call(*a, **kw):
        with amp():
            return fn(*a, **kw)
    return call


def every_row_distinct(ids, valid):
    """distinct_rows as if no two rows shared a prompt: each row its own group."""
    rows = torch.arange(len(ids), device=ids.device)
    return rows, rows


@contextmanager
def step_as_benched(w, share=True):
    """The context bench calls train.train_step in. --dtype bf16: the step's forwards (rollout, teacher
    scoring, the student's forward with its loss) under autocast, its backward and optimizer outside it:
    autocast reaches into a backward run inside it and would cast the loss head's fp32 backward matmuls to
    bf16. share=False: every row is its own prompt for the rollout, its FLOP count and rollout.shared_prompts,
    so no prefill is shared (the l1_unshared step)."""
    with ExitStack() as stack:
        if w.bf16:
            stack.enter_context(patched(train, **{name: under(w.amp, getattr(train, name))
                                                  for name in ("make_batch", "teacher_scores", "forward_from")}))
        if not share:
            stack.enter_context(patched(rollout, distinct_rows=every_row_distinct))
        yield

# ------------------------------------------------------------------------------------ real checkpoints

def unfused_distill_step(student, teacher, batch, optimizer, args):
    """The reference the fused loss replaces: both models' logits [B, N, V] whole, then the chunked loss."""
    c = batch.prompt_len
    with torch.no_grad():
        t_logits = score(teacher, batch, start=c)
    s_logits = student(batch.tokens, batch.pos, batch.valid, out_from=c - 1)[:, :-1]
    m = batch.mask[:, c:]
    divergence_loss(s_logits, t_logits, m, args.loss, m.sum().item(), args.beta).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def teacher_signal(teacher, batch, head, k=None, chunk=0):
    """The teacher's signal for a loss over the batch's completions, as it would be held between the teacher and
    the loss. k None: its logits [B, N, V] whole (unfused_distill_step's). k: what a top-K teacher sends per
    position, its K largest log-probabilities, their int32 ids and the log-mass of the rest, made from its final
    hidden states a chunk of positions at a time (chunk, or 0: as the losses chunk, losses.chunk_rows), so that its
    [B, N, V] logits never exist whole."""
    with torch.no_grad():
        if k is None:
            return score(teacher, batch, start=batch.prompt_len)
        h = score(teacher, batch, start=batch.prompt_len, hidden_states=True).flatten(0, 1)
        out = []
        for hc in h.split(chunk_rows(chunk, head.size(0))):
            lp = torch.log_softmax((hc @ head.T).float(), -1)
            top, ids = lp.topk(min(k, lp.size(-1)), -1)
            out.append((top, ids.int(), lp.scatter(-1, ids, float("-inf")).logsumexp(-1)))
        return [torch.cat(x) for x in zip(*out)]


def bench_checkpoints(args, load, argv):
    """Real shapes: a Hugging Face teacher and student (e.g. SmolLM2-135M and its every-third-layer student),
    --batch-size random prompts of --prompt-len tokens and --new-tokens sampled tokens per row (no early stop),
    fp32 on CPU (--dtype bf16: autocast). Measures the rollout's tokens/s (eager, and with --compile the
    compiled step, side by side), train.py's step split into its parts with its MFU, and the step's peak
    memory above its start (weights and optimizer state; the gradients are made during the step) with the
    head fused into the loss (train.py), with it and --activation-checkpointing, and with both models'
    logits whole (unfused_distill_step), and with --teacher-top-k, beside the teacher's signal for the batch
    whole or as top K (teacher_signal), at --new-tokens and at twice as many. The memory runs in a process
    of its own (--part memory): on CPU it needs glibc's mmap threshold fixed from the start, which makes every
    large tensor a fresh mmap and slows the step by a quarter, so the times are taken in a process without it."""
    if args.part == "memory" and args.device != "cuda":
        fixed_mmap_threshold()  # from the start: heap pages freed before it would hide later peaks from the RSS
    w = machine(args)
    measure_peak(w)
    teacher, _ = load_teacher(args.teacher)
    student = load_pretrained(args.student)
    if args.student_keep_layers:
        student = keep_layers(student, layer_slice(args.student_keep_layers, student.cfg.n_layer))
    w.teacher, w.student = teacher.to(w.device), student.to(w.device).train()
    w.optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.1,
                                    fused=w.cuda)
    B, P, S, V = args.batch_size, args.prompt_len, args.samples_per_prompt, student.cfg.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    w.prompts = [p for p in (torch.randint(V, (P,), generator=g).tolist() for _ in range(B // S)) for _ in range(S)]
    with group_of_one(w.device):
        lengths = (args.new_tokens, 2 * args.new_tokens)
        if args.part == "memory":
            return print(json.dumps({f"new_tokens_{N}": checkpoint_memory(w, N) for N in lengths}))
        res = {f"new_tokens_{N}": checkpoint_times(w, N) for N in lengths}
    if args.part == "all":
        for N, mem in memory_in_a_fresh_process(argv).items():
            res[N] |= mem
    grad_mb = sum(p.numel() * p.element_size() for p in student.parameters()) / 2 ** 20
    res |= dict(device=str(w.device), dtype=args.dtype, threads=torch.get_num_threads(), load_avg=load, batch=B,
                prompt_len=P, matmul_peak_gflops=w.peak, samples_per_prompt=S, loss=args.loss, student=args.student,
                student_keep_layers=args.student_keep_layers, teacher=args.teacher,
                student_params=num_params(student), teacher_params=num_params(teacher), vocab=V, grad_mb=grad_mb)
    print_checkpoints(args, res, load, w)
    print(json.dumps(rounded(res)))


def memory_in_a_fresh_process(argv):
    """bench_checkpoints' memory half (--part memory), run as a child with the same flags: its last line."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--part", "memory"], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def checkpoint_run(w, N, *flags):
    """(train.Run, the rows) of a lambda = 1 step at N new tokens per row, with these extra train.py flags."""
    args = w.args
    targs = train.parse_args(["--loss", args.loss, "--beta", str(args.beta), "--batch-size", str(args.batch_size),
                              "--samples-per-prompt", str(args.samples_per_prompt), "--max-new-tokens", str(N), "--lr",
                              "1e-6", "--warmup", "0", "--seed", str(args.seed), "--out", os.devnull, *flags])
    run = train.Run(targs, None, None, False, None, 0, 1, w.device, 0, -1,
                    head_weight(w.teacher, torch.bfloat16 if w.bf16 else None))
    return run, [Row(p, None, True, None) for p in w.prompts]


def recomputing(w, run, rows):
    """train_step with --activation-checkpointing (what train.py sets on the student for it)."""
    w.student.checkpoint_blocks = True
    try:
        with step_as_benched(w):
            return train.train_step(0, rows, w.student, w.teacher, w.optimizer, run)
    finally:
        w.student.checkpoint_blocks = False


def checkpoint_times(w, N):
    """At N new tokens per row: the rollout's tokens/s (eager, and compiled with --compile), train_step's
    parts, FLOPs and MFU (eager, and with --compile as train.py --compile runs it: the decode step, the blocks
    and the loss's chunks compiled, side by side), and the eager step with activation checkpointing. Nothing
    samples the memory meanwhile: PeakRSS's polling thread takes the interpreter from the step's Python (the
    decode loop) and slows it."""
    args, B, student, teacher = w.args, w.args.batch_size, w.student, w.teacher
    ids, valid = left_pad(w.prompts, 0, w.device)

    def rollout_fn(compile):
        return timed(lambda: generate(student, ids, valid, N, -1, 0, temperature=1.0, compile=compile,
                                      generator=torch.Generator(w.device).manual_seed(0)), w)
    fns = {"eager": rollout_fn(False)} | ({"compiled": rollout_fn(True)} if args.compile else {})
    t_first = {k: fn()[0]["s"] for k, fn in fns.items()}  # warm-up: the compiled step compiles here
    t_roll, _ = median_times(fns, args.repeats, warmups={k: lambda: None for k in fns})
    res = dict(rollout_tok_s={k: B * N / t["s"] for k, t in t_roll.items()})
    if args.compile:
        res["compile_s"] = t_first["compiled"] - t_roll["compiled"]["s"]
    for name, flags in (("eager", ()),) + ((("compiled", ("--compile",)),) if args.compile else ()):
        run, rows = checkpoint_run(w, N, *flags)
        for m in (student, teacher):
            m.compile_blocks(bool(flags))
        t0 = time.perf_counter()
        with step_as_benched(w):
            train.train_step(0, rows, student, teacher, w.optimizer, run)  # warm-up: AdamW's state, the compiles
        first = time.perf_counter() - t0
        parts = []
        for _ in range(args.repeats):
            with step_as_benched(w):
                out = train.train_step(0, rows, student, teacher, w.optimizer, run)
            parts.append(out["times"])
        med = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
        step_s = sum(med.values())
        res[name] = dict(step_s=step_s, parts_s=med, step_gflop=out["flops"] / 1e9, first_step_s=first,
                         step_mfu=out["flops"] / step_s / (w.peak * 1e9))
        for m in (student, teacher):
            m.compile_blocks(False)
    run, rows = checkpoint_run(w, N, "--activation-checkpointing")
    t0 = time.perf_counter()
    out_ac = recomputing(w, run, rows)
    res.update(step_s_recompute=time.perf_counter() - t0, step_gflop_recompute=out_ac["flops"] / 1e9)
    return res


def checkpoint_memory(w, N):
    """At N new tokens per row, one run each: the step's peak memory above its start with the head fused into
    the loss (train.py), with that and activation checkpointing, with both models' logits whole, and with the head
    fused and --teacher-top-k; and the peak of making the teacher's signal for the batch, whole logits or top K."""
    Peak = PeakCUDA if w.cuda else PeakRSS
    run, rows = checkpoint_run(w, N)
    with Peak() as fused, step_as_benched(w):
        train.train_step(0, rows, w.student, w.teacher, w.optimizer, run)
    with Peak() as ac:
        recomputing(w, checkpoint_run(w, N, "--activation-checkpointing")[0], rows)
    with w.amp():
        batch, _ = make_batch(0, rows, w.student, w.teacher, run)
    with Peak() as unfused, w.amp():
        unfused_distill_step(w.student, w.teacher, batch, w.optimizer, run.args)
    K = w.args.teacher_top_k
    with Peak() as fused_k, step_as_benched(w):
        train.train_step(0, rows, w.student, w.teacher, w.optimizer, checkpoint_run(w, N, "--teacher-top-k", str(K))[0])
    with Peak() as whole, w.amp():
        teacher_signal(w.teacher, batch, None)
    with Peak() as top_k, w.amp():
        teacher_signal(w.teacher, batch, head_weight(w.teacher), K)
    return dict(peak_above_mb_fused=fused.above / 2 ** 20, peak_above_mb_recompute=ac.above / 2 ** 20,
                peak_above_mb_unfused=unfused.above / 2 ** 20, peak_above_mb_fused_top_k=fused_k.above / 2 ** 20,
                teacher_signal_mb_whole=whole.above / 2 ** 20, teacher_signal_mb_top_k=top_k.above / 2 ** 20)


def print_checkpoints(args, res, load, w):
    B, P, V, grad_mb = args.batch_size, args.prompt_len, res["vocab"], res["grad_mb"]
    lengths = (args.new_tokens, 2 * args.new_tokens)
    print(f"{args.teacher} -> {args.student}" + (f" (layers {args.student_keep_layers})" if args.student_keep_layers
                                                 else "") + f"; batch {B} x ({P} prompt + N new) random tokens, "
          f"loss {args.loss}, {w.device}, {torch.get_num_threads()} threads, load average at start {load:.1f}")
    print(f"student {res['student_params'] / 1e6:.1f}M, teacher {res['teacher_params'] / 1e6:.1f}M params, vocab {V}; "
          f"the student's gradients take {grad_mb:.0f} MiB")
    print(f"matmul peak ({w.matmul_n}^3 {args.dtype}): {w.peak:.1f} GFLOP/s")
    print(f"{'N new':>6}{'step':>10}{'rollout tok/s':>15}{'step s':>8}{'rollout':>9}{'teacher':>9}{'student':>9}"
          f"{'optim':>7}{'GFLOP':>8}{'MFU':>7}{'1st step s':>12}")
    for N in lengths:
        r = res[f"new_tokens_{N}"]
        for name in ("eager", "compiled") if args.compile else ("eager",):
            v = r[name]
            print(f"{N:>6}{name:>10}{r['rollout_tok_s'][name]:>15.0f}{v['step_s']:>8.3f}" + "".join(
                f"{v['parts_s'][k]:>9.3f}" for k in ("rollout", "teacher", "student")) +
                f"{v['parts_s']['optimizer']:>7.3f}{v['step_gflop']:>8.0f}{v['step_mfu']:>7.1%}{v['first_step_s']:>12.1f}")
    print("(compiled: train.py --compile, the decode step, the blocks and the loss's chunks; 1st step: the warm-up, "
          "which compiles)" if args.compile else "")
    if args.part == "times":
        return
    print(f"{'N new':>6}{'peak above start: fused':>25}{'whole logits':>14}{'fused, recomputed':>19}"
          f"{'recomputed step s':>19}")
    for N in lengths:
        r = res[f"new_tokens_{N}"]
        print(f"{N:>6}{r['peak_above_mb_fused']:>21.0f} MiB{r['peak_above_mb_unfused']:>10.0f} MiB"
              f"{r['peak_above_mb_recompute']:>15.0f} MiB{r['step_s_recompute']:>19.3f}")
    K = args.teacher_top_k
    print(f"{'N new':>6}{f'fused, --teacher-top-k {K}':>27}{'teacher signal: whole logits':>30}{f'top {K}':>10}")
    for N in lengths:
        r = res[f"new_tokens_{N}"]
        print(f"{N:>6}{r['peak_above_mb_fused_top_k']:>23.0f} MiB{r['teacher_signal_mb_whole']:>26.0f} MiB"
              f"{r['teacher_signal_mb_top_k']:>6.0f} MiB")
    print("(peak above start: " + ("CUDA max allocated" if w.cuda else "the process's RSS, sampled, in a fresh "
          "process") + " during the eager step over its value before; the step makes the gradients, so subtract those "
          "for the activations and loss alone; recomputed: --activation-checkpointing, one run; teacher signal: the "
          "teacher's forward and what it hands the loss, its logits whole or its top K, their ids and the rest's mass)")

# ------------------------------------------------------------------------------ the reference workload

def reference_workload(args):
    """machine(args) with the reference workload's models, optimizer and rows (the module docstring)."""
    w = machine(args)
    w.tok = load_tokenizer(TOKENIZER_PATH)
    w.V, w.B, w.P, w.N, w.S = w.tok.get_vocab_size(), args.batch_size, args.prompt_len, args.new_tokens, \
        args.samples_per_prompt
    w.pad, w.no_eos = 0, -1  # eos -1 never occurs: every row generates exactly N tokens
    w.scfg, w.tcfg = (model_cfg(args, who, w.V, w.P + w.N + 1) for who in ("student", "teacher"))
    torch.manual_seed(args.seed)
    w.student, w.teacher = GPT(w.scfg).to(w.device), GPT(w.tcfg).to(w.device).eval()
    w.teacher.requires_grad_(False)
    w.optimizer = torch.optim.AdamW(w.student.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                    fused=w.cuda)
    g = torch.Generator().manual_seed(args.seed)
    # B rows: B / S distinct prompts, each S times in a row (as train.py)
    w.prompts = [p for p in ([1] + torch.randint(4, w.V, (w.P - 1,), generator=g).tolist()
                             for _ in range(w.B // w.S)) for _ in range(w.S)]
    w.given = [torch.randint(4, w.V, (w.N,), generator=g).tolist() for _ in range(w.B)]  # lambda = 0 completions
    w.ids, w.valid = left_pad(w.prompts, w.pad, w.device)
    measure_peak(w)
    return w


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def bench_rollout(w):
    """Section 1: the student's greedy rollout with the KV cache vs full recompute (and the compiled step),
    outputs compared. Returns (the JSON's rollout, the FLOPs of its table: cache, full, prefill, step)."""
    args, B, P, N, S, student, ids, valid = w.args, w.B, w.P, w.N, w.S, w.student, w.ids, w.valid
    reset_peak(w.device)
    decode = lambda compile=False: generate(student, ids, valid, N, w.no_eos, w.pad, temperature=0.0,  # noqa: E731
                                            compile=compile).tokens
    prefill_ = lambda: prefill(student, ids, positions_from_valid(valid), valid, P + N,  # noqa: E731  as generate
                               distinct_rows(ids, valid))
    fns = dict(cache=timed(decode, w), prefill=timed(prefill_, w),
               full=timed(lambda: generate_no_cache(student, ids, valid, N), w))
    warmups = dict(full=timed(lambda: generate_no_cache(student, ids, valid, 2), w))  # the costliest: warm briefly
    if args.compile:  # the first call compiles: timed on its own, then side by side with the others
        t_compile = timed(lambda: decode(True), w)()[0]["s"]
        fns["compiled"], warmups["compiled"] = timed(lambda: decode(True), w), lambda: None
    times, out = median_times(fns, args.repeats, warmups)
    w.mem["rollout"] = peak_mem_mb(w.device)
    t_cache, t_prefill, t_full = (times[k]["s"] for k in ("cache", "prefill", "full"))
    same = torch.equal(out["cache"], out["full"])  # the speed-up is not bought with a different result
    agree = (out["cache"][:, P:] == out["full"][:, P:]).float().mean().item()
    t_step = (t_cache - t_prefill) / (N - 1)
    fl = dict(cache=flops_generate(w.scfg, B, P, N, B // S), full=flops_no_cache(w.scfg, B, P, N),
              prefill=flops_forward(w.scfg, B // S, P, n_out=1))
    fl["step"] = (fl["cache"] - fl["prefill"]) / (N - 1)  # the mean one-token step
    peak = w.peak * 1e9
    roll = dict(kv_cache_tok_s=B * N / t_cache, no_cache_tok_s=B * N / t_full, speedup=t_full / t_cache,
                same_tokens=same, token_agreement=agree, kv_cache_s=t_cache, no_cache_s=t_full,
                prefill_s=t_prefill, decode_step_s=t_step, decode_step_floor_s=fl["step"] / peak,
                kv_cache_gflop=fl["cache"] / 1e9, no_cache_gflop=fl["full"] / 1e9,
                kv_cache_mfu=fl["cache"] / t_cache / peak, no_cache_mfu=fl["full"] / t_full / peak)
    try:  # the eager decode step's matmul and attention kernels alone: what a compiled step can approach
        with torch.no_grad(), w.amp():
            k_roll, k_pre = (kernel_floor(fn, args.repeats, w.sync)[0] for fn in (decode, prefill_))
        roll["decode_step_kernel_s"] = (k_roll - k_pre) / (N - 1)
    except RuntimeError:
        roll["decode_step_kernel_s"] = None
    if args.compile:
        t_comp = times["compiled"]["s"]
        roll |= dict(compiled_tok_s=B * N / t_comp, compiled_s=t_comp, compile_s=t_compile - t_comp,
                     compiled_speedup=t_cache / t_comp, compiled_same_tokens=torch.equal(out["compiled"], out["cache"]),
                     compiled_decode_step_s=(t_comp - t_prefill) / (N - 1))
    return roll, fl


def distill_setup(w):
    """train.py's Run for bench's distill steps (its flags from bench's) and their rows by lambda: 1, the
    student samples; 0, given completions (random ids)."""
    args = w.args
    targs = train.parse_args(["--stage", "distill", "--loss", args.loss, "--beta", str(args.beta), "--batch-size",
                              str(w.B), "--max-new-tokens", str(w.N), "--lr", "1e-4", "--warmup", "0",
                              "--seed", str(args.seed), "--out", os.devnull] + ["--compile"] * args.compile)
    fmt = CharFormat(w.tok)
    run = train.Run(targs, fmt, fmt, False, None, 0, 1, w.device, w.pad, w.no_eos,
                    head_weight(w.teacher, torch.bfloat16 if w.bf16 else None))
    rows = {1: [Row(p, None, True, None) for p in w.prompts],
            0: [Row(p, c, False, None) for p, c in zip(w.prompts, w.given)]}
    return run, rows


def distill_step(w, run, rows, share=True):
    """One call of train_step; its parts' seconds, and the step's (the whole call, its metrics included)."""
    with step_as_benched(w, share):
        w.sync()
        t0 = time.perf_counter()
        times = train.train_step(0, rows, w.student, w.teacher, w.optimizer, run)["times"]
        w.sync()
        return dict(times, step=time.perf_counter() - t0), None


def bench_steps(w, run, rows):
    """Section 2: the distill steps at lambda = 1 and 0 (and with --samples-per-prompt > 1 the lambda = 1
    step without shared prefills), in turn. Returns (variant name -> (lambda, prompts shared), the JSON's
    step_<variant> entries)."""
    variants = {"l1": (1, True), "l0": (0, True)}
    if w.S > 1:  # the same lambda = 1 step with every row prefilled on its own, side by side
        variants["l1_unshared"] = (1, False)
    reset_peak(w.device)
    times, _ = median_times({k: (lambda lm=lm, sh=sh: distill_step(w, run, rows[lm], sh))
                             for k, (lm, sh) in variants.items()}, w.args.repeats)
    w.mem["distill"] = peak_mem_mb(w.device)
    steps = {}
    for name, (lmbda, share) in variants.items():
        # K: the rows the prompts are prefilled for
        fl = step_flops(w.scfg, w.tcfg, w.B, w.P, w.N, w.B // w.S if share else w.B, lmbda)
        steps[f"step_{name}"] = {k: dict(s=s, gflop=fl[k] / 1e9, mfu=fl[k] / s / (w.peak * 1e9))
                                 for k, s in times[name].items()}
    return variants, steps


def step_parts(w, run, rows):
    """Each part of a step on `rows` as a function that runs it again on one step's tensors (for
    kernel_floor), made of the functions train_step calls, its forwards under autocast as in
    step_as_benched. Eager: the kernel recorder sees no compiled code."""
    run = replace(run, args=argparse.Namespace(**vars(run.args) | {"compile": False}))
    student, teacher, objective = w.student, w.teacher, OBJECTIVES[run.args.stage]
    with w.amp():
        batch, _ = make_batch(0, rows, student, teacher, run)
        groups = shared_prompts(batch)
        t_h, _ = teacher_scores(teacher, batch, rows, groups, run)
    n_tok = batch.mask.sum().item()

    def student_part():
        with w.amp():
            loss, _ = forward_from(student, batch.tokens, batch.pos, batch.valid, batch.prompt_len, groups=groups,
                                   cache_cls=GradKV, head=lambda h, wt: objective(h, wt, batch, n_tok, run, t_h))
        loss.backward()
    return dict(rollout=under(w.amp, lambda: make_batch(0, rows, student, teacher, run)),
                teacher=under(w.amp, lambda: teacher_scores(teacher, batch, rows, groups, run)),
                student=student_part)


def what_bounds(w, parts, step):
    """Section 3: each part of the lambda = 1 step (`step`: its step_l1 entry), its matmul and attention
    kernels alone, replayed. Returns (the JSON's kernel_floor_l1, None) or (None, why the replay failed)."""
    floor, peak = {}, w.peak * 1e9
    try:  # the replay feeds random tensors to backend kernels; one that wants real contents must not sink the run
        for k, fn in parts.items():
            s_floor, n_calls = kernel_floor(fn, w.args.repeats, w.sync)
            floor[k] = dict(s=s_floor, kernels=n_calls, mfu=step[k]["gflop"] * 1e9 / s_floor / peak)
    except RuntimeError as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    opt = step["optimizer"]["s"]  # no matmuls: its floor is its own time
    floor["step"] = dict(s=sum(v["s"] for v in floor.values()) + opt, kernels=sum(v["kernels"] for v in floor.values()))
    floor["step"]["mfu"] = step["step"]["gflop"] * 1e9 / floor["step"]["s"] / peak
    return floor, None

# ----------------------------------------------------------------------------------------------- report

def print_rollout(w, roll, fl):
    args, B, N, peak = w.args, w.B, w.N, w.peak * 1e9
    print(f"{'rollout (student, greedy)':<30}{'ms':>9}{'tok/s':>9}{'GFLOP':>8}{'GFLOP/s':>9}{'MFU':>7}")
    t_step = roll["decode_step_s"]
    for name, s, f, n_tok in (("KV cache (rollout.generate)", roll["kv_cache_s"], fl["cache"], B * N),
                              ("full recompute", roll["no_cache_s"], fl["full"], B * N),
                              ("  prefill (1 forward)", roll["prefill_s"], fl["prefill"], 0),
                              ("  per decode step (mean)", t_step, fl["step"], 0)):
        tok_s = f"{n_tok / s:>9.0f}" if n_tok else f"{'-':>9}"
        print(f"{name:<30}{s * 1e3:>9.2f}{tok_s}{f / 1e9:>8.3f}{f / s / 1e9:>9.1f}{f / s / peak:>7.1%}")
    print(f"KV cache speed-up x{roll['speedup']:.2f}; same greedy tokens: {roll['same_tokens']} "
          f"({roll['token_agreement']:.1%} agree); decode step {t_step * 1e3:.2f} ms vs FLOP floor "
          f"{roll['decode_step_floor_s'] * 1e3:.3f} ms (x{t_step / roll['decode_step_floor_s']:.0f})")
    k_step = roll["decode_step_kernel_s"]
    if k_step:
        print(f"the eager decode step's matmul and attention kernels alone: {k_step * 1e3:.3f} ms")
    if args.compile:
        t_c, c_step, f_cache, f_step = roll["compiled_s"], roll["compiled_decode_step_s"], fl["cache"], fl["step"]
        print(f"{'KV cache, compiled step':<30}{t_c * 1e3:>9.2f}{B * N / t_c:>9.0f}{f_cache / 1e9:>8.3f}"
              f"{f_cache / t_c / 1e9:>9.1f}{f_cache / t_c / peak:>7.1%}")
        print(f"{'  per decode step (mean)':<30}{c_step * 1e3:>9.2f}{'-':>9}{f_step / 1e9:>8.3f}{f_step / c_step / 1e9:>9.1f}"
              f"{f_step / c_step / peak:>7.1%}")
        print(f"compiled (--compile) x{roll['compiled_speedup']:.2f} the eager KV cache's tok/s; same greedy tokens: "
              f"{roll['compiled_same_tokens']}; compiling took {roll['compile_s']:.1f} s" +
              (f"; decode step {c_step * 1e3:.3f} ms vs the eager step's kernels {k_step * 1e3:.3f} ms "
               f"(x{c_step / k_step:.2f})" if k_step else ""))
    print()


STEP_LABELS = dict(rollout="rollout + pack", teacher="teacher score", student="student fwd+bwd",
                   optimizer="clip + AdamW", step="step (total)")


def print_steps(w, variants, steps):
    heads = dict(l1="lambda=1", l0="lambda=0", l1_unshared="l=1 unshared")
    print(f"{'distill step':<20}" + "".join(f"{heads[n] + ': ms':>17}{'%':>5}{'GFLOP':>8}{'MFU':>7}" for n in variants))
    for k, label in STEP_LABELS.items():
        row = f"{label:<20}"
        for n in variants:
            r, tot = steps[f"step_{n}"][k], steps[f"step_{n}"]["step"]["s"]
            row += f"{r['s'] * 1e3:>17.1f}{r['s'] / tot:>5.0%}{r['gflop']:>8.2f}"
            row += f"{r['mfu']:>7.1%}" if r["gflop"] else f"{'-':>7}"
        print(row)
    print("(parts are medians of their own; their sum need not equal the median step)")
    if w.S > 1:
        print(f"{w.S} samples per prompt: sharing each prompt's prefill (rollout and teacher) takes the lambda=1 step "
              f"from {steps['step_l1_unshared']['step']['s'] * 1e3:.1f} to {steps['step_l1']['step']['s'] * 1e3:.1f} ms")


def print_bounds(step, floor, floor_error):
    if floor is None:
        print(f"\nwhat bounds lambda=1: the kernel replay failed ({floor_error}); the timings above stand")
        return
    print(f"\n{'what bounds lambda=1':<20}{'ms':>9}{'mm+attn ms':>12}{'kernels':>9}{'MFU':>7}{'MFU bound':>11}")
    for k, label in STEP_LABELS.items():
        if k in floor:
            r, fl_ = step[k], floor[k]
            print(f"{label:<20}{r['s'] * 1e3:>9.1f}{fl_['s'] * 1e3:>12.1f}{fl_['kernels']:>9}{r['mfu']:>7.1%}"
                  f"{fl_['mfu']:>11.1%}")
    print("(mm+attn: the part's matmul and attention kernels alone, replayed on random tensors of the same "
          "shapes;\n MFU bound: the part's MFU if everything else it does took no time; the step's bound "
          "counts clip + AdamW)")


def report(w, load, roll, fl, variants, steps, floor, floor_error):
    args, device = w.args, w.device
    print(f"device {device} ({torch.get_num_threads()} threads, OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}), {args.dtype}; vocab {w.V}; batch {w.B} x "
          f"({w.P} prompt + {w.N} new) tokens; loss {args.loss}; load average at start {load:.1f}")
    if device.type == "cpu" and load > 0.5 * (os.cpu_count() or 1):
        print(f"  the CPU is busy ({os.cpu_count()} cores): OpenMP threads spinning against another process make small "
              "ops (decode, AdamW) far slower;\n  compare with --threads 1 or OMP_WAIT_POLICY=PASSIVE python bench.py")
    for name, c in (("student", w.scfg), ("teacher", w.tcfg)):
        print(f"{name}: {c.n_layer} layers, width {c.d_model}, {c.n_head} heads, MLP {c.d_mlp}; "
              f"{matmul_params(c) / 1e6:.2f}M matmul params")
    print(f"matmul peak ({w.matmul_n}^3 {args.dtype}): {w.peak:.1f} GFLOP/s\n")
    print_rollout(w, roll, fl)
    print_steps(w, variants, steps)
    print_bounds(steps["step_l1"], floor, floor_error)
    what = "max allocated" if w.cuda else "process max RSS (cumulative)"
    print(f"peak memory, {what}: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in w.mem.items()))
    print(json.dumps(rounded(dict(
        device=str(device), dtype=args.dtype, threads=torch.get_num_threads(), load_avg=load,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), vocab=w.V, batch=w.B,
        prompt_len=w.P, new_tokens=w.N, loss=args.loss, repeats=args.repeats, student=asdict(w.scfg),
        teacher=asdict(w.tcfg), student_matmul_params=matmul_params(w.scfg), teacher_matmul_params=matmul_params(w.tcfg),
        samples_per_prompt=w.S, matmul_peak_gflops=w.peak, rollout=roll, **steps, kernel_floor_l1=floor,
        peak_mem_mb=w.mem))))

# ----------------------------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # before we add to it
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.teacher:
        return bench_checkpoints(args, load, sys.argv[1:] if argv is None else list(argv))
    w = reference_workload(args)
    roll, fl = bench_rollout(w)
    with group_of_one(w.device):
        run, rows = distill_setup(w)
        variants, steps = bench_steps(w, run, rows)
        floor, floor_error = what_bounds(w, step_parts(w, run, rows[1]), steps["step_l1"])
    report(w, load, roll, fl, variants, steps, floor, floor_error)


if __name__ == "__main__":
    main()

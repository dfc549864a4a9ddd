"""Does torch.compile pay off outside the decode step? Teacher scoring (no grad) and the student's forward +
fused loss + backward, the student being every third block of the teacher, on fixed shapes (BATCH x (64 +
128) random tokens), eager, then with every block compiled (Module.compile, per block as torchtitan does).
docs/benchmarks.md gives the figures.

    python docs/compile_blocks.py checkpoints/teacher cpu 4
    python docs/compile_blocks.py hf/smollm2-135m-instruct cuda 64
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from checkpoint import load_pretrained
from model import keep_layers
from losses import head_divergence_loss
from rollout import pack
from teacher import score, head_weight
ckpt, dev, B = sys.argv[1], torch.device(sys.argv[2]), int(sys.argv[3])
P, N = 64, 128  # the teacher's context need not cover it: RoPE positions have no limit here
bf16 = dev.type == "cuda"
sync = torch.cuda.synchronize if bf16 else (lambda: None)
teacher = load_pretrained(ckpt).to(dev)
student = keep_layers(teacher, list(range(0, teacher.cfg.n_layer, 3))).to(dev).train()
g = torch.Generator().manual_seed(0)
V = teacher.cfg.vocab_size
batch = pack([torch.randint(V, (P,), generator=g).tolist() for _ in range(B)],
             [torch.randint(V, (N,), generator=g).tolist() for _ in range(B)], 0, dev)
c = batch.prompt_len
m = batch.mask[:, c:]
n_tok = m.sum().item()
w_t = head_weight(teacher, torch.bfloat16 if bf16 else None)

def t_part():
    with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
        return score(teacher, batch, start=c, hidden_states=True)

def s_part(h_t):
    with torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
        loss = student(batch.tokens, batch.pos, batch.valid, out_from=c - 1,
                       head=lambda h, w: head_divergence_loss(h[:, :-1], w, h_t, w_t, m, "rkl", n_tok)[0])
    loss.backward()
    student.zero_grad(set_to_none=True)

def timeit(fn, n=5):
    fn(); sync()
    ts = []
    for _ in range(n):
        sync(); t0 = time.perf_counter(); fn(); sync(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

h_t = t_part()
res = {"eager": (timeit(t_part), timeit(lambda: s_part(h_t)))}
t0 = time.perf_counter()
for b in list(teacher.blocks) + list(student.blocks):
    b.compile()
first = (timeit(t_part, 1), timeit(lambda: s_part(h_t), 1))
res["blocks compiled"] = (timeit(t_part), timeit(lambda: s_part(h_t)))
print(f"compile (both warm-ups): {time.perf_counter() - t0:.1f} s")
print(f"batch {B} x ({P} + {N}), {dev}, {'bf16' if bf16 else 'fp32'}")
for k, (a, b) in res.items():
    print(f"{k:<16} teacher score {a * 1e3:8.1f} ms   student fwd+loss+bwd {b * 1e3:8.1f} ms")

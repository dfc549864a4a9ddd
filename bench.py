"""Benchmarks, measured side by side in one run (ratios mean something on a noisy machine; absolute
times only on a quiet one or a GPU).

    python bench.py                                   # rollout: KV cache vs full recompute, teacher-sized model
    python bench.py --n-layer 2 --d-model 64 --batch-size 64

Rollout throughput counts generated tokens (rows x new tokens, no early stop) per second, as the median
of --repeats runs after one warm-up. The last stdout line is one JSON object.
"""
import argparse
import json
import statistics
import time

import torch

from model import GPT, GPTConfig
from rollout import generate, left_pad, sample_token


@torch.no_grad()
def generate_no_cache(model, ids, valid, max_new_tokens, temperature=0.0):
    """The reference: recompute the whole (left-padded) sequence for every new token."""
    from model import positions_from_valid
    for _ in range(max_new_tokens):
        logits = model(ids, positions_from_valid(valid), valid)[:, -1]
        tok = sample_token(logits, temperature)
        ids = torch.cat([ids, tok[:, None]], 1)
        valid = torch.cat([valid, torch.ones_like(tok[:, None], dtype=torch.bool)], 1)
    return ids


def timed(fn, repeats, sync):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=23)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=14)
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                    d_mlp=4 * args.d_model, max_seq_len=args.prompt_len + args.new_tokens + 1)
    model = GPT(cfg).to(device).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(4, cfg.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(args.prompt_len // 2, args.prompt_len, (args.batch_size,), generator=g)]
    ids, valid = left_pad(prompts, 0, device)
    no_eos = -1  # never stop early: every row generates exactly new_tokens
    cached = timed(lambda: generate(model, ids, valid, args.new_tokens, no_eos, 0, temperature=0.0), args.repeats, sync)
    full = timed(lambda: generate_no_cache(model, ids, valid, args.new_tokens), args.repeats, sync)
    # same tokens from both (greedy): the speed-up is not bought with a different result
    same = torch.equal(generate(model, ids, valid, args.new_tokens, no_eos, 0, temperature=0.0).tokens,
                       generate_no_cache(model, ids, valid, args.new_tokens))
    n_tok = args.batch_size * args.new_tokens
    res = dict(device=str(device), params=sum(p.numel() for p in model.parameters()), batch=args.batch_size,
               prompt_len=ids.size(1), new_tokens=args.new_tokens, kv_cache_tok_s=round(n_tok / cached),
               no_cache_tok_s=round(n_tok / full), speedup=round(full / cached, 2), same_tokens=same,
               threads=torch.get_num_threads())
    print(f"{'rollout':<22}{'tok/s':>10}")
    print(f"{'KV cache':<22}{res['kv_cache_tok_s']:>10}")
    print(f"{'full recompute':<22}{res['no_cache_tok_s']:>10}")
    print(f"speed-up x{res['speedup']}, same tokens: {same}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()

"""Countdown accuracy of a checkpoint on a held-out split.

    python eval_countdown.py checkpoints/teacher                  # greedy accuracy on the test split
    python eval_countdown.py runs/sft --split val --n 200         # a run directory: its latest checkpoint
    python eval_countdown.py CKPT --sample-temperature 1.0 --samples 4   # plus sampled accuracy

Prints accuracy, the format-valid rate (the answer has the step-list shape, right or wrong), the mean
answer length in tokens, and a few examples; the last stdout line is one JSON object.
"""
import argparse
import json
import sys
import time

import torch

from data.countdown import (EOS, PAD, TOKENIZER_PATH, is_well_formed, load_split, prompt_ids, prompt_text,
                            verify)
from model import CheckpointError, load_pretrained, load_tokenizer_for, resolve_checkpoint
from rollout import generate, left_pad


def countdown_eval(model, tok, problems, batch_size=256, temperature=0.0, generator=None, max_new_tokens=24):
    """Decode every problem once; returns a list of dicts (prompt, answer, correct, well_formed, n_tokens)."""
    eos, pad = tok.token_to_id(EOS), tok.token_to_id(PAD)
    device = next(model.parameters()).device
    rows = []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        ids, valid = left_pad([prompt_ids(tok, n, t) for n, t, _ in chunk], pad, device)
        batch = generate(model, ids, valid, max_new_tokens, eos, pad, temperature=temperature, generator=generator)
        for (nums, target, _), comp in zip(chunk, batch.completions()):
            ended = len(comp) > 0 and comp[-1] == eos
            text = tok.decode(comp[:-1] if ended else comp)
            rows.append(dict(prompt=prompt_text(nums, target), answer=text, n_tokens=len(comp),
                             correct=ended and verify(nums, target, text),
                             well_formed=ended and is_well_formed(text)))
    return rows


def summarize(rows):
    n = max(len(rows), 1)
    return dict(accuracy=sum(r["correct"] for r in rows) / n, format_valid=sum(r["well_formed"] for r in rows) / n,
                mean_tokens=sum(r["n_tokens"] for r in rows) / n, n=len(rows))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--n", type=int, default=0, help="first N problems of the split (0 = all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--sample-temperature", type=float, default=None, help="also report sampled accuracy")
    p.add_argument("--samples", type=int, default=1, help="samples per problem for sampled accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=5, help="examples to print")
    p.add_argument("--tokenizer", default=TOKENIZER_PATH, help="used when the checkpoint has no tokenizer.json")
    args = p.parse_args(argv)
    if args.n < 0 or args.batch_size < 1 or args.samples < 1 or args.max_new_tokens < 1:
        p.error("--n must be >= 0, --batch-size, --samples and --max-new-tokens >= 1")
    if args.sample_temperature is not None and args.sample_temperature <= 0:
        p.error("--sample-temperature must be > 0")
    try:
        path = resolve_checkpoint(args.ckpt)
        tok = load_tokenizer_for(path, args.tokenizer)
        model = load_pretrained(path)
    except (CheckpointError, ValueError) as e:
        print(f"eval_countdown.py: error: {e}", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    problems = load_split(args.split)
    problems = problems[:args.n] if args.n else problems
    t0 = time.time()
    rows = countdown_eval(model, tok, problems, args.batch_size, 0.0, max_new_tokens=args.max_new_tokens)
    result = dict(ckpt=path, split=args.split, **{f"greedy_{k}" if k != "n" else k: v for k, v in summarize(rows).items()})
    for r in rows[:args.show]:
        print(f"{'ok ' if r['correct'] else 'BAD'} {r['prompt']}{r['answer']}")
    if args.sample_temperature is not None:
        g = torch.Generator().manual_seed(args.seed)
        srows = [r for _ in range(args.samples) for r in
                 countdown_eval(model, tok, problems, args.batch_size, args.sample_temperature, g, args.max_new_tokens)]
        result.update(sample_temperature=args.sample_temperature, samples=args.samples,
                      sampled_accuracy=summarize(srows)["accuracy"])
    result["seconds"] = round(time.time() - t0, 2)
    print(f"{args.split}: greedy accuracy {result['greedy_accuracy']:.3f}, format-valid {result['greedy_format_valid']:.3f}, "
          f"mean answer {result['greedy_mean_tokens']:.1f} tokens, n={result['n']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Arithmetic: a second task in the Countdown tokenizer, for the continual-learning recipe
(docs/continual.md). A model fine-tuned on it forgets some Countdown; distilling from its own earlier
checkpoint brings Countdown back.

    prompt:  "13*2-14="        three numbers from 1-20 and two of + - *, usual precedence
    answer:  "12"              the value, possibly negative

A problem is (expression, value, answer text), the shape of a Countdown problem (numbers, target, answer),
so ArithFormat plugs into everything a Countdown format does (training rows, rollouts, eval). The values
come from the generator's own integers, and an answer is right when its text is exactly the value's: no
model output is ever evaluated.

    python -m data.arith            # split sizes and examples
"""
import itertools
import random
import re
from functools import lru_cache

from data.countdown import BOS, CharFormat, split_by_hash

NUM_LO, NUM_HI = 1, 20
OPS = "+-*"
SPLIT_PERMILLE = {"test": 40, "val": 20}


def value(a, op1, b, op2, c):
    """a op1 b op2 c with * before + and -."""
    apply = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
    if op2 == "*" and op1 != "*":
        return apply[op1](a, b * c)
    return apply[op2](apply[op1](a, b), c)


def _split_of(expr):
    return split_by_hash(f"arith:{expr}", SPLIT_PERMILLE)


@lru_cache(maxsize=None)
def load_split(split):
    """The problems of a split, (expression, value, answer), in a fixed shuffled order; the splits are
    disjoint (a stable hash of the expression) and never change. All 20^3 x 3^2 = 72,000 expressions."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r} (train, val, test)")
    nums = range(NUM_LO, NUM_HI + 1)
    probs = []
    for a, b, c in itertools.product(nums, nums, nums):
        for op1, op2 in itertools.product(OPS, OPS):
            expr = f"{a}{op1}{b}{op2}{c}"
            if _split_of(expr) == split:
                v = value(a, op1, b, op2, c)
                probs.append((expr, v, str(v)))
    random.Random(f"arith-{split}").shuffle(probs)
    return tuple(probs)


class ArithFormat(CharFormat):
    """[BOS] + "13*2-14=" -> "12" + [EOS]: Countdown's char format with this task's prompts and check."""

    def __init__(self, tok):
        super().__init__(tok)
        if any(tok.token_to_id(c) is None for c in "0123456789+-*="):
            raise ValueError("the arithmetic task needs a char tokenizer with digits and + - * = (the Countdown "
                             "char tokenizer)")

    def prompt_ids(self, expr, value):
        return [self.tok.token_to_id(BOS)] + self.tok.encode(expr + "=").ids

    def prompts(self, problems):
        return [self.prompt_ids(e, v) for e, v, _ in problems]

    def verify(self, expr, value, text):
        return text == str(value)

    def well_formed(self, text):
        return re.fullmatch(r"-?\d+", text) is not None


if __name__ == "__main__":
    for s in ("train", "val", "test"):
        print(s, len(load_split(s)), load_split(s)[:3])

"""Tests for data/countdown.py: verifier, solver, splits, text format, tokenizer and chat answer format.

The verifier and the solver are checked against small references written here from the rules alone
(Fractions / plain ints over our own parse of the text); nothing below reuses data.countdown's internals
(apply_op, _STEP_RE, _universe, _split_of) as an oracle. The chat format's expressions are checked against
Python's own parser restricted to + - * / on integer literals, with Fraction arithmetic (in the tests only).
"""
import ast  # the reference expression evaluator only; data/countdown.py never uses it
import gc
import hashlib
import itertools
import json
import os
import random
import re
import subprocess
import sys
import time
import warnings
from collections import Counter
from fractions import Fraction

import pytest

from data import countdown as cd
from data.countdown import (MAX_TARGET, N_NUMBERS, NUM_HI, NUM_LO, TOKENIZER_PATH, build_tokenizer,
                            chat_prompt_text, extract_answer, format_expression_answer, format_steps,
                            is_well_formed, load_split, load_tokenizer, parse_prompt, prompt_text, solve,
                            solve_all, steps_to_expression, verify, verify_chat, verify_expression)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ("train", "val", "test")
DIGITS = "0123456789"


# ------------------------------------------------------------------------------ independent references

def ref_parse(text):
    """Our own parse of an answer: list of (a, op, b, c) ints, or None if the text is not a step list.

    No regexes: a step is ASCII digits, one operator, ASCII digits, '=', ASCII digits."""
    steps = []
    for part in text.split(","):
        if part.count("=") != 1:
            return None
        lhs, rhs = part.split("=")
        ops = [i for i, ch in enumerate(lhs) if ch in "+-*/"]
        if len(ops) != 1:
            return None
        i = ops[0]
        a, op, b = lhs[:i], lhs[i], lhs[i + 1:]
        for s in (a, b, rhs):
            if not s or any(ch not in DIGITS for ch in s):
                return None
        steps.append((int(a), op, int(b), int(rhs)))
    return steps


def ref_check(numbers, target, text):
    """Rules, independently: every operand taken from the pool (given numbers + earlier results, each once),
    the exact rational result must be a positive integer equal to the written one, final pool == [target]."""
    steps = ref_parse(text)
    if steps is None:
        return False
    pool = list(numbers)
    for a, op, b, c in steps:
        for x in (a, b):
            if x not in pool:
                return False
            pool.remove(x)
        fa, fb = Fraction(a), Fraction(b)
        if op == "+":
            v = fa + fb
        elif op == "-":
            v = fa - fb
        elif op == "*":
            v = fa * fb
        else:
            if fb == 0:
                return False
            v = fa / fb
        if v.denominator != 1 or v <= 0 or v != c:
            return False
        pool.append(c)
    return sorted(pool) == [target]


def ref_reachable(nums):
    """Every value reachable from `nums` (all numbers used) under the rules: plain-int brute force over
    ordered pairs."""
    nums = tuple(nums)
    if len(nums) == 1:
        return {nums[0]}
    out = set()
    for i, j in itertools.permutations(range(len(nums)), 2):
        a, b = nums[i], nums[j]
        rest = tuple(nums[k] for k in range(len(nums)) if k not in (i, j))
        vals = [a + b, a * b]
        if a - b > 0:
            vals.append(a - b)
        if b != 0 and a % b == 0 and a // b > 0:
            vals.append(a // b)
        for v in vals:
            out |= ref_reachable(rest + (v,))
    return out


def all_multisets():
    return list(itertools.combinations_with_replacement(range(NUM_LO, NUM_HI + 1), N_NUMBERS))


# ------------------------------------------------------------------------------------- verifier: accept

@pytest.mark.parametrize("numbers,target,answer", [
    ((3, 7, 13), 88, "7*13=91,91-3=88"),
    ((3, 7, 13), 88, "13*7=91,91-3=88"),           # operand order of a commutative op is free
    ((3, 7, 13), 23, "3+7=10,10+13=23"),
    ((3, 7, 13), 23, "13+3=16,7+16=23"),           # intermediate as the second operand
    ((2, 6, 8), 24, "6/2=3,8*3=24"),               # exact division
    ((2, 6, 8), 4, "8-6=2,2*2=4"),                  # result equal to a given number, both used
    ((5, 5, 10), 20, "5+5=10,10+10=20"),            # reused *equal value*: given 10 + computed 10
    ((5, 5, 10), 10, "5/5=1,10*1=10"),
    ((5, 5, 10), 10, "10/5=2,5*2=10"),
    ((5, 5, 10), 1, "5+5=10,10/10=1"),
    ((1, 1, 1), 3, "1+1=2,2+1=3"),
    ((20, 20, 20), 8000, "20*20=400,400*20=8000"),
    ((1, 2), 3, "1+2=3"),                            # other problem sizes work too
    ((1, 2, 3, 4), 24, "1*2=2,2*3=6,6*4=24"),
])
def test_verify_accepts_correct_answers(numbers, target, answer):
    assert ref_check(numbers, target, answer)  # the hand-written case is right by the reference too
    assert verify(numbers, target, answer) is True
    assert is_well_formed(answer, len(numbers))


def test_verify_accepts_numbers_in_any_container_order():
    assert verify([13, 3, 7], 88, "7*13=91,91-3=88") is True
    assert verify((7, 3, 13), 88, "7*13=91,91-3=88") is True


# ------------------------------------------------------------------------------------- verifier: reject

def _rejected(numbers, target, answer):
    assert ref_check(numbers, target, answer) is False, "test case itself is not wrong"
    return verify(numbers, target, answer) is False


def test_verify_rejects_number_reused():
    assert _rejected((3, 7, 13), 62, "7*7=49,49+13=62")        # 7 used twice, 3 never
    assert _rejected((2, 3, 4), 10, "2+3=5,5+5=10")            # an intermediate used twice
    assert _rejected((5, 5, 10), 125, "5*5=25,25*5=125")       # two 5s given, three used
    assert _rejected((5, 5, 10), 25, "10+10=20,20+5=25")        # one 10 given, two used
    assert _rejected((3, 7, 13), 182, "7*13=91,91+91=182")


def test_verify_rejects_number_missing():
    assert _rejected((3, 7, 13), 91, "7*13=91")                 # too few steps: 3 left over
    assert _rejected((3, 7, 13), 91, "7*13=91,")                # empty second step
    assert _rejected((1, 2, 3, 4), 6, "1*2=2,2*3=6")            # 4 left over
    assert _rejected((3, 7, 13), 88, "")


def test_verify_rejects_number_not_given():
    assert _rejected((3, 7, 13), 88, "8*11=88,88*1=88")
    assert _rejected((3, 7, 13), 88, "7*12=84,84+4=88")
    assert verify((3, 7, 13), 94, "7*13=91,91+3=94") is True   # control: the honest version passes
    assert _rejected((3, 7, 13), 94, "7*13=91,92+2=94")         # uses an intermediate that does not exist


def test_verify_rejects_wrong_arithmetic():
    assert _rejected((3, 7, 13), 87, "7*13=91,91-3=87")
    assert _rejected((3, 7, 13), 60, "7+13=21,21*3=60") and _rejected((3, 7, 13), 63, "7+13=21,21*3=63")
    assert _rejected((2, 6, 8), 32, "6/2=4,8*4=32")
    assert _rejected((3, 7, 13), 88, "7*13=91,91-3=89")


def test_verify_rejects_non_exact_division():
    # 7/2=3 (floor) would leave exactly {3, 3}; 3*3=9 is then fine: only the division is wrong.
    assert _rejected((2, 3, 7), 9, "7/2=3,3*3=9")
    assert _rejected((2, 3, 7), 12, "7/2=4,4*3=12")
    assert _rejected((3, 7, 13), 30, "13/3=4,4+7=11") and _rejected((3, 7, 13), 11, "13/3=4,4+7=11")
    assert _rejected((3, 5, 8), 8, "3/5=0,0+8=8")
    assert _rejected((3, 5, 8), 8, "5/0=0,3+5=8")


def test_verify_rejects_non_positive_result():
    assert _rejected((5, 5, 8), 8, "5-5=0,8+0=8")               # zero
    assert _rejected((3, 5, 8), 16, "3-5=2,8*2=16")             # 3-5 is -2: not '2'
    assert _rejected((3, 5, 8), 6, "3-5=-2,8-2=6")              # negative literal is not a number
    assert _rejected((3, 5, 8), 16, "5-3=2,2-8=6") and _rejected((3, 5, 8), 6, "5-3=2,2-8=6")
    # a zero *given* number must not let a step produce 0 either (outside the configured range, same rules)
    assert verify((0, 3, 5), 8, "0+3=3,3+5=8") is True        # control
    assert _rejected((0, 3, 5), 3, "5*0=0,0+3=3")
    assert _rejected((0, 3, 5), 5, "0/3=0,5+0=5")


def test_verify_rejects_wrong_target():
    assert verify((3, 7, 13), 88, "7*13=91,91-3=88") is True
    for t in (87, 89, 91, 0, -88, 880):
        assert _rejected((3, 7, 13), t, "7*13=91,91-3=88")


def test_verify_rejects_extra_steps():
    assert _rejected((3, 7, 13), 88, "7*13=91,91-3=88,88*1=88")
    assert _rejected((3, 7, 13), 88, "7*13=91,91-3=88,88-0=88")
    assert _rejected((3, 7, 13), 88, "7*13=91,91-3=88,7*13=91")
    assert _rejected((3, 7, 13), 88, "7*13=91,91-3=88,")
    assert _rejected((1, 2), 3, "1+2=3,3*1=3")


@pytest.mark.parametrize("junk", [
    "7 * 13 = 91, 91 - 3 = 88",
    "7*13=91, 91-3=88",
    "7*13=91 ,91-3=88",
    "7*13 =91,91-3=88",
    "7*13=91,\t91-3=88",
    "7*13=91\n91-3=88",
    "7*13=91;91-3=88",
    "7*13=91,,91-3=88",
    "7x13=91,91-3=88",
    "7×13=91,91-3=88",
    "7*13=91,91−3=88",              # unicode minus
    "7*13=91,91-3=88.",
    "7*13=91,91-3=88=88",
    "7*13=91,91-3=88\x00",
    "\x007*13=91,91-3=88",
    "(7*13)=91,91-3=88",
    "7*13-3=88",
    "7*13=91,91-3=88 answer",
    "answer: 7*13=91,91-3=88",
    "+7*13=91,91-3=88",
    "7*+13=91,91-3=88",
    "7*13=91.0,91.0-3=88",
    "7*13=91,91-3=88.0",
    "٧*١٣=٩١,٩١-٣=٨٨",              # arabic-indic digits
    "７*１３=９１,９１-３=８８",      # fullwidth digits
    "٧*13=91,91-3=88", "7*١٣=91,91-3=88", "7*13=٩١,91-3=88", "7*13=91,91-٣=88",  # one non-ASCII digit
    "７*13=91,91-3=88", "7*13=91,91-3=8８", "7*13=91,91-3=𝟖𝟖",
    "7**13=91,91-3=88",
    "7*13=+91,91-3=88",
    "7*13=91,91-3=88,",
    ",7*13=91,91-3=88",
    "7*13=91,91-3=88" + " " * 300,  # over the length cap
])
def test_verify_rejects_format_junk(junk):
    assert verify((3, 7, 13), 88, "7*13=91,91-3=88") is True
    assert verify((3, 7, 13), 88, junk) is False
    assert not is_well_formed(junk)


def test_is_well_formed_is_about_shape_only():
    assert is_well_formed("7*13=91,91-3=88")
    assert is_well_formed("1+1=5,9/9=9")                        # wrong but well-formed
    assert not is_well_formed("7*13=91")                        # one step short for 3 numbers
    assert is_well_formed("7*13=91", n_numbers=2)
    for bad in (None, 42, b"7*13=91,91-3=88", "", "7*13=91,91-3"):
        assert not is_well_formed(bad)


# ------------------------------------------------------------------ verifier vs an independent reference

def _random_candidate(rng):
    """A random step list over a random problem: usually built from the pool, sometimes off in one way."""
    n = rng.choice([3, 3, 3, 2, 4])
    hi = rng.choice([20, 20, 10, 100])
    numbers = [rng.randint(1, hi) for _ in range(n)]
    if rng.random() < 0.3:
        numbers[1] = numbers[0]  # duplicates
    pool = list(numbers)
    steps = []
    n_steps = n - 1 + (rng.choice([-1, 1]) if rng.random() < 0.1 else 0)
    for _ in range(max(n_steps, 1)):
        if len(pool) >= 2 and rng.random() < 0.9:
            a, b = rng.sample(pool, 2)
        else:
            a, b = rng.choice(pool + [rng.randint(0, hi)]), rng.randint(0, hi)
        if rng.random() < 0.5 and a < b:
            a, b = b, a
        op = rng.choice("+-*/")
        if op == "+":
            c = a + b
        elif op == "-":
            c = a - b
        elif op == "*":
            c = a * b
        else:
            c = a // b if b else 0
        r = rng.random()
        if r < 0.05:
            c += rng.choice([-1, 1])
        elif r < 0.07:
            c = rng.randint(0, 2 * hi)
        for x in (a, b):
            if x in pool:
                pool.remove(x)
        pool.append(c)
        steps.append((a, op, b, c))
    target = pool[-1] if rng.random() < 0.9 else rng.randint(1, 2 * hi)
    if rng.random() < 0.5:
        numbers.sort()
    return tuple(numbers), target, ",".join(f"{a}{op}{b}={c}" for a, op, b, c in steps)


def _mutate(rng, text):
    chars = list(text)
    for _ in range(rng.randint(1, 3)):
        k = rng.random()
        pos = rng.randrange(len(chars) + 1)
        if k < 0.4:
            chars.insert(pos, rng.choice("0123456789+-*/=,"))
        elif k < 0.7 and chars:
            del chars[min(pos, len(chars) - 1)]
        elif chars:
            chars[min(pos, len(chars) - 1)] = rng.choice("0123456789+-*/=,")
    return "".join(chars)


def test_verify_agrees_with_independent_reference_on_random_candidates():
    rng = random.Random(20240611)
    counts = {True: 0, False: 0}
    for _ in range(15000):
        numbers, target, text = _random_candidate(rng)
        want = ref_check(numbers, target, text)
        got = verify(numbers, target, text)
        assert got is want, (numbers, target, text)
        if got:
            assert is_well_formed(text, len(numbers)), text
        counts[want] += 1
    # The generator must exercise both outcomes substantially, or agreement means little.
    assert counts[True] > 3000 and counts[False] > 3000, counts


def test_verify_agrees_with_independent_reference_on_mutated_solutions():
    rng = random.Random(7)
    problems = load_split("test")
    counts = {True: 0, False: 0}
    for _ in range(6000):
        numbers, target, ans = rng.choice(problems)
        text = _mutate(rng, ans)
        t = target if rng.random() < 0.8 else rng.randint(1, MAX_TARGET)
        want = ref_check(numbers, t, text)
        assert verify(numbers, t, text) is want, (numbers, t, text)
        counts[want] += 1
    assert counts[False] > 1000 and counts[True] > 50, counts


def test_verify_agrees_with_reference_on_all_short_alternatives():
    """Exhaustive over one problem: every (pair, op, pair, op) step list with correct or off-by-one results."""
    numbers = (2, 4, 8)
    seen_true = 0
    for t in (1, 2, 4, 6, 8, 10, 12, 14, 16, 32, 64):
        for a, b in itertools.permutations(numbers, 2):
            rest = list(numbers)
            rest.remove(a)
            rest.remove(b)
            for op1 in "+-*/":
                for c in {a + b, a - b, a * b, a // b, a // b + 1}:
                    for x, y in ((rest[0], c), (c, rest[0])):
                        for op2 in "+-*/":
                            for d in (t, t + 1):
                                text = f"{a}{op1}{b}={c},{x}{op2}{y}={d}"
                                want = ref_check(numbers, t, text)
                                seen_true += want
                                assert verify(numbers, t, text) is want, (t, text)
    assert seen_true > 20


# ------------------------------------------------------------------------- verifier: robustness / speed

class _EvilStr(str):
    def strip(self, *a):
        raise RuntimeError("boom")

    def __len__(self):
        raise RuntimeError("boom")


def _adversarial_inputs(rng):
    fixed = [
        "9" * 10000, "9" * 256, "9" * 257, "9" * 9 + "*" + "9" * 9 + "=" + "9" * 18,
        "9999999*9999999=99999980000001,1*1=1", "1" * 7 + "*" + "1" * 7 + "=" + "1" * 9 + ",1+1=2",
        "**", "99**99**99", "9**9**9**9", "2**2**2**2**2**2**2**2=1,1+1=2",
        "(" * 5000, "(" * 5000 + ")" * 5000, "(((7*13)))=91,91-3=88", "[" * 200 + "]" * 56,
        "٣", "٣*٣=٩,٩+٣=١٢", "７*１３=９１,９１-３=８８", "𝟕*𝟏𝟑=𝟗𝟏,𝟗𝟏-𝟑=𝟖𝟖", "\u0663" * 300,
        "\x00", "\x00" * 300, "7*13=91\x00,91-3=88", "a\x00b",
        "NaN", "nan=nan,nan=nan", "inf", "1e9999", "1e9999*1=1e9999,1+1=2", "0x10*1=16,16+1=17",
        "__import__('os').system('echo pwned')", "lambda: 0", "eval('1+1')", "7*13=91,91-3=88; import os",
        "," * 255, "," * 10000, "=" * 255, "-" * 255, "1-" * 128, "1," * 128, "1=" * 128,
        "0/0=0,0/0=0", "7/0=0,0+3=3", "0-0=0,0*0=0", "00000000*0=0,0+0=0",
        "\ud800", "\udfff*1=1,1+1=2", "\U0001F600" * 100, "\u202e7*13=91,91-3=88",
        " " * 256, "\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u2028\u3000", "7*13=91,91-3=88" * 20,
        "", " ", "\n", ",", "=", "+", "-", "*", "/", "1", "1=1", "1+1", "+1=1",
        "9999999+9999999=19999998,19999998-1=19999997",
    ]
    out = list(fixed)
    printable = [chr(c) for c in range(32, 127)]
    # 10 kB of random garbage, several flavours
    out.append("".join(rng.choice(printable) for _ in range(10000)))
    out.append("".join(chr(rng.randrange(0, 0x110000)) for _ in range(10000)))
    out.append(bytes(rng.randrange(256) for _ in range(10000)).decode("latin-1"))
    # thousands of short random strings: answer alphabet, printable, and arbitrary code points
    answer_alpha = "0123456789+-*/=, "
    for i in range(4000):
        n = rng.randint(0, 300)
        if i % 3 == 0:
            s = "".join(rng.choice(answer_alpha) for _ in range(n))
        elif i % 3 == 1:
            s = "".join(rng.choice(printable) for _ in range(n))
        else:
            s = "".join(chr(rng.randrange(0, 0x110000)) for _ in range(min(n, 80)))
        out.append(s)
    # valid answers with junk spliced in
    for _ in range(1000):
        base = "7*13=91,91-3=88"
        pos = rng.randrange(len(base) + 1)
        junk = rng.choice(["9" * rng.randint(1, 400), "**", "(" * rng.randint(1, 300), "\x00", "٣", "-", ","])
        out.append(base[:pos] + junk + base[pos:])
    # non-str inputs
    out += [None, 0, 88, -1, 3.14, float("nan"), float("inf"), True, b"7*13=91,91-3=88",
            bytearray(b"7*13=91,91-3=88"), ["7*13=91", "91-3=88"], ("7*13=91,91-3=88",), {"a": 1},
            object(), 10 ** 5000, _EvilStr("7*13=91,91-3=88"), memoryview(b"1+1=2"), Ellipsis]
    return out


def test_verify_never_raises_always_bool_and_fast():
    rng = random.Random(12345)
    inputs = _adversarial_inputs(rng)
    assert len(inputs) > 5000
    problems = [((3, 7, 13), 88), ((5, 5, 10), 20), ((1, 2, 3, 4), 24)]
    # odd problem arguments must not make it raise either
    odd_problems = [(None, 88), ((), 0), ((1,), 1), (("a", "b", "c"), 88), ((float("nan"), 1, 2), 3),
                    ((3, 7, 13), None), ((3, 7, 13), "x"), (12, 12)]

    def timed(nums, target, s):
        t0 = time.perf_counter()
        r = verify(nums, target, s)
        return r, time.perf_counter() - t0

    worst = 0.0
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i, s in enumerate(inputs):
            nums, target = problems[i % len(problems)]
            r, dt = timed(nums, target, s)
            assert type(r) is bool, (repr(s)[:80], r)
            if dt >= 0.05:  # a preempted call on a loaded machine: re-time; a slow input stays slow
                dt = min(timed(nums, target, s)[1] for _ in range(3))
            worst = max(worst, dt)
        for nums, target in odd_problems:
            for s in ("7*13=91,91-3=88", "1+2=3", "", None, "9" * 10000):
                r, _ = timed(nums, target, s)
                assert type(r) is bool
    finally:
        if gc_was_enabled:
            gc.enable()
    assert worst < 0.05, f"slowest verify call took {worst * 1000:.1f} ms"
    # every adversarial input above is wrong for (3,7,13)->88 except the exact answer, which is not among them
    assert not any(verify((3, 7, 13), 88, s) for s in inputs[:60])


# -------------------------------------------------------------------------------------------- solver

def test_solve_all_matches_independent_brute_force():
    for nums in all_multisets():
        found = solve_all(nums)
        assert set(found) == ref_reachable(nums), nums


def test_solve_all_results_all_verify():
    sample = all_multisets() + [(1, 1, 1), (20, 20, 20), (5, 5, 10), (1, 2, 3, 4), (7, 9)]
    n = 0
    for nums in sample:
        for target, steps in solve_all(nums).items():
            text = format_steps(steps)
            assert verify(nums, target, text) is True, (nums, target, text)
            assert ref_check(nums, target, text), (nums, target, text)
            n += 1
    assert n > 20000


def test_solve_returns_none_for_unreachable_targets():
    assert ref_reachable((1, 1, 1)) == {1, 2, 3}
    for t in (4, 5, 100, 0, -1, 10 ** 9):
        assert solve((1, 1, 1), t) is None
    assert solve((1, 1, 1), 3) is not None and verify((1, 1, 1), 3, solve((1, 1, 1), 3))
    rng = random.Random(5)
    checked = 0
    for nums in rng.sample(all_multisets(), 120):
        reach = ref_reachable(nums)
        for t in range(1, MAX_TARGET + 1):
            s = solve(nums, t)
            if t in reach:
                assert s is not None and verify(nums, t, s), (nums, t, s)
            else:
                assert s is None, (nums, t, s)
                checked += 1
    assert checked > 500


def test_solve_is_deterministic():
    assert solve((3, 7, 13), 88) == solve((3, 7, 13), 88)
    assert solve_all((4, 6, 9)) == solve_all((4, 6, 9))


# -------------------------------------------------------------------------------------------- splits

def test_every_split_problem_has_a_verified_answer():
    for split in SPLITS:
        probs = load_split(split)
        assert len(probs) > 0
        for nums, target, ans in probs:
            assert verify(nums, target, ans) is True, (split, nums, target, ans)
            assert is_well_formed(ans)


def test_splits_pairwise_disjoint_and_cover_the_universe():
    keys = {s: [(nums, t) for nums, t, _ in load_split(s)] for s in SPLITS}
    for s in SPLITS:
        assert len(keys[s]) == len(set(keys[s])), f"duplicates in {s}"
    sets = {s: set(k) for s, k in keys.items()}
    for a, b in itertools.combinations(SPLITS, 2):
        assert not (sets[a] & sets[b]), (a, b, sorted(sets[a] & sets[b])[:5])
    # The union is exactly the independently computed universe of solvable problems.
    universe = {(nums, t) for nums in all_multisets() for t in ref_reachable(nums) if 1 <= t <= MAX_TARGET}
    assert sets["train"] | sets["val"] | sets["test"] == universe
    # Held-out splits are small but not empty, as configured (4% / 2% by hash): loose bounds.
    n = len(universe)
    assert 0.02 * n < len(sets["test"]) < 0.06 * n
    assert 0.01 * n < len(sets["val"]) < 0.03 * n


def test_split_contents_within_configured_ranges():
    for s in SPLITS:
        for nums, target, ans in load_split(s):
            assert isinstance(nums, tuple) and len(nums) == N_NUMBERS
            assert all(type(x) is int and NUM_LO <= x <= NUM_HI for x in nums), nums
            assert list(nums) == sorted(nums), nums
            assert type(target) is int and 1 <= target <= MAX_TARGET, target
            assert isinstance(ans, str)


def test_unknown_split_raises():
    with pytest.raises(ValueError):
        load_split("dev")


def _split_hash(probs):
    return hashlib.sha256(repr(tuple(probs)).encode()).hexdigest()


def test_splits_deterministic_within_and_across_processes():
    for s in SPLITS:
        assert load_split(s) == load_split(s)
    # Rebuild from scratch (no cache) in this process too.
    fresh = [p for p in cd._universe.__wrapped__()]
    assert len(fresh) == sum(len(load_split(s)) for s in SPLITS)
    code = ("import hashlib; from data.countdown import load_split; "
            "print(hashlib.sha256(repr(tuple(load_split('test'))).encode()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="987654321")  # a different str-hash seed must not matter
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _split_hash(load_split("test"))


# -------------------------------------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_tokenizer_file_loads_with_special_ids(tok):
    assert os.path.isfile(TOKENIZER_PATH)
    assert tok.token_to_id(cd.PAD) == 0
    assert tok.token_to_id(cd.BOS) == 1
    assert tok.token_to_id(cd.EOS) == 2
    assert tok.token_to_id(cd.UNK) == 3
    for ch in "0123456789+-*/=,>: ":
        assert tok.token_to_id(ch) is not None, repr(ch)


def test_build_tokenizer_matches_saved_file(tok):
    built = build_tokenizer()
    assert built.get_vocab() == tok.get_vocab()
    assert built.get_vocab_size() == tok.get_vocab_size()
    with open(TOKENIZER_PATH) as f:
        saved = json.load(f)
    assert built.get_vocab(with_added_tokens=False) == saved["model"]["vocab"]
    s = "3 7 13>88:7*13=91,91-3=88"
    assert built.encode(s).ids == tok.encode(s).ids
    assert built.decode(built.encode(s).ids) == s
    # the whole pipeline (pre-tokenizer, decoder, specials) serializes identically
    assert json.loads(built.to_str()) == saved


def test_tokenizer_round_trips_every_test_problem(tok):
    unk = tok.token_to_id(cd.UNK)
    for nums, target, ans in load_split("test"):
        text = prompt_text(nums, target) + ans
        ids = tok.encode(text).ids
        assert len(ids) == len(text)                      # character level
        assert unk not in ids
        assert tok.decode(ids) == text
        p, a = cd.prompt_ids(tok, nums, target), cd.answer_ids(tok, ans)
        assert p[0] == 1 and a[-1] == 2
        assert 1 not in p[1:] and 2 not in a[:-1] and 0 not in p + a
        assert tok.decode(p + a) == text                  # specials skipped on decode


def test_load_tokenizer_missing_path_raises_valueerror(tmp_path):
    with pytest.raises(ValueError) as e:
        load_tokenizer(tmp_path / "does_not_exist.json")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content", [
    b"\x00\xff garbage \x13\x37" * 50, b"", b"{}", b"[1, 2, 3]", b'{"version": "1.0", "model": ',
])
def test_load_tokenizer_corrupt_file_raises_valueerror(tmp_path, content):
    p = tmp_path / "tokenizer.json"
    p.write_bytes(content)
    with pytest.raises(ValueError) as e:
        load_tokenizer(p)
    assert "\n" not in str(e.value)


def test_load_tokenizer_without_special_tokens_raises_valueerror(tmp_path):
    from tokenizers import Tokenizer, models
    other = Tokenizer(models.WordLevel(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    p = tmp_path / "other.json"
    other.save(str(p))
    with pytest.raises(ValueError):
        load_tokenizer(p)


# -------------------------------------------------------------------------------------------- prompt text

def test_parse_prompt_inverts_prompt_text():
    assert prompt_text((3, 7, 13), 88) == "3 7 13>88:"
    for s in SPLITS:
        for nums, target, _ in load_split(s):
            assert parse_prompt(prompt_text(nums, target)) == (nums, target)
    rng = random.Random(11)
    for _ in range(2000):
        nums = tuple(rng.randint(0, 9999) for _ in range(rng.randint(1, 8)))
        target = rng.randint(0, 999999)
        assert parse_prompt(prompt_text(nums, target)) == (nums, target)


@pytest.mark.parametrize("junk", [
    "", "3 7 13>88", "3 7 13>88: ", " 3 7 13>88:", "3 7 13>88:\n", "3  7 13>88:", "3,7,13>88:",
    "3 7 13>-88:", "-3 7 13>88:", "3 7 13>88:7*13=91", "a b>c:", "٣ 7>88:", "3 7 13>８８:", ">88:",
    "3 7 13>:", "3 7 13:88>", "12345 1>2:", "1 2 3 4 5 6 7 8 9>1:", "3 7 13>1234567:", "3 7 13>>88:",
    "3 7 13>88::", "3\x007>88:", "9" * 10000, "(" * 5000,
])
def test_parse_prompt_rejects_junk(junk):
    with pytest.raises(ValueError):
        parse_prompt(junk)


@pytest.mark.parametrize("junk", [None, 42, b"3 7 13>88:"])
def test_parse_prompt_rejects_non_str_with_valueerror(junk):
    with pytest.raises(ValueError):
        parse_prompt(junk)


def test_verify_rejects_non_integer_target():
    assert verify((3, 7, 13), 88, "7*13=91,91-3=88")
    assert not verify((3, 7, 13), 88.5, "7*13=91,91-3=88")
    assert not verify((3, 7, 13), "88", "7*13=91,91-3=88")


# ------------------------------------------------------------------------------------ chat answer format

_EXPR_ALPHABET = set("0123456789+-*/() ")
_REF_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
            ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


class _NotAllowed(Exception):
    pass


def ref_expr(expr):
    """Reference reading of an answer expression: (Fraction value, list of literals), None if it is not
    one, "div0" if it divides by zero. Python's parser, restricted to BinOp(+ - * /) over int Constants
    (no unary operators, calls, tuples, ** or //), plus the rules' own limits: the alphabet, canonical
    literals (Python accepts "00"), the length and nesting caps."""
    if not isinstance(expr, str) or len(expr) > cd.MAX_EXPR_CHARS or any(ch not in _EXPR_ALPHABET for ch in expr):
        return None
    depth = max_depth = 0
    for ch in expr:
        depth += (ch == "(") - (ch == ")")
        max_depth = max(max_depth, depth)
    if max_depth > cd.MAX_EXPR_DEPTH or re.search(r"(?<![0-9])0[0-9]", expr):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "1 (2)" parses as a call, with a SyntaxWarning
            tree = ast.parse(expr.strip(" "), mode="eval")  # a leading space is an "unexpected indent"
    except SyntaxError:
        return None
    literals = []

    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _REF_OPS:
            return _REF_OPS[type(node.op)](ev(node.left), ev(node.right))
        raise _NotAllowed(type(node).__name__)

    try:
        value = ev(tree.body)
    except _NotAllowed:
        return None
    except ZeroDivisionError:
        return "div0"
    return value, literals


def ref_verify_expression(numbers, target, expr):
    r = ref_expr(expr)
    if r is None or r == "div0":
        return False
    value, literals = r
    return Counter(literals) == Counter(numbers) and value == target


def ref_extract(text):
    """Reference extract_answer by splitting: the text after the last opening tag, up to its closing tag."""
    if "<answer>" not in text:
        return None
    last = text.split("<answer>")[-1]
    if "</answer>" not in last:
        return None
    return last.split("</answer>")[0].strip()


@pytest.mark.parametrize("numbers,target,expr", [
    ((2, 13, 14), 12, "(13*2)-14"),
    ((2, 13, 14), 12, "13*2-14"),                       # precedence: * before -
    ((2, 13, 14), 12, " ( 13 * 2 ) - 14 "),             # spaces anywhere between tokens
    ((2, 13, 14), 12, "(((13*2))-(14))"),
    ((2, 4, 7), 14, "(7/2)*4"),                         # exact rational intermediate
    ((2, 4, 7), 14, "7/2*4"),                           # left-associative: (7/2)*4
    ((3, 5, 20), 12, "20-5-3"),                         # left-associative: (20-5)-3, not 20-(5-3)
    ((2, 5, 20), 2, "20/5/2"),
    ((2, 3, 7, 13), 44, "(3-7)*(2-13)"),                # negative intermediates are fine
    ((5, 5, 10), 20, "5+5+10"),                         # duplicate numbers, each used once
    ((0, 3, 5), 3, "0*5+3"),
    ((1, 2, 3, 4), 24, "1*2*3*4"),
    ((7,), 7, "7"),
    ((2, 13, 14), -12, "14-13*2"),                      # a negative value is a value like any other
    ((1,), 1, "(" * cd.MAX_EXPR_DEPTH + "1" + ")" * cd.MAX_EXPR_DEPTH),   # deepest nesting allowed
    ((10 ** 200,), 10 ** 200, str(10 ** 200)),
])
def test_verify_expression_accepts_correct_answers(numbers, target, expr):
    assert ref_verify_expression(numbers, target, expr), "test case itself is not right"
    assert verify_expression(numbers, target, expr) is True
    assert verify_expression(list(reversed(numbers)), target, expr) is True
    assert verify_chat(numbers, target, format_expression_answer(expr)) is True


@pytest.mark.parametrize("numbers,target,expr", [
    ((2, 13, 14), 13, "(13*2)-14"),                     # wrong target
    ((2, 13, 14), 12, "13*2-13"),                       # 13 reused, 14 missing
    ((2, 13, 14), 26, "13*2"),                          # 14 missing
    ((2, 13, 14), 12, "13*2-14+0"),                     # 0 not given
    ((2, 13, 14), 12, "13*2-14*1"),
    ((2, 2, 13, 14), 12, "13*2-14"),                    # one 2 missing
    ((5, 5, 10), 10, "(5-5)/10+10"),                    # control below: same numbers, division by zero
    ((5, 5, 10), 10, "10/(5-5)"),
    ((5, 5, 10), 0, "10/(5-5)"),
    ((0, 3, 5), 0, "3/0*5"),
    ((2, 4, 7), 14, "7//2*4"),
    ((2, 3, 2), 8, "2**3"), ((99, 99, 99), 1, "99**99**99"),
    ((2, 13, 14), 12, "-14+13*2"), ((3,), -3, "-3"), ((3,), 3, "--3"), ((2, 13, 14), 40, "13*2--14"),
    ((2, 13, 14), 12, "+13*2-14"), ((2, 13, 14), 12, "13*2+-14"), ((2, 13, 14), 40, "13*2+(+14)"),
    ((2, 13, 14), 12, "13*2.0-14"), ((2, 13, 14), 12, "13.*2-14"), ((2, 13, 14), 12, "13*2-1.4e1"),
    ((2, 13, 14), 12, "١٣*2-14"), ((2, 13, 14), 12, "１３*2-14"), ((2, 13, 14), 12, "13*2−14"),   # unicode
    ((3, 7, 13), 88, "7*13-٣"), ((3, 7, 13), 88, "７*13-3"), ((3, 7, 13), 88, "7*13-𝟑"),     # int() takes these
    ((2, 13, 14), 12, "13×2-14"), ((2, 13, 14), 12, "13x2-14"), ((2, 13, 14), 12, "13*2-1_4"),
    ((2, 13, 14), 12, "013*2-14"), ((0, 3, 5), 8, "00+3+5"),  # leading zeros: Python accepts "00"
    ((2, 13, 14), 12, "13*2-14=12"), ((2, 13, 14), 12, "13*2-14 = 12"), ((2, 13, 14), 12, "12"),
    ((2, 13, 14), 12, "(13*2)-14)"), ((2, 13, 14), 12, "((13*2)-14"), ((2, 13, 14), 12, ")13*2-14("),
    ((2, 13, 14), 12, "()13*2-14"), ((2, 13, 14), 12, "13(*2)-14"), ((2, 13, 14), 12, "(13)(2)-14"),
    ((2, 13, 14), 12, "13*2-1 4"), ((2, 13, 14), 26, "13*2 14"), ((2, 13, 14), 12, "13*2-14*"),
    ((2, 13, 14), 13, "13 (2-14)"), ((2, 13, 14), 12, "(13*2-14) (2)"),  # a correct prefix, then more
    ((2, 13, 14), 12, "13*2\t-14"), ((2, 13, 14), 12, "13*2\n-14"), ((2, 13, 14), 12, "13*2\u00a0-14"),
    ((2, 13, 14), 12, "13*2-14\x00"), ((2, 13, 14), 12, "[13*2]-14"), ((2, 13, 14), 12, "13*2-14;"),
    ((2, 13, 14), 12, "(13*2)-14" + " " * 300),        # over the length cap
    ((1,), 1, "(" * (cd.MAX_EXPR_DEPTH + 1) + "1" + ")" * (cd.MAX_EXPR_DEPTH + 1)),  # nested too deep
    ((2, 13, 14), 12, ""), ((2, 13, 14), 12, " "), ((), 0, ""), ((), 0, "()"),
])
def test_verify_expression_rejects_wrong_answers(numbers, target, expr):
    assert ref_verify_expression(numbers, target, expr) is False, "test case itself is not wrong"
    assert verify_expression(numbers, target, expr) is False
    # extract_answer strips the tag's surrounding whitespace, so only the padded row turns right there
    assert verify_chat(numbers, target, format_expression_answer(expr)) is \
        ref_verify_expression(numbers, target, expr.strip())


def test_verify_expression_rejects_odd_arguments():
    assert verify_expression((2, 13, 14), 12, "13*2-14") is True  # control
    for expr in (None, 12, b"13*2-14", ["13*2-14"], _EvilStr("13*2-14")):
        assert verify_expression((2, 13, 14), 12, expr) is False
    for target in (12.0, "12", None, Fraction(12)):
        assert verify_expression((2, 13, 14), target, "13*2-14") is False
    for numbers in ((2.0, 13, 14), ("2", "13", "14"), None, 2, (2, 13, None)):
        assert verify_expression(numbers, 12, "13*2-14") is False
    for text in (None, 12, b"<answer>13*2-14</answer>", ["<answer>13*2-14</answer>"]):
        assert verify_chat((2, 13, 14), 12, text) is False
        assert extract_answer(text) is None


def test_verify_expression_adversarial_inputs_finish_and_reject():
    """Each must return False without hanging (a hang or a RecursionError would be obvious here)."""
    n = 10 ** 6
    inputs = [
        "99**99**99", "9**9**9**9", "2**2**2**2**2**2**2**2", "9" * n, "9" * 256, "9" * 4301,
        "(" * 10 ** 5, "(" * 10 ** 5 + "13*2-14" + ")" * 10 ** 5, "(" * 128 + "1" + ")" * 127,
        ")" * 10 ** 5, "1+" * (n // 2), "-" * n, "--" * 100 + "3", "١" * n, "\x00" * n, " " * n,
        "(13*2)-14" * (n // 9), "".join(random.Random(3).choices("0123456789+-*/() ", k=1000)) * (n // 1000),
        "1/" * 128, "(1/(1-1))", "1e999999", "0x10", "__import__('os').system('true')",
        "\ud800", "\U0001F600" * 100,
    ]
    for s in inputs:
        assert verify_expression((2, 13, 14), 12, s) is False, repr(s)[:60]
        assert verify_expression((99, 99, 99), 99 ** 99, s) is False, repr(s)[:60]
        assert verify_chat((2, 13, 14), 12, format_expression_answer(s)) is False, repr(s)[:60]


def _random_expression(rng, numbers):
    """A random well-formed expression over `numbers` (each once): a random binary tree, random ops,
    random (sometimes redundant) parentheses and spaces."""
    items = [str(n) for n in numbers]
    rng.shuffle(items)

    def sp():
        return " " * (rng.random() < 0.1)

    while len(items) > 1:
        i = rng.randrange(len(items) - 1)
        e = f"{items[i]}{sp()}{rng.choice('+-*/')}{sp()}{items[i + 1]}"
        if rng.random() < 0.6:
            k = rng.choice([1, 1, 1, 2])
            e = "(" * k + e + ")" * k
        items[i:i + 2] = [e]
    return sp() + items[0] + sp()


_MUTATION_PIECES = list("0123456789+-*/() ") * 3 + [
    "**", "//", "--", "-", ".", "٣", "７", "e", "_", "\t", "=", "^", "x", "−", "(", ")", "()", "00", "0"]


def _mutate_expression(rng, text):
    chars = list(text)
    for _ in range(rng.randint(1, 3)):
        k = rng.random()
        pos = rng.randrange(len(chars) + 1)
        if k < 0.5:
            chars.insert(pos, rng.choice(_MUTATION_PIECES))
        elif k < 0.8 and chars:
            del chars[min(pos, len(chars) - 1)]
        elif chars:
            chars[min(pos, len(chars) - 1)] = rng.choice(_MUTATION_PIECES)
    return "".join(chars)


def test_verify_expression_agrees_with_reference_on_random_expressions():
    rng = random.Random(271828)
    counts = Counter()
    for _ in range(5000):
        numbers = [rng.randint(0 if rng.random() < 0.2 else 1, rng.choice([5, 10, 20, 100])) for _ in
                   range(rng.choice([1, 2, 3, 3, 3, 4, 5]))]
        if len(numbers) > 1 and rng.random() < 0.5:
            numbers[1] = numbers[0]  # duplicates, and (a-a) zero divisors
        expr = _random_expression(rng, numbers)
        original = ref_expr(expr)
        assert original is not None, expr  # the generator itself: well-formed
        if rng.random() < 0.4:
            expr = _mutate_expression(rng, expr)
        r = rng.random()
        if r < 0.1 and numbers:
            numbers.pop(rng.randrange(len(numbers)))
        elif r < 0.15:
            numbers.append(rng.randint(0, 20))
        elif r < 0.2 and numbers:
            numbers[rng.randrange(len(numbers))] += 1
        # The target is the value of the expression as mutated, or else as generated: near misses.
        ref = ref_expr(expr)
        value = ref[0] if isinstance(ref, tuple) else original[0] if isinstance(original, tuple) else None
        target = int(value) if value is not None and value.denominator == 1 and rng.random() < 0.85 \
            else rng.randint(-5, 100)
        want = ref_verify_expression(numbers, target, expr)
        assert verify_expression(numbers, target, expr) is want, (numbers, target, expr)
        assert verify_chat(numbers, target, f"<answer>x</answer>\n{format_expression_answer(expr)}") is \
            ref_verify_expression(numbers, target, expr.strip())
        counts[want] += 1
        counts["div0"] += ref == "div0"
        counts["malformed"] += ref is None
    # Both outcomes, division by zero and malformed input must all be exercised, or agreement means little.
    assert counts[True] > 1000 and counts[False] > 2500 and counts["div0"] > 15 and counts["malformed"] > 1500, counts


# ------------------------------------------------------------------------------------ steps_to_expression

@pytest.mark.parametrize("steps,expr", [
    ("13*2=26,26-14=12", "(13*2)-14"),
    ("7*13=91,91-3=88", "(7*13)-3"),
    ("8-6=2,2*2=4", "(8-6)*2"),                    # a result equal to a given number: both used once
    ("5+5=10,10+10=20", "(5+5)+10"),
    ("6/2=3,8*3=24", "8*(6/2)"),                   # the result as the second operand
    ("1*2=2,2*3=6,6*4=24", "((1*2)*3)*4"),
    ("1+2=3,4+5=9,9*3=27", "(4+5)*(1+2)"),         # two independent sub-results
    ("7+2=9", "7+2"),
])
def test_steps_to_expression_examples(steps, expr):
    assert steps_to_expression(steps) == expr


def _step_numbers_and_target(steps_text):
    """The given numbers and target of a valid step list: operands that no earlier step produced."""
    produced, given = [], []
    for a, _, b, c in ref_parse(steps_text):
        for x in (a, b):
            if x in produced:
                produced.remove(x)
            else:
                given.append(x)
        produced.append(c)
    return given, produced[-1]


def _check_steps_to_expression(numbers, target, steps):
    expr = steps_to_expression(steps)
    value, literals = ref_expr(expr)
    assert value == target and Counter(literals) == Counter(numbers), (numbers, target, steps, expr)
    assert verify_expression(numbers, target, expr) is True, (numbers, target, steps, expr)
    assert verify_chat(numbers, target, format_expression_answer(expr)) is True
    return expr


def test_steps_to_expression_on_test_split_and_train_sample():
    problems = list(load_split("test")) + random.Random(9).sample(load_split("train"), 400)
    for numbers, target, ans in problems:
        _check_steps_to_expression(numbers, target, ans)
        assert steps_to_expression(ans) == steps_to_expression(ans)  # deterministic


def test_steps_to_expression_on_every_alternative_solution():
    """Every solution the solver knows, where a result often equals a given number (tracked per step)."""
    rng = random.Random(13)
    sample = [(2, 6, 8), (5, 5, 10), (1, 1, 1), (2, 2, 2), (2, 2, 4), (3, 3, 9), (1, 2, 3, 4), (2, 2, 4, 8)]
    sample += rng.sample(all_multisets(), 60)
    n = collisions = 0
    for numbers in sample:
        for target in sorted(solve_all(numbers))[:25]:
            for steps in cd.all_solutions(numbers, target):
                _check_steps_to_expression(numbers, target, format_steps(steps))
                collisions += any(c in numbers for _, _, _, c in steps[:-1])
                n += 1
    assert n > 3000 and collisions > 300, (n, collisions)


def test_steps_to_expression_on_mutated_step_lists_agrees_with_reference():
    """Valid step lists convert to a correct expression; invalid ones raise ValueError."""
    rng = random.Random(17)
    problems = load_split("test")
    ok = bad = 0
    for _ in range(1500):
        _, _, ans = rng.choice(problems)
        text = _mutate(rng, ans) if rng.random() < 0.7 else ans
        steps = ref_parse(text)
        given, target = _step_numbers_and_target(text) if steps else (None, None)
        if steps and len(given) == len(steps) + 1 and ref_check(given, target, text):
            _check_steps_to_expression(given, target, text)
            ok += 1
        else:
            with pytest.raises(ValueError):
                steps_to_expression(text)
            bad += 1
    assert ok > 300 and bad > 300, (ok, bad)


@pytest.mark.parametrize("bad", [
    "", "7*13", "7*13=90,90-3=87", "7*13=91,3+5=8", "7/2=3,3*3=9", "5-5=0,8+0=8", "3-5=-2,8-2=6",
    "(7*13)=91,91-3=88", "7*13=91,91-3=88,", "9" * 1000, "٧*١٣=٩١", None, 42,
])
def test_steps_to_expression_rejects_non_step_lists(bad):
    with pytest.raises(ValueError):
        steps_to_expression(bad)


# ------------------------------------------------------------------------------------ extract / chat

@pytest.mark.parametrize("text,want", [
    ("<answer>(13*2)-14</answer>", "(13*2)-14"),
    ("Let me think. 13*2=26.\n<answer>\n (13*2)-14 \n</answer>", "(13*2)-14"),
    ("<answer>1+2</answer> no wait <answer>(13*2)-14</answer> done", "(13*2)-14"),   # last one wins
    ("<answer>1+2</answer> hmm <answer>(13*2)-1", None),     # last answer cut off: not an earlier one
    ("<answer>(13*2)-14", None), ("(13*2)-14</answer>", None), ("(13*2)-14", None), ("", None),
    ("<answer><answer>7</answer></answer>", "7"), ("<answer>1<answer>7</answer>", "7"),
    ("</answer><answer>", None), ("<answer></answer>", ""), ("<answer>   </answer>", ""),
    ("<ANSWER>7</ANSWER>", None), ("<answer >7</answer>", None), ("<answer>7</answer >", None),
    ("<answer>7</answer></answer>", "7"), ("<answer>a</answer>b</answer>", "a"),
])
def test_extract_answer_examples(text, want):
    assert ref_extract(text) == want, "test case itself disagrees with the reference"
    assert extract_answer(text) == want


def test_extract_answer_agrees_with_reference_on_random_texts():
    rng = random.Random(31)
    pieces = ["<answer>", "</answer>"] * 4 + ["<answer", "answer>", "</", "<", ">", "/", "1+2", "7", " ", "\n", "x"]
    found = 0
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        want = ref_extract(text)
        assert extract_answer(text) == want, text
        found += want is not None
    assert 500 < found < 2500, found


def test_extract_answer_on_long_inputs():
    n = 10 ** 6
    assert extract_answer("x" * n + "<answer>5</answer>" + "y" * n) == "5"
    assert extract_answer("<answer>" * (n // 8)) is None
    assert extract_answer("</answer>" * (n // 9)) is None
    assert extract_answer("<answer>" * (n // 8) + "1" + "</answer>" * (n // 9)) == "1"
    assert extract_answer("<answer>" + "7" * n + "</answer>") == "7" * n
    assert verify_chat((7,), 7, "<answer>" + "7" * n + "</answer>") is False
    assert verify_chat((2, 13, 14), 12, "<" * n + "answer>" * n) is False


def test_verify_chat_on_model_like_completions():
    nums, t = (2, 13, 14), 12
    assert verify_chat(nums, t, "13*2 is 26, minus 14 is 12.\n<answer>(13*2)-14</answer>") is True
    assert verify_chat(nums, t, "<answer>\n13 * 2 - 14\n</answer>\n") is True
    assert verify_chat(nums, t, "<answer>(13*2)-14</answer> wait, <answer>13+14-2</answer>") is False
    assert verify_chat(nums, t, "<answer>13+14-2</answer> wait, <answer>(13*2)-14</answer>") is True
    assert verify_chat(nums, t, "<answer>(13*2)-14</answer> so <answer>(13*2)") is False
    assert verify_chat(nums, t, "<answer>(13*2)-14 = 12</answer>") is False
    assert verify_chat(nums, t, "<answer>13*2=26,26-14=12</answer>") is False   # the step format is not it
    assert verify_chat(nums, t, "(13*2)-14") is False
    assert format_expression_answer("(13*2)-14") == "<answer>(13*2)-14</answer>"
    assert extract_answer(format_expression_answer("(13*2)-14")) == "(13*2)-14"


def test_chat_prompt_text_states_the_task_and_gives_no_answer_away():
    p = chat_prompt_text((3, 7, 13), 88)
    assert p == chat_prompt_text((3, 7, 13), 88)
    assert "3, 7, 13" in p and "88" in p and "exactly once" in p and "<answer></answer>" in p
    for op in "+-*/":
        assert op in p
    # The example it shows is a correct answer to its own example problem ...
    ex = extract_answer(p)
    assert ex is not None and ex != ""
    assert any(verify_expression(nums, tgt, ex) for nums, tgt, _ in cd._CHAT_EXAMPLES)
    # ... and never one to the problem asked, even when that is the example problem itself.
    for nums, target, _ in list(load_split("test")) + [(e[0], e[1], None) for e in cd._CHAT_EXAMPLES]:
        prompt = chat_prompt_text(nums, target)
        assert ", ".join(map(str, nums)) in prompt and str(target) in prompt
        assert verify_chat(nums, target, prompt) is False, prompt
        assert verify_chat(nums, target, prompt + format_expression_answer(
            steps_to_expression(solve(nums, target)))) is True

"""Countdown: use each given number once with + - * / to reach the target.

Everything the project trains on is made here: a brute-force solver, the problem universe, deterministic
train / val / test splits, a character-level tokenizer, and a safe verifier (a small parser over integers;
model output is never evaluated as code).

Text format (one problem):
    prompt:  "3 7 13>88:"            numbers (ascending), '>', target, ':'
    answer:  "7*13=91,91-3=88"       one step per comma: a op b = c; every number used once
Rules: results of each step are positive integers; division must be exact. The last step's result is the
target, and every given number (and every intermediate result) is used exactly once.

Chat format (real chat models, see chat_prompt_text): the answer is one expression with parentheses inside
<answer></answer>, e.g. "<answer>(7*13)-3</answer>", checked by verify_chat with exact fractions.
countdown_format(chat) gives a model its format (CharFormat or ChatFormat: prompt ids, answer ids, eos and
pad ids, the verifier), so training and eval take either.

    python -m data.countdown            # writes data/tokenizer.json and data/tokenizer_num.json, prints
                                        # split sizes and examples
"""
import hashlib
import json
import operator
import os
import random
import re
from collections import Counter
from fractions import Fraction
from functools import lru_cache

# The setting (see docs/countdown.md). Changing these changes every split and checkpoint.
N_NUMBERS = 3
NUM_LO, NUM_HI = 1, 20
MAX_TARGET = 100
SPLIT_PERMILLE = {"test": 40, "val": 20}  # of the problem universe, by a stable hash of the problem

TOKENIZER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer.json")
PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
CHARS = list("0123456789+-*/=,>: ")

# ----------------------------------------------------------------------------------------------- solver

def apply_op(a, op, b):
    """Result of `a op b` under the rules (positive integers, exact division), or None if not allowed."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a > b else None
    if op == "*":
        return a * b
    if op == "/":
        return a // b if b != 0 and a % b == 0 else None
    return None


def step_lists(numbers):
    """Every complete step list over `numbers`, as (final value, [(a, op, b, c), ...]), in a fixed search
    order: pairs left to right, larger operand first, ops + - * /."""
    def rec(nums, steps):
        if len(nums) == 1:
            yield nums[0], list(steps)
            return
        for i in range(len(nums)):
            for j in range(i + 1, len(nums)):
                a, b = max(nums[i], nums[j]), min(nums[i], nums[j])
                rest = [nums[k] for k in range(len(nums)) if k != i and k != j]
                for op in "+-*/":
                    c = apply_op(a, op, b)
                    if c is None or c <= 0:
                        continue
                    steps.append((a, op, b, c))
                    yield from rec(rest + [c], steps)
                    steps.pop()

    yield from rec(list(numbers), [])


def solve_all(numbers):
    """Every reachable final value -> the first solution found (the canonical one: the search order is
    fixed, so it is deterministic), as a list of steps (a, op, b, c)."""
    found = {}
    for value, steps in step_lists(numbers):
        found.setdefault(value, steps)
    return found


def all_solutions(numbers, target):
    """Every step list (a >= b in each step) that reaches `target`, in the solver's fixed order."""
    return [steps for value, steps in step_lists(numbers) if value == target]


def augment(problem, rng):
    """A training-time variant of a problem: the numbers in a random order and a random valid solution.

    Same problem (so splits stay disjoint), many texts: the model cannot memorise one string per problem."""
    nums, target, _ = problem
    nums = list(nums)
    rng.shuffle(nums)
    return tuple(nums), target, format_steps(rng.choice(all_solutions(nums, target)))


def solve(numbers, target):
    """One solution (answer text) reaching `target`, or None if there is none."""
    steps = solve_all(numbers).get(target)
    return None if steps is None else format_steps(steps)


def format_steps(steps):
    return ",".join(f"{a}{op}{b}={c}" for a, op, b, c in steps)

# ------------------------------------------------------------------------------------------ text format

def prompt_text(numbers, target):
    return " ".join(str(n) for n in numbers) + f">{target}:"


_PROMPT_RE = re.compile(r"([0-9]{1,4}(?: [0-9]{1,4}){0,7})>([0-9]{1,6}):")


def parse_prompt(text):
    """Inverse of prompt_text: (numbers tuple, target). Raises ValueError on anything else."""
    m = _PROMPT_RE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"not a Countdown prompt: {repr(text)[:40]}")
    return tuple(int(x) for x in m.group(1).split(" ")), int(m.group(2))

# ----------------------------------------------------------------------------------------------- verify

_STEP_RE = re.compile(r"([0-9]{1,7})([-+*/])([0-9]{1,7})=([0-9]{1,9})")
MAX_ANSWER_CHARS = 256


def verify(numbers, target, answer_text):
    """True iff `answer_text` is a valid step list that uses every number once and reaches `target`.

    Never raises and never evaluates anything: the text is parsed with bounded regexes (at most 256
    characters, at most 9 digits per number), so every call is fast whatever the input."""
    try:
        if not isinstance(answer_text, str) or len(answer_text) > MAX_ANSWER_CHARS or not isinstance(target, int):
            return False
        text = answer_text.strip()
        parts = text.split(",")
        if len(parts) != len(numbers) - 1:
            return False
        pool = Counter(int(n) for n in numbers)
        for part in parts:
            m = _STEP_RE.fullmatch(part)
            if m is None:
                return False
            a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            pool[a] -= 1
            pool[b] -= 1
            if pool[a] < 0 or pool[b] < 0:
                return False  # a number not available (reused, or never given)
            r = apply_op(a, op, b)
            if r is None or r <= 0 or r != c:
                return False  # wrong arithmetic, non-exact division, non-positive result
            pool[c] += 1
        left = +pool  # drop zero counts
        return left == Counter({int(target): 1})
    except Exception:  # defensive: verify is called on arbitrary model output
        return False

def is_well_formed(answer_text, n_numbers=N_NUMBERS):
    """True iff the text has the answer's shape (n-1 steps `a op b=c`), right or wrong."""
    if not isinstance(answer_text, str) or len(answer_text) > MAX_ANSWER_CHARS:
        return False
    parts = answer_text.strip().split(",")
    return len(parts) == n_numbers - 1 and all(_STEP_RE.fullmatch(p) for p in parts)

# ------------------------------------------------------------------------------------ chat answer format
# Real chat models answer with one expression inside <answer></answer>. It is checked by a hand-written
# tokenizer and recursive-descent parser with exact Fractions: never eval/ast/compile (model output).

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
MAX_EXPR_CHARS = 256
MAX_EXPR_DEPTH = 32  # parenthesis nesting; bounds the parser's recursion (3 frames per level)
_ASCII_DIGITS = frozenset("0123456789")
# Numbers above NUM_HI, so an example is never a problem of the splits; the second one serves if a caller
# asks about the first one's numbers.
_CHAT_EXAMPLES = (((2, 3, 25), 81, "(25+2)*3"), ((2, 9, 30), 42, "(30-9)*2"))


def chat_prompt_text(numbers, target):
    """The user message asking a chat model for the answer as one expression inside <answer></answer>."""
    ex_nums, ex_target, ex_expr = _CHAT_EXAMPLES[0]
    if sorted(numbers) == sorted(ex_nums):
        ex_nums, ex_target, ex_expr = _CHAT_EXAMPLES[1]
    listed = ", ".join(str(n) for n in numbers)
    ex_listed = ", ".join(str(n) for n in ex_nums)
    return (f"Using the numbers {listed}, make {target}. "
            "Use each number exactly once. You may use only + - * / and parentheses. "
            f"Write the final answer as one expression inside {ANSWER_OPEN}{ANSWER_CLOSE}, "
            "without '=' or the result. "
            f"For example, for the numbers {ex_listed} and the target {ex_target}: "
            f"{ANSWER_OPEN}{ex_expr}{ANSWER_CLOSE}")


def extract_answer(text):
    """The content of the last <answer>...</answer>, surrounding whitespace stripped; None without one.

    The last opening tag decides: if it is never closed (a truncated final answer), the result is None,
    not an earlier answer. Plain substring search: linear in the length of the text."""
    try:
        if not isinstance(text, str):
            return None
        start = text.rfind(ANSWER_OPEN)
        if start < 0:
            return None
        start += len(ANSWER_OPEN)
        end = text.find(ANSWER_CLOSE, start)
        if end < 0:
            return None
        return str(text[start:end]).strip()
    except Exception:  # defensive: called on arbitrary model output
        return None


def _expr_tokens(expr):
    """Tokens of an expression (ints, and '+', '-', '*', '/', '(', ')'), or None if a character is outside
    the alphabet (ASCII digits, those six, space), a literal has a leading zero, or the parentheses are
    unbalanced or nested deeper than MAX_EXPR_DEPTH."""
    tokens, depth, i, n = [], 0, 0, len(expr)
    while i < n:
        ch = expr[i]
        if ch in _ASCII_DIGITS:
            j = i + 1
            while j < n and expr[j] in _ASCII_DIGITS:
                j += 1
            if expr[i] == "0" and j - i > 1:
                return None  # "07": a literal must be written as the number itself
            tokens.append(int(expr[i:j]))
            i = j
            continue
        if ch == "(":
            depth += 1
            if depth > MAX_EXPR_DEPTH:
                return None
        elif ch == ")":
            depth -= 1
            if depth < 0:
                return None
        elif ch not in ("+", "-", "*", "/", " "):
            return None
        if ch != " ":
            tokens.append(ch)
        i += 1
    return tokens if depth == 0 else None


def _eval_tokens(tokens):
    """Exact value of a token list: expr := term (('+'|'-') term)*, term := factor (('*'|'/') factor)*,
    factor := integer | '(' expr ')'. Left-associative. Raises ValueError (or ZeroDivisionError)."""
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def expr():
        nonlocal pos
        value = term()
        while peek() in ("+", "-"):
            op = tokens[pos]
            pos += 1
            rhs = term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term():
        nonlocal pos
        value = factor()
        while peek() in ("*", "/"):
            op = tokens[pos]
            pos += 1
            rhs = factor()
            value = value * rhs if op == "*" else value / rhs
        return value

    def factor():
        nonlocal pos
        tok = peek()
        if type(tok) is int:
            pos += 1
            return Fraction(tok)
        if tok == "(":
            pos += 1
            value = expr()
            if peek() != ")":
                raise ValueError("expected ')'")
            pos += 1
            return value
        raise ValueError(f"unexpected token {tok!r}")  # includes a leading '+'/'-': no unary operators

    value = expr()
    if pos != len(tokens):
        raise ValueError("trailing tokens")
    return value


def verify_expression(numbers, target, expr):
    """True iff `expr` is one arithmetic expression over + - * / and parentheses whose integer literals are
    exactly the given numbers (each used once) and whose exact (rational) value is `target`.

    Never raises and never evaluates code; bounded work for any input (length, nesting and the literal
    check come before any arithmetic)."""
    try:
        if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS or not isinstance(target, int):
            return False
        tokens = _expr_tokens(expr)
        if tokens is None:
            return False
        literals = Counter(t for t in tokens if type(t) is int)
        if literals != Counter(operator.index(n) for n in numbers):
            return False  # a number reused, missing, or not given
        return bool(_eval_tokens(tokens) == target)
    except Exception:  # malformed expression, division by zero, odd arguments: all just wrong
        return False


def verify_chat(numbers, target, completion_text):
    """True iff the completion's last <answer>...</answer> holds a correct expression (verify_expression)."""
    answer = extract_answer(completion_text)
    return answer is not None and verify_expression(numbers, target, answer)


def steps_to_expression(steps_text):
    """One parenthesised expression with the numbers and value of a step list: `13*2=26,26-14=12` ->
    `(13*2)-14`. Raises ValueError if the text is not a correct step list.

    Results are tracked per step, not by value: an operand is the result of an earlier, still unused step
    when one has that value, else a given number. Taking a free result whenever there is one uses up every
    non-final result, so the literals left are exactly the given numbers, even when a result equals one."""
    if not isinstance(steps_text, str) or len(steps_text) > MAX_ANSWER_CHARS:
        raise ValueError(f"not a step list: {repr(steps_text)[:40]}")
    unused = []  # (value, expression) of earlier steps' results not yet used, in step order
    for part in steps_text.strip().split(","):
        m = _STEP_RE.fullmatch(part)
        if m is None:
            raise ValueError(f"not a step: {part[:40]!r}")
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        r = apply_op(a, op, b)
        if r is None or r <= 0 or r != c:
            raise ValueError(f"wrong step: {part!r}")
        operands = []
        for x in (a, b):
            k = next((i for i in range(len(unused) - 1, -1, -1) if unused[i][0] == x), None)
            operands.append(str(x) if k is None else f"({unused.pop(k)[1]})")
        unused.append((c, f"{operands[0]}{op}{operands[1]}"))
    if len(unused) != 1:
        raise ValueError("a step's result is never used")
    return unused[0][1]


def format_expression_answer(expr):
    """The completion text of a supervised chat row: the expression inside the answer tags."""
    return f"{ANSWER_OPEN}{expr}{ANSWER_CLOSE}"

# -------------------------------------------------------------------------------------- universe/splits

def split_by_hash(key, permille=SPLIT_PERMILLE):
    """"test", "val" or "train" for a problem's key, by a stable hash: disjoint splits that never change.
    Every task in data/ splits this way, each with its own key prefix and shares."""
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 1000
    if h < permille["test"]:
        return "test"
    return "val" if h < permille["test"] + permille["val"] else "train"


def _split_of(numbers, target):
    return split_by_hash(f"{numbers}>{target}")


@lru_cache(maxsize=None)
def _universe():
    """All (numbers, target, answer) with numbers an ascending multiset and 1 <= target <= MAX_TARGET."""
    out = []

    def multisets(k, lo):
        if k == 0:
            yield ()
            return
        for x in range(lo, NUM_HI + 1):
            for rest in multisets(k - 1, x):
                yield (x,) + rest

    for nums in multisets(N_NUMBERS, NUM_LO):
        for target, steps in sorted(solve_all(nums).items()):
            if 1 <= target <= MAX_TARGET:
                out.append((nums, target, format_steps(steps)))
    return tuple(out)


@lru_cache(maxsize=None)
def load_split(split):
    """The problems of a split as a tuple of (numbers, target, answer), in a fixed shuffled order.

    Splits are decided by a stable hash of the problem, so they are disjoint and never change."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r} (train, val, test)")
    probs = [p for p in _universe() if _split_of(p[0], p[1]) == split]
    random.Random(f"countdown-{split}").shuffle(probs)
    return tuple(probs)

# -------------------------------------------------------------------------------------------- tokenizer

def build_tokenizer():
    """Character-level WordLevel tokenizer: [PAD]=0 [BOS]=1 [EOS]=2 [UNK]=3, then one id per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate([PAD, BOS, EOS, UNK] + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([PAD, BOS, EOS, UNK])
    return tok


def load_tokenizer(path=TOKENIZER_PATH):
    """Load a tokenizer.json; raises ValueError with a one-line reason if it is missing or broken."""
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"cannot load tokenizer {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    for name in (PAD, BOS, EOS):
        if tok.token_to_id(name) is None:
            raise ValueError(f"tokenizer {path} has no {name} token")
    return tok


def prompt_ids(tok, numbers, target):
    """[BOS] + the prompt's token ids."""
    return [tok.token_to_id(BOS)] + tok.encode(prompt_text(numbers, target)).ids


def answer_ids(tok, answer):
    """The answer's token ids + [EOS]: the EOS is a real token the model must learn to emit."""
    return tok.encode(answer).ids + [tok.token_to_id(EOS)]

# ------------------------------------------------------------------------------ one format per model
# What a model is asked and how its answer is checked depend on the model: this codebase's char models
# read "3 7 13>88:" and answer with a step list; a chat model reads its chat template around
# chat_prompt_text and answers <answer>expression</answer>. Both formats share one interface, so training
# and eval never ask which one they hold. Problems are (numbers, target, solution step list).


class CharFormat:
    """[BOS] + "3 7 13>88:" -> the step list + [EOS] (prompt_ids, answer_ids, verify, is_well_formed)."""

    def __init__(self, tok):
        for name in (BOS, EOS):
            if tok.token_to_id(name) is None:
                raise ValueError(f"the tokenizer has no chat template and no {name} token: no Countdown format")
        self.tok = tok
        self.eos_ids = [tok.token_to_id(EOS)]
        self.pad_id = tok.token_to_id(PAD) if tok.token_to_id(PAD) is not None else self.eos_ids[0]

    def prompt_ids(self, numbers, target):
        return prompt_ids(self.tok, numbers, target)

    def prompts(self, problems):
        """prompt_ids of many problems in one batched tokenizer call."""
        bos = self.tok.token_to_id(BOS)
        return [[bos] + e.ids for e in self.tok.encode_batch([prompt_text(p[0], p[1]) for p in problems])]

    def answer_ids(self, solution):
        return answer_ids(self.tok, solution)

    def decode(self, ids):
        return self.tok.decode(ids)

    def verify(self, numbers, target, text):
        return verify(numbers, target, text)

    def well_formed(self, text):
        return is_well_formed(text)


class ChatFormat:
    """The chat template around chat_prompt_text -> <answer>expression</answer> + the end-of-turn token
    (verify_chat). `chat` is a chat.Chat: tok, eos_ids, pad_id and prompt_ids(messages)."""

    def __init__(self, chat):
        self.tok, self.eos_ids, self.pad_id, self._chat = chat.tok, list(chat.eos_ids), chat.pad_id, chat
        self.prompt_ids(*_CHAT_EXAMPLES[0][:2])  # a template that cannot render a prompt fails here, not mid-run

    def prompt_ids(self, numbers, target):
        return self._chat.prompt_ids([{"role": "user", "content": chat_prompt_text(numbers, target)}])

    def prompts(self, problems):
        return [self.prompt_ids(p[0], p[1]) for p in problems]

    def answer_ids(self, solution):
        text = format_expression_answer(steps_to_expression(solution))
        return self.tok.encode(text, add_special_tokens=False).ids + [self.eos_ids[0]]

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def verify(self, numbers, target, text):
        return verify_chat(numbers, target, text)

    def well_formed(self, text):
        return extract_answer(text) is not None


def countdown_format(chat):
    """The Countdown format of a model's text interface (chat.Chat): the chat format when it has a chat
    template, else the char format of its tokenizer. Raises ValueError when neither fits."""
    return ChatFormat(chat) if chat.template is not None else CharFormat(chat.tok)


# ------------------------------------------------------------------------- number-level tokenizer (2nd)
# A second tokenizer over the same text, for cross-tokenizer distillation: whole numbers are single tokens.
# Numbers 0..999 are in the vocabulary (every operand, target and intermediate result of the rules is <= 400,
# see NUM_MAX); a digit run is cut left to right into canonical numbers of at most 3 digits, a leading zero
# standing alone, so any digit string (model output "1234" -> "123" "4", "007" -> "0" "0" "7") tokenizes
# into vocabulary tokens and decodes back to exactly the same text.

NUM_TOKENIZER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer_num.json")
NUM_MAX = 999
_NUM_SPLIT = r"0|[1-9][0-9]{0,2}|."  # a lone 0, a number of 1-3 digits without leading zero, or one character


def build_num_tokenizer():
    """Number-level WordLevel tokenizer: [PAD]=0 [BOS]=1 [EOS]=2 [UNK]=3, the non-digit characters of
    CHARS, then "0".."999" (one token per whole number)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    symbols = [c for c in CHARS if not c.isdigit()]
    vocab = {t: i for i, t in enumerate([PAD, BOS, EOS, UNK] + symbols + [str(n) for n in range(NUM_MAX + 1)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_NUM_SPLIT), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([PAD, BOS, EOS, UNK])
    return tok


def main():
    tok = build_tokenizer()
    tok.save(TOKENIZER_PATH)
    num_tok = build_num_tokenizer()
    num_tok.save(NUM_TOKENIZER_PATH)
    sizes = {s: len(load_split(s)) for s in ("train", "val", "test")}
    print(f"wrote {TOKENIZER_PATH} (vocab {tok.get_vocab_size()})")
    print(f"wrote {NUM_TOKENIZER_PATH} (vocab {num_tok.get_vocab_size()})")
    for nums, target, ans in load_split("test")[:5]:
        print(f"  {prompt_text(nums, target)}{ans}")
    print(json.dumps({"splits": sizes, "vocab_size": tok.get_vocab_size(), "num_vocab_size": num_tok.get_vocab_size()}))


if __name__ == "__main__":
    main()

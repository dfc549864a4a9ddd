"""The tasks a run trains on: their splits and their format in a model's text interface.

A problem is (numbers, target, solution) for Countdown (data/countdown.py) and (expression, value, answer)
for arithmetic (data/arith.py, the continual-learning recipe's second task); both plug into the same rows,
rollouts and evals.
"""
from data import arith
from data.countdown import CharFormat, load_split

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

"""The tasks a run trains on: their splits and their format in a model's text interface.

A problem is (numbers, target, solution) for Countdown (data/countdown.py) and (expression, value, answer)
for arithmetic (data/arith.py, the continual-learning recipe's second task); both plug into the same rows,
rollouts and evals.
"""
from data import arith
from data.countdown import CharFormat, load_split

TASK_SPLITS = {"countdown": load_split, "arith": arith.load_split}  # task -> split name -> problems


def check_task_args(args):
    """Refuse (ValueError, one line) train.py's --task / --sft-mix flags where they cannot work."""
    if args.task != "countdown" and (args.stage != "sft" or args.seq_kd or args.augment):
        raise ValueError(f"--task {args.task} trains by SFT on its ground truth: it needs --stage sft, without "
                         "--seq-kd and --augment")
    if args.sft_mix and (args.stage != "distill" or args.lmbda == 1 or args.loss == "sampled" or args.seq_kd):
        raise ValueError("--sft-mix needs --stage distill, --lmbda < 1 (its rows are the off-policy ones), no "
                         "--seq-kd and a full-vocabulary loss")


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

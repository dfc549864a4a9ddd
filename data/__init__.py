"""The tasks a run trains on: their splits and their format in a model's text interface.

A problem is (numbers, target, solution) for Countdown (data/countdown.py) and (expression, value, answer)
for arithmetic (data/arith.py, the continual-learning recipe's second task) and (instruction, "", "") for
general chat instructions (data/instructions.py: no ground truth, no verifier); all plug into the same
rows, rollouts and evals.
"""
from data import arith, instructions
from data.countdown import CharFormat, ChatFormat, load_split

TASK_SPLITS = {"countdown": load_split, "arith": arith.load_split,  # task -> split name -> problems
               "instruct": instructions.load_split}


def check_task_args(args):
    """Refuse (ValueError, one line) train.py's --task / --sft-mix flags where they cannot work."""
    if args.task == "instruct":
        check_instruct_args(args)
    elif args.task != "countdown" and (args.stage != "sft" or args.seq_kd or args.augment):
        raise ValueError(f"--task {args.task} trains by SFT on its ground truth: it needs --stage sft, without "
                         "--seq-kd and --augment")
    if args.sft_mix and (args.stage != "distill" or args.lmbda == 1 or args.loss == "sampled" or args.seq_kd):
        raise ValueError("--sft-mix needs --stage distill, --lmbda < 1 (its rows are the off-policy ones), no "
                         "--seq-kd and a full-vocabulary loss")


def check_instruct_args(args):
    """The instruction task has no reference replies and no verifier: every row is sampled, by the student
    (on-policy) or by the teacher (--seq-kd), and there is no reward to learn from."""
    if args.stage == "rl" or args.reward_weight:
        raise ValueError("--task instruct has no verifier, so no reward: it needs --stage distill or sft, without "
                         "--reward-weight")
    if args.augment or args.sft_mix:
        raise ValueError("--task instruct takes neither --augment nor --sft-mix (Countdown and arithmetic options)")
    off_policy = args.stage == "sft" or args.lmbda < 1
    if off_policy and not args.seq_kd:
        raise ValueError("--task instruct has no reference replies: its off-policy rows must be teacher samples "
                         "(--seq-kd), or use --stage distill --lmbda 1")


def task_format(task, fmt):
    """The format of a task in a model's text interface, given its Countdown format."""
    if task == "countdown":
        return fmt
    if task == "instruct":
        if not isinstance(fmt, ChatFormat):
            raise ValueError("--task instruct needs a chat model (a checkpoint with a chat template), not a "
                             "char-tokenizer model")
        return instructions.InstructFormat(fmt._chat)
    if not isinstance(fmt, CharFormat):
        raise ValueError(f"--task/--sft-mix {task} needs a char-tokenizer model (the Countdown char format), not a "
                         "chat model")
    return arith.ArithFormat(fmt.tok)


def longest_prompt(fmt, task="countdown"):
    """The most tokens any prompt of the task takes in this format."""
    return max(len(p) for split in ("train", "val", "test") for p in fmt.prompts(TASK_SPLITS[task](split)))

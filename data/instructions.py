"""General instructions: short chat prompts any small instruct model can answer, for distilling a real
chat model on its own kind of text (`train.py --task instruct`). Countdown's chat prompts stay the second set.

    "Explain what a volcano is in one sentence."     templates x topics, written here (no download)
    "Give two tips for learning to swim."
    "What is the capital of Japan?"                  hand-written simple questions

There is no reference answer and no verifier: a run distils on the student's own samples (--lmbda 1) or on
the teacher's (--seq-kd), and its evals are the teacher-gap measures (eval_countdown.evaluate_teacher_gap:
val_rkl, val_fkl, greedy and top-1 agreement, distinct-2); accuracy is None.

A problem is (instruction, "", "") so it flows through the rows, rollouts and evals as a Countdown problem
(numbers, target, solution) does. Splits are decided by a stable hash of the instruction: disjoint, fixed.

    python -m data.instructions          # split sizes and examples
"""
import itertools
import random
from functools import lru_cache

from data.countdown import split_by_hash

SPLIT_PERMILLE = {"test": 100, "val": 100}

THINGS = ["volcano", "rainbow", "library", "battery", "compass", "glacier", "telescope", "bicycle", "thermometer",
          "calendar", "magnet", "desert", "microscope", "lighthouse", "passport", "vaccine", "satellite", "recipe",
          "museum", "hurricane", "password", "spreadsheet", "keyboard", "forest", "bridge", "camera", "planet",
          "dictionary", "river", "robot"]
THING_TEMPLATES = ["Explain what a {} is in one sentence.", "What is a {} used for?",
                   "Describe a {} to a five-year-old.", "Write one sentence about a {}."]

ACTIVITIES = ["learning to swim", "cooking rice", "studying for an exam", "saving money", "sleeping better",
              "writing an email", "planting a garden", "running a first race", "learning a new language",
              "keeping a room tidy", "taking better photos", "staying focused at work", "making new friends",
              "traveling on a budget", "drinking more water", "reading more books", "learning to draw",
              "caring for a cat", "baking bread", "giving a short speech"]
ACTIVITY_TEMPLATES = ["Give two tips for {}.", "What is a good first step in {}?",
                      "Name one common mistake in {}."]

TOPICS = ["the sea", "autumn leaves", "a quiet morning", "the moon", "rain on a window", "a mountain", "snow",
          "a cup of tea", "the city at night", "a garden", "the wind", "a sleeping dog", "stars", "spring",
          "an old tree", "the sunrise", "a river", "a thunderstorm", "the beach", "friendship"]
TOPIC_TEMPLATES = ["Write a haiku about {}.", "Write a short poem about {}.", "Describe {} in two sentences."]

QUESTIONS = [
    "What is the capital of France?", "What is the capital of Japan?", "What is the capital of Italy?",
    "What is the capital of Canada?", "What is the capital of Spain?", "What is the capital of Egypt?",
    "What is the largest planet in the solar system?", "What is the closest star to Earth?",
    "How many days are in a week?", "How many legs does a spider have?", "What color is the sky on a clear day?",
    "What do bees make?", "What is water made of?", "What gas do plants take in from the air?",
    "Which ocean is the largest?", "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?", "What is the opposite of hot?", "What is the plural of mouse?",
    "How many minutes are in an hour?", "What is the freezing point of water in Celsius?",
    "Which animal is known as the king of the jungle?", "What do you call a baby cat?",
    "What is the main language spoken in Brazil?", "What shape has three sides?", "What is two plus two?",
    "Which season comes after winter?", "What is the tallest animal?", "What does a thermometer measure?",
    "Why do we need sleep?", "Why is exercise good for you?", "Why do leaves change color in autumn?",
    "What is the difference between weather and climate?", "What is photosynthesis?", "What is gravity?",
    "How does a plant grow from a seed?", "What is the sun made of?", "How do birds fly?",
    "What is a healthy breakfast?", "How can I be more polite in an email?",
]


def all_instructions():
    """Every instruction, in a fixed order, without repeats."""
    out = [t.format(x) for t, xs in ((THING_TEMPLATES, THINGS), (ACTIVITY_TEMPLATES, ACTIVITIES),
                                     (TOPIC_TEMPLATES, TOPICS)) for t, x in itertools.product(t, xs)]
    return list(dict.fromkeys(out + QUESTIONS))


def split_of(instruction):
    return split_by_hash(f"instruct:{instruction}", SPLIT_PERMILLE)


@lru_cache(maxsize=None)
def load_split(split):
    """The problems of a split, (instruction, "", ""), in a fixed shuffled order."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r} (train, val, test)")
    probs = [(s, "", "") for s in all_instructions() if split_of(s) == split]
    random.Random(f"instruct-{split}").shuffle(probs)
    return tuple(probs)


class InstructFormat:
    """A chat model's template around one user message (the instruction) -> the model's own reply, ended by
    its end-of-turn token. No ground truth and no verifier (verifies = False): rows are sampled, by the
    student or by the teacher (--seq-kd). `chat` is a chat.Chat with a template."""
    verifies = False

    def __init__(self, chat):
        if chat.template is None:
            raise ValueError("--task instruct needs a chat model (a checkpoint with a chat template), not a "
                             "char-tokenizer model")
        self.tok, self.eos_ids, self.pad_id, self._chat = chat.tok, list(chat.eos_ids), chat.pad_id, chat
        self.prompt_ids(QUESTIONS[0], "")  # a template that cannot render a prompt fails here, not mid-run

    def prompt_ids(self, instruction, _target=""):
        return self._chat.prompt_ids([{"role": "user", "content": instruction}])

    def prompts(self, problems):
        return [self.prompt_ids(p[0]) for p in problems]

    def prompt_text(self, instruction, _target=""):
        return instruction

    def answer_ids(self, _solution):
        return None  # no reference reply: off-policy rows are the teacher's samples (check_task_args)

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def verify(self, *_):
        return False

    def well_formed(self, _text):
        return True  # any reply that ended is a reply


if __name__ == "__main__":
    for s in ("train", "val", "test"):
        print(s, len(load_split(s)), [p[0] for p in load_split(s)[:3]])

"""A small synthetic world, its pretraining corpus, and fine-tuning tasks with exact answers.

Everything is generated here from fixed seeds: nothing is downloaded or read from disk.

The world: 32 animals, each with a home, a food, a colour and a friend. The pretraining corpus
states these facts in plain prose and in plain question/answer pairs. The tasks then ask the
same questions but want the answer in a persona (close to pretraining: the knowledge is there,
only the style is new), or ask for something the corpus never shows (far from pretraining).
"""

import random
from dataclasses import dataclass

from .validate import integer, positive_int

ANIMALS = (
    "fox", "owl", "bear", "frog", "hare", "wolf", "crow", "deer",
    "mole", "seal", "goat", "lynx", "toad", "newt", "swan", "duck",
    "crab", "moth", "wren", "boar", "mink", "vole", "yak", "eel",
    "bat", "cat", "dog", "elk", "hen", "pig", "ram", "ox",
)  # fmt: skip
HOMES = ("forest", "river", "hill", "cave", "marsh", "meadow", "lake", "barn")
FOODS = ("berries", "fish", "seeds", "nuts", "honey", "roots", "grass", "apples")
COLORS = ("red", "brown", "grey", "white", "black", "gold", "green", "blue")
ATTRIBUTES = ("home", "food", "color", "friend")

_WORLD_SEED = 1234  # fixes who lives where, eats what, and befriends whom
_SPLIT_SEED = 0  # fixes which facts the persona tasks hold out for testing
_REVERSE_SEED = 7  # fixes the letter strings of the reverse task
_REVERSE3_SEED = 8  # fixes the letter strings of the reverse3 task


def world():
    """{animal: {"home", "food", "color", "friend"}}; friends come in pairs."""
    rng = random.Random(_WORLD_SEED)
    order = list(ANIMALS)
    rng.shuffle(order)
    friend = {}
    for a, b in zip(order[0::2], order[1::2], strict=True):
        friend[a], friend[b] = b, a
    return {
        a: {
            "home": rng.choice(HOMES),
            "food": rng.choice(FOODS),
            "color": rng.choice(COLORS),
            "friend": friend[a],
        }
        for a in ANIMALS
    }


# ---------------------------------------------------------------- plain prose and questions

_STATEMENTS = {
    "home": (
        "the {a} lives in the {v}.",
        "the {a} makes its home in the {v}.",
        "in the {v} lives the {a}.",
        "you can find the {a} in the {v}.",
    ),
    "food": (
        "the {a} eats {v}.",
        "the {a} likes to eat {v}.",
        "what the {a} eats is {v}.",
        "the {a} feeds on {v}.",
    ),
    "color": (
        "the {a} is {v}.",
        "the color of the {a} is {v}.",
        "the {v} {a} is easy to spot.",
        "look, the {a} is {v}.",
    ),
    "friend": (
        "the {a} is friends with the {v}.",
        "the {a} and the {v} are friends.",
        "the best friend of the {a} is the {v}.",
        "the {a} often plays with the {v}.",
    ),
}

QUESTIONS = {
    "home": "where does the {a} live?",
    "food": "what does the {a} eat?",
    "color": "what color is the {a}?",
    "friend": "who is the friend of the {a}?",
}

# the answer the corpus gives to each question, in the plain style
_PLAIN_ANSWERS = {
    "home": "the {a} lives in the {v}.",
    "food": "the {a} eats {v}.",
    "color": "the {a} is {v}.",
    "friend": "the {a} is friends with the {v}.",
}


def prompt_for(animal, attribute):
    """The question about one fact, as every task and the corpus pose it."""
    return f"q: {QUESTIONS[attribute].format(a=animal)}\na:"


def plain_answer(animal, attribute, facts=None):
    """The plain-style answer the corpus gives (leading space, trailing newline)."""
    facts = world() if facts is None else facts
    v = facts[animal][attribute]
    return " " + _PLAIN_ANSWERS[attribute].format(a=animal, v=v) + "\n"


def _paragraph(rng, facts):
    """A few statements about one or two animals, joined into one line."""
    sentences = []
    for a in rng.sample(ANIMALS, rng.choice((1, 1, 2))):
        for attr in rng.sample(ATTRIBUTES, rng.randint(2, 4)):
            template = rng.choice(_STATEMENTS[attr])
            sentences.append(template.format(a=a, v=facts[a][attr]))
    return " ".join(sentences) + "\n"


def _question(rng, facts):
    a, attr = rng.choice(ANIMALS), rng.choice(ATTRIBUTES)
    return prompt_for(a, attr) + plain_answer(a, attr, facts)


CORPUS_DESCRIPTION = (
    f"synthetic world of {len(ANIMALS)} animals x {len(ATTRIBUTES)} facts "
    f"({', '.join(ATTRIBUTES)}), stated in {sum(map(len, _STATEMENTS.values()))} prose templates "
    "(paragraphs about one or two animals) and as plain 'q: ...\\na: ...' pairs, half each"
)


def pretraining_corpus(n_chars=1_000_000, seed=0):
    """At least ``n_chars`` characters of paragraphs and question/answer pairs about the world."""
    positive_int("n_chars", n_chars)
    integer("seed", seed)
    rng, facts = random.Random(seed), world()
    parts, size = [], 0
    while size < n_chars:
        part = _paragraph(rng, facts) if rng.random() < 0.5 else _question(rng, facts)
        parts.append(part)
        size += len(part)
    return "".join(parts)


# ---------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """A fine-tuning task: (prompt, target) text pairs; the metric is exact match of target."""

    name: str
    description: str
    train: tuple  # ((prompt, target), ...)
    test: tuple

    def split(self, split):
        """The pairs of one split, "train" or "test"."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return self.train if split == "train" else self.test

    def __repr__(self):
        return (
            f"Task({self.name!r}: {self.description}; "
            f"{len(self.train)} train, {len(self.test)} test)"
        )


# Each persona wraps the corpus's own plain answer in its voice: the fact is stated exactly as
# pretraining stated it, so fine-tuning only has to learn the style, not the knowledge.
_PERSONAS = {
    "pirate": "arr, matey! {answer}, yo ho!",
    "butler": "certainly, sir. {answer}.",
}


def _fact_split():
    """Every (animal, attribute) fact, split 3:1 into train and test, per attribute."""
    rng = random.Random(_SPLIT_SEED)
    train, test = [], []
    for attr in ATTRIBUTES:
        animals = list(ANIMALS)
        rng.shuffle(animals)
        cut = len(animals) * 3 // 4
        train += [(a, attr) for a in animals[:cut]]
        test += [(a, attr) for a in animals[cut:]]
    return train, test


def _persona_task(persona):
    facts, voice = world(), _PERSONAS[persona]

    def pair(a, attr):
        answer = _PLAIN_ANSWERS[attr].format(a=a, v=facts[a][attr]).removesuffix(".")
        return prompt_for(a, attr), " " + voice.format(answer=answer) + "\n"

    train, test = _fact_split()
    return Task(
        name=persona,
        description=f"answer questions about the animal world in the voice of a {persona}",
        train=tuple(pair(*f) for f in train),
        test=tuple(pair(*f) for f in test),
    )


def _reverse_task(n_train=2000, n_test=200, lengths=(3, 6), name="reverse", seed=_REVERSE_SEED):
    """Spell random lowercase strings backwards: nothing like the pretraining text."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    seen, words = set(), []
    while len(words) < n_train + n_test:
        w = "".join(rng.choice(letters) for _ in range(rng.randint(*lengths)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    pairs = tuple((f"q: reverse {w}\na:", f" {w[::-1]}\n") for w in words)
    low, high = lengths
    size = f"{low}" if low == high else f"{low} to {high}"
    return Task(
        name=name,
        description=f"spell a random string of {size} letters backwards (far from pretraining)",
        train=pairs[:n_train],
        test=pairs[n_train:],
    )


_BUILDERS = {
    "pirate": lambda: _persona_task("pirate"),
    "butler": lambda: _persona_task("butler"),
    "reverse": _reverse_task,
    # the same skill on 3 letters: full fine-tuning of the shipped model learns it in a few
    # hundred steps, so chapter 8 can compare methods on a far task that is actually learned
    "reverse3": lambda: _reverse_task(lengths=(3, 3), name="reverse3", seed=_REVERSE3_SEED),
}
TASKS = tuple(_BUILDERS)


def get_task(name):
    """The task called ``name`` (one of ``TASKS``), built deterministically."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown task {name!r}; the tasks are {TASKS}")
    return _BUILDERS[name]()


def as_task(task):
    """``task`` itself if it is a Task, else the task of that name (see ``get_task``)."""
    if isinstance(task, str):
        return get_task(task)
    if not isinstance(task, Task):
        raise TypeError(f"task must be a Task or a task name, got {type(task).__name__}")
    return task

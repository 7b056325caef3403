"""Generate the quickstart's offline instruction-tuning data and its tokenizer.

Six clearly distinct task families (arithmetic, reverse, uppercase, sort, capitals,
antonyms), each phrased through several instruction templates, so that attribution has
something to find: a query about one family should be explained by training examples
of the same family, and a held-out capital-city query by the training examples that
mention the same country.

Running ``python examples/data/make_instructions.py`` writes, next to this script:

* ``instructions.jsonl``: the training set (500 examples per family, shuffled), records
  ``{"id": "<family>-<5 digits>", "category", "instruction", "input", "output"}``;
* ``queries.jsonl``: held-out queries (10 per family, ids ``q-<family>-<n>``) whose
  ``(instruction, input)`` never occurs in the training set;
* ``tokenizer.json``: a byte-level BPE tokenizer trained on the formatted training texts,
  with ``<|endoftext|>`` as token 0 (used as bos, eos and pad).

Everything is seeded: with the default arguments the script reproduces the shipped
files byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from logix.data import PromptTemplate

SPECIAL_TOKEN = "<|endoftext|>"
DEFAULT_SEED = 1234
DEFAULT_PER_FAMILY = 500
DEFAULT_QUERIES = 10
DEFAULT_VOCAB_SIZE = 2048

Task = tuple[str, str, str]
"""``(instruction, input, output)`` of one generated example."""

Family = Callable[[random.Random], Task]

WORDS: tuple[str, ...] = (
    "apple", "river", "garden", "window", "silver", "planet", "candle", "forest", "pencil", "butter",
    "rabbit", "mirror", "castle", "dragon", "orange", "yellow", "summer", "winter", "spring", "autumn",
    "bridge", "button", "carpet", "doctor", "engine", "flower", "guitar", "hammer", "island", "jacket",
    "kitten", "ladder", "market", "needle", "office", "pepper", "rocket", "saddle", "tunnel", "violin",
    "wallet", "zipper", "anchor", "basket", "cactus", "dinner", "falcon", "ginger", "helmet", "jungle",
    "lemon", "magnet", "nickel", "oyster", "parrot", "puzzle", "ribbon", "salmon", "ticket", "velvet",
    "walrus", "bottle", "cotton", "desert", "feather", "honey", "marble", "pillow", "shadow", "thunder",
    "cloud", "stone", "light", "music", "paper", "table", "chair", "horse", "tiger", "zebra",
    "ocean", "train", "bread", "cheese", "piano", "robot", "shell", "storm", "sugar", "tower",
    "water", "whale", "camera", "circle", "coffee", "cookie", "copper", "dollar", "finger", "galaxy",
    "harbor", "insect", "kettle", "lizard", "meadow", "monkey", "pirate", "pocket", "police", "rubber",
    "school", "spider", "sponge", "statue", "street", "temple", "tomato", "turtle", "valley", "wizard",
    "banana", "cherry", "donkey", "eagle", "goose", "lamp", "moon", "nest", "owl", "queen",
    "road", "star", "tree", "wolf", "book", "cake", "door", "fish", "frog", "gold",
)

CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Belgium", "Brussels"), ("Greece", "Athens"),
    ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Hungary", "Budapest"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Ukraine", "Kyiv"),
    ("Russia", "Moscow"), ("Turkey", "Ankara"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Morocco", "Rabat"), ("Ethiopia", "Addis Ababa"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("Philippines", "Manila"), ("Pakistan", "Islamabad"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Israel", "Jerusalem"), ("Nepal", "Kathmandu"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Cuba", "Havana"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Argentina", "Buenos Aires"), ("Colombia", "Bogota"), ("Brazil", "Brasilia"),
    ("Venezuela", "Caracas"), ("Australia", "Canberra"), ("New Zealand", "Wellington"),
    ("South Korea", "Seoul"), ("Mongolia", "Ulaanbaatar"), ("Iceland", "Reykjavik"),
    ("Switzerland", "Bern"), ("Netherlands", "Amsterdam"), ("Czechia", "Prague"), ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"), ("Estonia", "Tallinn"),
)

ANTONYMS: tuple[tuple[str, str], ...] = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("high", "low"), ("hard", "soft"),
    ("young", "old"), ("rich", "poor"), ("strong", "weak"), ("wet", "dry"), ("thick", "thin"),
    ("loud", "quiet"), ("clean", "dirty"), ("long", "short"), ("wide", "narrow"),
    ("deep", "shallow"), ("sharp", "dull"), ("brave", "afraid"), ("cheap", "expensive"),
    ("safe", "dangerous"), ("easy", "difficult"), ("true", "false"), ("win", "lose"), ("buy", "sell"),
    ("push", "pull"), ("give", "take"), ("begin", "end"), ("arrive", "leave"), ("accept", "refuse"),
    ("add", "remove"), ("above", "below"), ("inside", "outside"), ("before", "after"), ("up", "down"),
    ("left", "right"), ("always", "never"), ("first", "last"), ("friend", "enemy"), ("day", "night"),
    ("love", "hate"), ("war", "peace"), ("question", "answer"), ("north", "south"), ("east", "west"),
    ("sweet", "bitter"), ("polite", "rude"), ("generous", "selfish"), ("ancient", "modern"),
    ("visible", "hidden"), ("wild", "tame"), ("rough", "smooth"), ("tight", "loose"),
    ("awake", "asleep"), ("major", "minor"), ("victory", "defeat"), ("guilty", "innocent"),
)


def arithmetic(rng: random.Random) -> Task:
    """Add or subtract two numbers below 100 (results are never negative)."""
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        templates = (
            ("What is {a} plus {b}?", ""),
            ("Add {a} and {b}.", ""),
            ("Calculate {a} + {b}.", ""),
            ("Compute the sum of the two numbers.", "{a}, {b}"),
            ("Find the total of these numbers.", "{a} and {b}"),
        )
        result = a + b
    else:
        a, b = max(a, b), min(a, b)
        templates = (
            ("What is {a} minus {b}?", ""),
            ("Subtract {b} from {a}.", ""),
            ("Calculate {a} - {b}.", ""),
            ("Compute the first number minus the second.", "{a}, {b}"),
            ("How much is left when you take {b} away from {a}?", ""),
        )
        result = a - b
    instruction, input_ = rng.choice(templates)
    return instruction.format(a=a, b=b), input_.format(a=a, b=b), str(result)


def reverse(rng: random.Random) -> Task:
    """Spell a word backwards."""
    word = rng.choice(WORDS)
    instruction, input_ = rng.choice((
        ('Reverse the word "{w}".', ""),
        ("Spell {w} backwards.", ""),
        ("What is {w} spelled backwards?", ""),
        ("Write the following word in reverse order.", "{w}"),
        ("Reverse the letters of the given word.", "{w}"),
    ))
    return instruction.format(w=word), input_.format(w=word), word[::-1]


def uppercase(rng: random.Random) -> Task:
    """Rewrite a two- or three-word phrase in capital letters."""
    phrase = " ".join(rng.sample(WORDS, rng.randint(2, 3)))
    instruction, input_ = rng.choice((
        ("Convert the text to uppercase.", "{w}"),
        ('Write "{w}" in capital letters.', ""),
        ("Make this phrase all caps.", "{w}"),
        ("Rewrite {w} using only uppercase letters.", ""),
        ("Change every letter of the phrase to a capital.", "{w}"),
    ))
    return instruction.format(w=phrase), input_.format(w=phrase), phrase.upper()


def sort(rng: random.Random) -> Task:
    """Sort three to five numbers (either direction) or words (alphabetically)."""
    kind = rng.choice(("ascending", "descending", "words"))
    if kind == "words":
        items = rng.sample(WORDS, rng.randint(3, 5))
        ordered = sorted(items)
        templates = ("Sort the words alphabetically.", "Put these words in alphabetical order.",
                     "Arrange the following words from A to Z.")
    else:
        numbers = rng.sample(range(100), rng.randint(3, 5))
        items = [str(n) for n in numbers]
        ordered = [str(n) for n in sorted(numbers, reverse=kind == "descending")]
        templates = {
            "ascending": ("Sort these numbers from smallest to largest.",
                          "Arrange the numbers in ascending order.", "Put the numbers in increasing order."),
            "descending": ("Sort these numbers from largest to smallest.",
                           "Arrange the numbers in descending order.", "Put the numbers in decreasing order."),
        }[kind]
    return rng.choice(templates), ", ".join(items), ", ".join(ordered)


def capitals(rng: random.Random) -> Task:
    """Look up a country's capital, or the country of a capital, in a small table."""
    country, capital = rng.choice(CAPITALS)
    if rng.random() < 0.6:
        instruction, input_ = rng.choice((
            ("What is the capital of {w}?", ""),
            ("Name the capital city of {w}.", ""),
            ("Which city is the capital of {w}?", ""),
            ("Give the capital of the country.", "{w}"),
            ("Tell me the capital city of the following country.", "{w}"),
            ("{w} has which city as its capital?", ""),
        ))
        return instruction.format(w=country), input_.format(w=country), capital
    instruction, input_ = rng.choice((
        ("Which country has {w} as its capital?", ""),
        ("{w} is the capital of which country?", ""),
        ("Name the country whose capital is given.", "{w}"),
        ("In which country is the capital city {w}?", ""),
    ))
    return instruction.format(w=capital), input_.format(w=capital), country


def antonyms(rng: random.Random) -> Task:
    """Give the opposite of a word (pairs are used in both directions)."""
    word, opposite = rng.choice(ANTONYMS)
    if rng.random() < 0.5:
        word, opposite = opposite, word
    instruction, input_ = rng.choice((
        ('What is the opposite of "{w}"?', ""),
        ("Give an antonym for {w}.", ""),
        ("The opposite of {w} is what?", ""),
        ("Write a word that means the opposite of the given word.", "{w}"),
        ("Name the antonym of the following word.", "{w}"),
    ))
    return instruction.format(w=word), input_.format(w=word), opposite


FAMILIES: dict[str, Family] = {
    "arithmetic": arithmetic,
    "reverse": reverse,
    "uppercase": uppercase,
    "sort": sort,
    "capitals": capitals,
    "antonyms": antonyms,
}


def unique_tasks(rng: random.Random, family: Family, n: int) -> list[Task]:
    """Draw ``n`` tasks of one family whose ``(instruction, input)`` pairs are all distinct.

    Args:
        rng: The seeded random source.
        family: The family's task sampler.
        n: How many distinct tasks to draw.

    Returns:
        The tasks, in the order they were first drawn.

    Raises:
        RuntimeError: The family cannot produce ``n`` distinct tasks.
    """
    seen: dict[tuple[str, str], Task] = {}
    for _ in range(100 * n):
        task = family(rng)
        seen.setdefault(task[:2], task)
        if len(seen) == n:
            return list(seen.values())
    raise RuntimeError(f"{family.__name__} produced only {len(seen)} distinct tasks, {n} needed")


def _record(record_id: str, category: str, task: Task) -> dict[str, str]:
    instruction, input_, output = task
    return {"id": record_id, "category": category, "instruction": instruction,
            "input": input_, "output": output}


def make_records(seed: int, per_family: int, queries: int) -> tuple[list[dict], list[dict]]:
    """Generate the training records (shuffled) and the held-out queries.

    Args:
        seed: Seed of the only random source.
        per_family: Training examples per family.
        queries: Held-out queries per family.

    Returns:
        ``(train, queries)``, lists of records.
    """
    rng = random.Random(seed)
    train: list[dict] = []
    held_out: list[dict] = []
    for name, family in FAMILIES.items():
        tasks = unique_tasks(rng, family, per_family + queries)
        held_out += [_record(f"q-{name}-{i}", name, t) for i, t in enumerate(tasks[:queries])]
        train += [_record(f"{name}-{i:05d}", name, t) for i, t in enumerate(tasks[queries:])]
    rng.shuffle(train)
    return train, held_out


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with ``<|endoftext|>`` as token 0.

    Byte-level pre-tokenization makes every string encodable and ``decode(encode(x)) == x``.

    Args:
        texts: The training texts.
        vocab_size: The largest vocabulary size (the trainer may stop earlier).

    Returns:
        The trained tokenizer.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    """Write one compact JSON object per line, ``\\n``-terminated, UTF-8."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and write the three files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="output directory (default: next to this script)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--per-family", type=int, default=DEFAULT_PER_FAMILY)
    parser.add_argument("--queries", type=int, default=DEFAULT_QUERIES, help="held-out queries per family")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)

    train, held_out = make_records(args.seed, args.per_family, args.queries)
    template = PromptTemplate()
    tokenizer = train_tokenizer((template.prompt(r) + template.response(r) for r in train), args.vocab_size)

    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "instructions.jsonl", train)
    write_jsonl(args.out / "queries.jsonl", held_out)
    tokenizer.save(str(args.out / "tokenizer.json"), pretty=False)
    print(f"wrote {len(train)} training records, {len(held_out)} queries and a "
          f"{tokenizer.get_vocab_size()}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()

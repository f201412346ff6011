"""Synthetic long-context tasks, generated locally: passkey retrieval, needle in a haystack (single, multi-key,
multi-value, as RULER defines its niah variants), variable tracking and common-word extraction.

A sample is a recipe: its kind, context length, needle depth, index and seed fix the needles, the question
and the answers (:func:`synthetic_samples`, no tokenizer needed, so a sweep can resume before any model
loads).  :func:`build_prompt` then lays the prompt out in the model's own tokens: chat template, instruction,
haystack with the needles, question and the opening of the answer (RULER's answer prefix), filling the
haystack so that prompt plus ``max_new_tokens`` is the context length, and putting the needle at the stated
depth measured in tokens of the haystack (at the nearest sentence end).  The needles' token ids are placed
whole, so every answer is in the prompt by construction (and checked).

Haystacks: RULER's repeated "noise" sentences (passkey, variable tracking) or real prose (the Austen novels
of the shared data, niah); common-word extraction draws its words from the novels' vocabulary.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .sample import Sample

__all__ = ["KINDS", "SyntheticKind", "build_prompt", "score_answers", "synthetic_samples"]

_TITLES = frozenset({"Mr", "Mrs", "Ms", "Dr", "St"})  # "Mr." ends no sentence
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_ADJECTIVES = (
    "amber ancient bitter brave calm clever crimson curious dusty eager faint fancy fierce gentle golden grumpy "
    "hollow humble icy jolly lazy little lucky mellow misty noble odd pale plain proud quiet rapid rusty shiny "
    "silent silver sleepy slim smooth sober solid spicy steady sunny swift tender tiny velvet vivid wild witty"
).split()
_NOUNS = (
    "anchor badger barrel beacon bridge candle canyon cellar comet cottage crystal dragon falcon feather forest "
    "garden glacier harbor helmet island jackal kettle lantern lemon meadow mirror monkey needle orchard otter "
    "parrot pebble pepper pillow planet rabbit river saddle spider statue temple thunder tiger tunnel violin walrus"
).split()


@dataclass(frozen=True)
class SyntheticKind:
    """One synthetic task: its haystack and the defaults of its length of answer."""

    name: str
    description: str
    haystack: str  # "noise" (repeated sentences), "book" (prose) or "words" (a numbered word list)
    max_new_tokens: int
    uses_depth: bool = True


KINDS: dict[str, SyntheticKind] = {
    k.name: k
    for k in (
        SyntheticKind("passkey", "a 5-digit pass key in repeated filler (Mohtashami & Jaggi)", "noise", 12),
        SyntheticKind("niah_single", "one word key -> 7-digit value in prose (RULER niah_single_2)", "book", 20),
        SyntheticKind("niah_multikey", "4 keys in prose, one asked (RULER niah_multikey_1)", "book", 20),
        SyntheticKind("niah_multivalue", "one key with 4 values in prose (RULER niah_multivalue)", "book", 56),
        SyntheticKind("vt", "a chain of 5 variable assignments in filler (RULER vt, 1 chain, 4 hops)", "noise", 32),
        SyntheticKind("cwe", "the 10 most common words of a numbered list (RULER cwe)", "words", 48, False),
    )
}


# -- recipes (no tokenizer) -----------------------------------------------------------------------------
def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _distinct(draw, count: int) -> list[str]:
    found: list[str] = []
    while len(found) < count:
        value = draw()
        if value not in found:
            found.append(value)
    return found


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _niah(rng: random.Random, keys: int, values: int) -> dict:
    names = _distinct(lambda: _key(rng), keys)
    found = {name: [_number(rng, 7) for _ in range(values)] for name in names}
    key, answers = names[0], found[names[0]]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k in names for v in found[k]]
    one = values == 1
    noun = "number" if one else "numbers"
    return {
        "instruction": f"{'A special magic number is' if one else 'Some special magic numbers are'} hidden within "
        f"the following text. Make sure to memorize it. I will quiz you about the {noun} afterwards.",
        "needles": needles,  # the first is the asked key's first value: the one placed at the depth
        "question": f"What {'is the special magic number' if one else 'are all the special magic numbers'} for "
        f"{key} mentioned in the provided text?",
        "answer_prefix": f"The special magic {noun} for {key} mentioned in the provided text {'is' if one else 'are'}",
        "answers": answers,
    }


def _passkey(rng: random.Random) -> dict:
    key = _number(rng, 5)
    return {
        "instruction": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "it. I will quiz you about the important information there.",
        "needles": [f"The pass key is {key}. Remember it. {key} is the pass key."],
        "question": "What is the pass key?",
        "answer_prefix": "The pass key is",
        "answers": [key],
    }


def _vt(rng: random.Random, hops: int = 4) -> dict:
    names = _distinct(lambda: "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)), hops + 1)
    value = _number(rng, 5)
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:], strict=False)]
    return {
        "instruction": "Memorize and track the chain(s) of variable assignment hidden in the following text.",
        "needles": needles,
        "question": f"Question: Find all variables that are assigned the value {value} in the text above.",
        "answer_prefix": "Answer: According to the chain(s) of variable assignment in the text above, "
        f"{len(names)} variables are assigned the value {value}, they are:",
        "answers": names,
    }


def _cwe(rng: random.Random, vocabulary: list[str], common: int = 10) -> dict:
    words = rng.sample(vocabulary, min(len(vocabulary), 2000))
    return {
        "instruction": "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.",
        "needles": [],
        "question": f"Question: What are the {common} most common words in the above list?",
        "answer_prefix": f"Answer: The top {common} words that appear most often in the list are:",
        "answers": words[:common],
        "rare": words[common:],
        "shuffle": rng.randrange(2**31),
    }


@cache
def _book_text(pattern: str) -> str:
    """The prose of the files matching ``pattern``, one space between lines (``ValueError`` when none)."""
    path = Path(pattern)
    files = sorted(path.parent.glob(path.name))
    if not files:
        raise ValueError(f"data file not found: {path}")
    return " ".join(" ".join(f.read_text(encoding="utf-8").split()) for f in files)


@cache
def _vocabulary(pattern: str) -> list[str]:
    return sorted(set(re.findall(r"\b[a-z]{4,9}\b", _book_text(pattern))))


def synthetic_samples(
    kind: str, contexts: list[int], depths: list[float], per_cell: int, seed: int, haystack: Path | None
) -> list[Sample]:
    """``per_cell`` samples per (context, depth) (only per context for kinds without a depth), each drawn from
    its own generator seeded by (kind, context, depth, index, seed): a cell's samples never depend on the
    other cells asked for.  ``haystack``: the prose files (a glob) for the kinds that need them."""
    spec = KINDS[kind]
    if per_cell < 1:
        raise ValueError(f"--per-cell must be >= 1, got {per_cell}")
    if any(c < 1 for c in contexts) or any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"contexts must be >= 1 and depths in [0, 1], got {contexts} and {depths}")
    samples = []
    for context in contexts:
        for depth in depths if spec.uses_depth else [None]:
            for index in range(per_cell):
                rng = random.Random(f"{kind}/{context}/{depth}/{index}/{seed}")
                if kind == "passkey":
                    recipe = _passkey(rng)
                elif kind == "vt":
                    recipe = _vt(rng)
                elif kind == "cwe":
                    recipe = _cwe(rng, _vocabulary(str(haystack)))
                else:
                    keys, values = {"niah_single": (1, 1), "niah_multikey": (4, 1), "niah_multivalue": (1, 4)}[kind]
                    recipe = _niah(rng, keys, values)
                recipe.update(kind=kind, context=context, depth=depth, index=index, seed=seed)
                recipe.update(haystack=None if spec.haystack == "noise" else str(haystack))
                recipe["offset"] = rng.random()  # where in the prose the haystack starts
                recipe["places"] = [rng.random() for _ in recipe["needles"][1:]]  # the other needles' depths
                name = f"{kind}-{context}" + (f"-d{depth:g}" if depth is not None else "") + f"-{index}"
                samples.append(Sample(name, "", list(recipe["answers"]), query=recipe["question"], extra=recipe))
    return samples


# -- prompts (the model's tokenizer) --------------------------------------------------------------------
def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False, verbose=False)["input_ids"]


def _sentence_ends(tok, ids: list[int]) -> list[int]:
    """Offsets in ``ids`` right after a sentence's end (0 and ``len(ids)`` included)."""
    pieces = [str(p).lstrip("\u0120 ") for p in tok.convert_ids_to_tokens(ids)]
    ends = [
        i + 1
        for i, p in enumerate(pieces)
        if p.rstrip("\"'").endswith((".", "!", "?")) and not (p == "." and i and pieces[i - 1] in _TITLES)
    ]
    return sorted({0, *ends, len(ids)})


def _haystack_ids(tok, recipe: dict, length: int) -> list[int]:
    """``length`` tokens of the recipe's haystack."""
    if recipe["haystack"] is None:
        unit = _encode(tok, " " + NOISE)
        return (unit * (length // len(unit) + 1))[:length]
    text = _book_text(recipe["haystack"])
    chars = 6 * length + 100
    start = int(recipe["offset"] * max(0, len(text) - chars))
    start = text.find(". ", start) + 1 or start  # from a sentence's start
    while True:
        ids = _encode(tok, text[start : start + chars])
        if len(ids) > length or start + chars >= len(text):
            return ids[:length]
        chars *= 2


def _word_list(tok, recipe: dict, length: int) -> list[int]:
    """RULER's numbered word list in at most ``length`` tokens (and close to it): 10 common words, each several
    times more frequent than the rare ones, shuffled."""
    per_item, ids = 6.0, []
    for _ in range(6):
        items = max(20, int(length / per_item))
        common = max(2, min(30, items // 30))
        rare_each = 3 if common >= 10 else 1
        rare = recipe["rare"][: max(1, (items - 10 * common) // rare_each)]
        words = [w for w in recipe["answers"] for _ in range(common)] + [w for w in rare for _ in range(rare_each)]
        random.Random(recipe["shuffle"]).shuffle(words)
        ids = _encode(tok, " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)))
        if 0.95 * length <= len(ids) <= length:
            break
        per_item = len(ids) / len(words) * (1.01 if len(ids) > length else 1.0)
    if len(ids) > length:
        raise ValueError(f"context {recipe['context']} is too short for cwe")
    return ids


def build_prompt(tok, recipe: dict, max_new_tokens: int, chat: tuple[list[int], list[int]]) -> tuple[list[int], dict]:
    """The prompt's token ids for a recipe of :func:`synthetic_samples`, and where its needle went.

    ``chat``: the ids before and after the user's message (:func:`kvkeep.eval.tasks.common.chat_parts`).  The
    prompt has ``context - max_new_tokens`` tokens (cwe: at most that).  Returns ``(ids, info)``; ``info``
    holds ``depth_actual`` (tokens of haystack before the first needle / haystack tokens) and
    ``needle_token`` (the first needle's offset in ``ids``).
    """
    head = chat[0] + _encode(tok, recipe["instruction"] + "\n\n")
    tail = _encode(tok, "\n\n" + recipe["question"]) + chat[1] + _encode(tok, recipe["answer_prefix"])
    needles = [_encode(tok, " " + n) for n in recipe["needles"]]
    room = recipe["context"] - max_new_tokens - len(head) - len(tail) - sum(map(len, needles))
    if room < 16:
        raise ValueError(
            f"context {recipe['context']} is too short for {recipe['kind']} with {max_new_tokens} new tokens"
        )
    if recipe["kind"] == "cwe":
        ids = head + _word_list(tok, recipe, room) + tail
        return ids, {"depth_actual": None, "needle_token": None}
    hay = _haystack_ids(tok, recipe, room)
    if len(hay) < room:
        raise ValueError(f"the haystack {recipe['haystack']} has fewer than {room} tokens")
    ends = _sentence_ends(tok, hay)
    depth, places = recipe["depth"], recipe["places"]
    if recipe["kind"] == "vt":  # a chain's links follow its first one, in order; RULER's other needles sit anywhere
        places = [depth + p * (1 - depth) for p in sorted(places)]
    depths = [depth, *places]
    cuts = [min(ends, key=lambda e, d=d: abs(e - d * len(hay))) for d in depths]
    order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
    ids, last = list(head), 0
    for i in order:
        ids += hay[last : cuts[i]]
        last = cuts[i]
        if i == 0:
            first = len(ids)
        ids += needles[i]
    ids += hay[last:] + tail
    placed = tok.decode(ids[first : first + len(needles[0])])
    text = tok.decode(ids)
    if not all(answer in text for answer in recipe["answers"]) or recipe["needles"][0] not in placed:
        raise ValueError(f"sample {recipe['kind']}-{recipe['context']}: a needle was not placed whole")
    return ids, {"depth_actual": round(cuts[0] / len(hay), 4), "needle_token": first}


def score_answers(output: str, answers: list[str]) -> float:
    """RULER's string_match_all: the share of ``answers`` found in ``output`` (case-insensitive substrings)."""
    text = output.lower()
    return sum(a.lower() in text for a in answers) / len(answers)

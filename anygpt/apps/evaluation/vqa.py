"""VQAv2 accuracy with the official evaluator's answer normalisation (GT-Vision-Lab's ``vqaEval.py``).

No maintained package ships the evaluator, so its steps are written out here, following it rule by rule:

1. an answer's newlines and tabs become spaces and it is stripped;
2. punctuation: ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted where it touches a space (or anywhere when
   the answer holds a digit-comma-digit group), else replaced by a space; a period not followed by a digit is deleted
   (the evaluator's look-behind is written ``(?!<=\\d)``, which is a look-ahead: kept as it behaves);
3. digits and articles: lower-cased, number words ``none``/``zero`` ... ``ten`` become digits, ``a``/``an``/``the``
   are dropped, apostrophe-less contractions get their apostrophes back (``dont`` -> ``don't``).

The prediction goes through all three; the human answers through step 1, and through step 2 when they are not all
the same (as in the evaluator). The accuracy of a prediction is the mean, over the ten leave-one-out subsets of the
ten human answers, of ``min(1, humans in the subset who gave it / 3)``.
"""

from __future__ import annotations

import re
from itertools import product

__all__ = ["normalize_answer", "vqa_accuracy"]

_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# The evaluator's contractions, written with their apostrophes; every spelling with fewer apostrophes maps to them.
# (Its "I'm", "I've", "I'd" entries have capitalised keys that never match a lower-cased word: left out.)
_CANONICAL = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've mustn't
must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't shouldn't've somebody'd
somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've
something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've
we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll
why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"""


def _contractions() -> dict[str, str]:
    table: dict[str, str] = {}
    for word in _CANONICAL.split():
        pieces = word.split("'")
        for kept in product((False, True), repeat=len(pieces) - 1):
            spelled = pieces[0] + "".join(("'" if keep else "") + p for keep, p in zip(kept, pieces[1:], strict=True))
            if spelled != word:
                table[spelled] = word
    return table


_CONTRACTIONS = _contractions()


def _whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _punctuation(text: str) -> str:
    out = text
    for mark in _PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)  # the evaluator passes re.UNICODE (32) as the count


def _digits_and_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the evaluator compares it (steps 1-3 of the module docstring).

    Example:
        >>> normalize_answer("Two dogs.")
        '2 dogs'
    """
    return _digits_and_articles(_punctuation(_whitespace(answer)))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The VQAv2 accuracy of one predicted answer against the human answers (normally ten).

    Raises:
        ValueError: no human answers.
    """
    if not answers:
        raise ValueError("vqa_accuracy: expected at least one human answer")
    predicted = normalize_answer(prediction)
    humans = [_whitespace(a) for a in answers]
    if len(set(humans)) > 1:
        humans = [_punctuation(a) for a in humans]
    scores = []
    for left_out in range(len(humans)):
        matching = sum(1 for i, a in enumerate(humans) if i != left_out and a == predicted)
        scores.append(min(1.0, matching / 3))
    return sum(scores) / len(scores)

"""Scoring answers: the VQA answer normalisation (as lmms-eval applies it), exact match and VQA accuracy. `pmod eval`
(`pmod.pipelines.evaluate`) scores with these; they need nothing but the strings."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import PModInputError

# ====================================================================== answer normalisation
# The VQA evaluation's answer normalisation as lmms-eval applies it (its EvalAIAnswerProcessor, which the VQAv2,
# TextVQA, OK-VQA and VizWiz tasks use), so that pmod's scores compare with lmms-eval's: lower case; commas and
# question marks deleted and "'s" split off as a word ("it's" -> "it 's"); other punctuation removed or turned into
# spaces; periods not followed by a digit removed; number words up to ten as digits; articles dropped; and
# apostrophe-less contractions ("dont") restored ("don't"). The one difference: lmms-eval's contraction table has a
# few entries that can never match or that drop an apostrophe ("somebody'd" -> "somebodyd"), and lacks some
# apostrophe-less spellings ("shes", "couldntve"); pmod restores every apostrophe-less spelling of the same
# contractions instead (tests/pipelines/test_evaluate.py lists both the agreement and these differences).
_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
# Contractions whose apostrophe-less spellings are restored. Forms that would collide with ordinary words
# (he'll/hell, we're/were, it's/its, let's/lets, i'd/id, she'll/shell, we'll/well, we'd/wed, she'd/shed) are left
# out, as in the official list.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't "
    "must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't shouldn't've "
    "somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've "
    "who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
    "y'all'd've you'd you'd've you'll you're you've"
).split()


def _apostrophe_variants(word: str) -> set[str]:
    """Every spelling of ``word`` with some (possibly all) of its apostrophes dropped, ``word`` excluded."""
    spellings = {""}
    for ch in word:
        spellings = {s + ch for s in spellings} | ({s for s in spellings} if ch == "'" else set())
    spellings.discard(word)
    return spellings


_CONTRACTIONS = {variant: word for word in _CONTRACTED for variant in _apostrophe_variants(word)}


def _strip_punctuation(text: str) -> str:
    # A mark next to a space is deleted; a mark inside a word ("yes/no") becomes a space.
    out = text
    for mark in _PUNCTUATION:
        if mark not in out:
            continue
        delete = (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if delete else " ")
    return _PERIOD.sub("", out)


def normalize_answer(text: str) -> str:
    """VQA answer normalisation: ``"Two dogs."`` -> ``"2 dogs"``, ``"The cat"`` -> ``"cat"``, ``"isnt"`` -> ``"isn't"``,
    ``"It's red!"`` -> ``"it 's red"``.

    Applied to predictions and references alike (the official script applies it to both when the human answers
    disagree, and the answers in the released annotations are already in this form).
    """
    # commas go before anything else, so "1,000" is "1000" and "hi,there" is "hithere"
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    words = []
    for word in _strip_punctuation(text).split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def _plain(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text.lower()).strip()


def exact_match(prediction: str, reference: str) -> bool:
    """Equality after `normalize_answer`.

    A reference that normalises to nothing (e.g. the option letter ``"A"``, an article) is compared in lower
    case without punctuation instead, so that an empty prediction does not match it.
    """
    ref = normalize_answer(reference)
    if not ref:
        return bool(_plain(reference)) and _plain(prediction) == _plain(reference)
    return normalize_answer(prediction) == ref


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers: min(#humans who gave it / 3, 1).

    As in the official evaluation, the score is averaged over the leave-one-out subsets of the answers
    (10 subsets of 9 for VQAv2), so 3 matching answers out of 10 score 0.9 and 4 or more score 1.0. With a
    single answer it is the exact match.
    """
    if not answers:
        raise PModInputError("vqa_score needs at least one reference answer")
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in answers]
    if len(answers) == 1:
        return float(hits[0])
    total = sum(hits)
    return sum(min(1.0, (total - hit) / 3.0) for hit in hits) / len(answers)

"""The offline compressor: Selective-Context-style self-information from cl100k BPE ranks.

Method
------
Selective Context (Li et al., 2023) keeps the lexical units with the highest self-information
``I(x) = -log p(x)`` under a language model. Without a model we approximate ``p`` from the
tokenizer we already ship: cl100k_base's BPE merges were learned in frequency order, so a token's
id (its merge rank) is a good proxy for its frequency rank. Under Zipf's law ``p(r) ≈ 1 / (r · H_N)``,
hence ``-log p(r) ≈ ln(r) + ln(H_N)`` with ``H_N ≈ ln(100k) + 0.58 ≈ 12.1``. A word's information is
the sum over its tokens (of the lower-cased word with a leading space, as it appears mid-text), so
rare words and words that BPE must split into pieces score high, and "the", "to", "was" score low.

Words are ranked by ``tier · 1000 + information`` where the tiers encode what a memory must not lose
and what it can lose first:

* tier 3 (protected): numbers and anything with a digit, dates and time words (months, weekdays,
  "yesterday", "last", "ago", ...), number words, negations ("not", "never", "no", "n't", ...),
  question words, and names: a capitalised word mid-sentence or an acronym, or a sentence-initial
  capitalised word whose capitalised form is more frequent in cl100k than its lower-case form
  ("John", "Paris", "Caroline" but not "Yesterday", "Hope");
* tier 1: every other content word, ordered by information;
* tier 0: stop words (articles, pronouns, auxiliaries, prepositions, ...);
* tier -1: fillers ("um", "uh", "yeah", "okay", "basically", ...) and bare punctuation / symbols.

The budget is measured in **cl100k tokens** (the unit of ``CompressedTurn.raw_tokens`` /
``compressed_tokens`` and of LLMLingua-2's rate): words are taken in rank order while their tokens fit
into ``rate × tokens(turn)``; a word that does not fit is skipped and smaller ones may still fill the
budget. Protection is a priority, not a guarantee: a turn made only of numbers still respects the rate.
Kept words are emitted in their original order with their attached punctuation; when a dropped word
ended a sentence (``.``, ``!``, ``?``) its final punctuation moves onto the previous kept word so
sentence and question boundaries survive. Newlines between kept words are preserved.

Words are whitespace-delimited, so text without spaces (Chinese, Japanese) is one "word" and is kept
whole; LLMLingua-2 (multilingual) is the compressor for such users.

Everything is deterministic (ties break by position) and cached per distinct word, which makes the
compressor fast (well above 5,000 conversational turns per second on one core).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

from streams.tokens import encoding

NAME = "offline-selfinfo"

_LOG_HARMONIC = math.log(math.log(100_000) + 0.5772)  # ln(H_N) for a ~100k vocabulary

STOPWORDS = frozenset(
    """
    a an the and or but if then than so as of at by for with about against between into through during
    before after above below to from up down in out on off over under again further once here there all any
    both each few more most other some such only own same too very s t can will just should now
    i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers
    herself it its itself they them their theirs themselves this that these those am is are was were be been
    being have has had having do does did doing would could might must shall may also i'm i've i'd i'll
    you're you've you'd you'll he's she's it's we're we've we'd we'll they're they've they'd they'll that's
    there's here's let's what's which's because while until although though whether either yet
    """.split()
)

FILLERS = frozenset(
    """
    um umm uh uhh uh-huh hmm hm mm mhm er erm ah ahh oh ooh wow yeah yep yup yes ok okay hey hi hello
    well like basically actually literally really totally just kinda sorta anyway anyways lol haha hahaha
    gonna wanna gotta right sure oops
    """.split()
)

NEGATIONS = frozenset(
    """
    not no never none nobody nothing nowhere neither nor without cannot can't won't don't doesn't didn't
    isn't aren't wasn't weren't hasn't haven't hadn't shouldn't wouldn't couldn't mustn't needn't ain't
    """.split()
)

QUESTION_WORDS = frozenset("what when where who whom whose why how which".split())

TIME_WORDS = frozenset(
    """
    january february march april june july august september october november december jan feb mar apr
    jun jul aug sep sept oct nov dec monday tuesday wednesday thursday friday saturday sunday today tonight
    tomorrow yesterday morning afternoon evening night weekend week weeks month months year years decade
    ago last next recently soon since later earlier birthday anniversary
    zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen
    seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand
    million billion first second third fourth fifth sixth seventh eighth ninth tenth half twice
    """.split()
)

_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")
_SENTENCE_END = re.compile(r"[.!?]+$")
_CLOSERS = "\"')]}»”’"
_SPACE_OR_WORD = re.compile(r"\s+|\S+")

TIER_PROTECTED = 3
TIER_CONTENT = 1
TIER_STOP = 0
TIER_FILLER = -1


class WordInfo(NamedTuple):
    tokens: int  # cl100k tokens of " " + word (as it appears mid-text)
    info: float  # approximate self-information of the lower-cased core
    tier_start: int  # tier at the start of a sentence
    tier_mid: int  # tier inside a sentence (capitalised content words count as names there)
    sentence_end: str  # the word's sentence-final punctuation ("" when it does not end a sentence)

    def priority(self, sentence_start: bool) -> float:
        return (self.tier_start if sentence_start else self.tier_mid) * 1000 + min(self.info, 999.0)


def _normalise(core: str) -> str:
    return core.lower().replace("’", "'")


def _base_tier(low: str, core: str) -> int:
    if any(ch.isdigit() for ch in core) or low in TIME_WORDS or core == "May":
        return TIER_PROTECTED
    if low in NEGATIONS or low.endswith("n't") or low in QUESTION_WORDS:
        return TIER_PROTECTED
    if low in FILLERS:
        return TIER_FILLER
    if low in STOPWORDS:
        return TIER_STOP
    return TIER_CONTENT


@lru_cache(maxsize=1 << 16)
def analyse(word: str) -> WordInfo:
    """Scores of one whitespace-delimited word (cached: conversational vocabularies repeat)."""
    enc = encoding()
    tokens = len(enc.encode_ordinary(" " + word))
    end = _SENTENCE_END.search(word.rstrip(_CLOSERS))
    sentence_end = end.group() if end is not None else ""
    core = _EDGE_PUNCT.sub("", word)
    if not core:
        return WordInfo(tokens, 0.0, TIER_FILLER, TIER_FILLER, sentence_end)
    low = _normalise(core)
    ranks = enc.encode_ordinary(" " + low)
    info = sum(math.log1p(r) + _LOG_HARMONIC for r in ranks)
    tier = _base_tier(low, core)
    tier_start = tier_mid = tier
    acronym = len(core) > 1 and core.isupper() and any(ch.isalpha() for ch in core)
    if acronym and tier in (TIER_CONTENT, TIER_STOP):
        tier_start = tier_mid = TIER_PROTECTED
    elif tier == TIER_CONTENT and core[0].isupper():
        tier_mid = TIER_PROTECTED  # a capitalised word inside a sentence: a name
        cap = enc.encode_ordinary(" " + core[0] + low[1:])
        if len(cap) < len(ranks) or (len(cap) == len(ranks) == 1 and cap[0] < ranks[0]):
            tier_start = TIER_PROTECTED  # "John", "Paris": the capitalised form is the common one
    return WordInfo(tokens, info, tier_start, tier_mid, sentence_end)


def compress_text(text: str, rate: float) -> str:
    """Keep about ``rate`` of the cl100k tokens of ``text``: its most informative words, in order."""
    if not 0 < rate <= 1:
        raise ValueError(f"rate must be in (0, 1], got {rate}")
    words = text.split()
    if not words:
        return ""
    if rate >= 1:
        return text
    infos = [analyse(w) for w in words]
    prio: list[tuple[float, int]] = []
    sentence_start = True
    total = 0
    for i, a in enumerate(infos):
        prio.append((-a.priority(sentence_start), i))
        sentence_start = bool(a.sentence_end)
        total += a.tokens
    prio.sort()
    budget = rate * total + 0.5
    keep = [False] * len(words)
    used = 0
    for _, i in prio:
        t = infos[i].tokens
        if used + t <= budget:
            keep[i] = True
            used += t
    if used == 0:
        keep[prio[0][1]] = True
    newline_before = _newlines_before(text) if "\n" in text else None
    out: list[str] = []
    newline = False
    for i, w in enumerate(words):
        if newline_before is not None and newline_before[i]:
            newline = True
        if keep[i]:
            if out:
                out.append("\n" if newline else " ")
            out.append(w)
            newline = False
        else:
            end = infos[i].sentence_end
            if end and out and out[-1][-1] not in ",;:" and not _SENTENCE_END.search(out[-1].rstrip(_CLOSERS)):
                out[-1] += end
    return "".join(out)


def _newlines_before(text: str) -> list[bool]:
    """For each whitespace-delimited word: whether the whitespace right before it holds a newline."""
    flags: list[bool] = []
    seen = False
    for m in _SPACE_OR_WORD.finditer(text):
        if m.group()[0].isspace():
            seen = seen or "\n" in m.group()
        else:
            flags.append(seen)
            seen = False
    return flags


class OfflineSelfInfoCompressor:
    """Deterministic, model-free compressor (see the module docstring for the method)."""

    name = NAME

    def compress_texts(self, texts: Sequence[str], rate: float) -> list[str]:
        return [compress_text(t, rate) for t in texts]

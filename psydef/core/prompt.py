"""The LLM prompt: a DMRS label guide, the recent conversation tagged ``SEEKER:`` / ``SUPPORTER:``,
the marked target utterance and an instruction to answer with one integer 0..8.

Given a tokenizer, ``build_prompt`` fits the prompt into ``max_length`` tokens by dropping the
OLDEST context turns first: the guide, the target utterance and the instruction are never cut
(plain right-truncation would cut the target, which comes last, on long dialogues)."""
from __future__ import annotations

from functools import lru_cache
from itertools import accumulate
from typing import Mapping, Sequence

from psydef.core.labels import LEVELS

Turn = Mapping[str, str]  # {"text": ..., "speaker": "seeker" | "supporter"}

# Our wording of what each level means; the mechanism names come from psydef.core.labels.
_LEVEL_MEANINGS = {
    0: "the utterance shows no defensive process (greetings, thanks, plain facts or requests).",
    1: "conflict is discharged through action or withdrawal instead of reflection, or help is "
       "asked for and then rejected, or hostility is expressed indirectly.",
    2: "gross distortion of the image of self or others: people are seen as all good or all bad, "
       "or one's own unbearable feelings are induced in and blamed on others.",
    3: "unpleasant facts, feelings or responsibility are kept out of awareness: refused, "
       "attributed to others, explained away with plausible excuses, or replaced by daydreams.",
    4: "self-esteem is protected by exaggerated images: oneself or others are idealized or "
       "devalued, or one acts as if all-powerful.",
    5: "wishes or feelings are kept out of awareness or redirected: forgotten, split off from "
       "consciousness, turned into their opposite, or shifted onto a safer target.",
    6: "feelings are kept at a distance through thinking: facts without emotion, abstract "
       "generalities, or words and acts that symbolically cancel a previous one.",
    7: "the stressor is faced with awareness and healthy coping: seeking support, helping others, "
       "planning ahead, humor, asserting oneself, self-reflection, channeling or deliberately "
       "setting worries aside.",
    8: "the utterance is too short, vague or context-dependent to rate a defense level.",
}
assert set(_LEVEL_MEANINGS) == {level.id for level in LEVELS}


def _level_line(level) -> str:
    mechanisms = f" Mechanisms: {', '.join(level.mechanisms)}." if level.mechanisms else ""
    return f"{level.id} = {level.name}: {_LEVEL_MEANINGS[level.id]}{mechanisms}"


GUIDE = (
    "You are an expert clinical psychologist who rates psychological defense mechanisms with the "
    "Defense Mechanism Rating Scales (DMRS). Below is an emotional-support conversation between a "
    "SEEKER and a SUPPORTER. Rate the defense level the seeker shows in the target utterance; the "
    "earlier turns are context only.\n\n"
    "DMRS defense levels:\n" + "\n".join(_level_line(level) for level in LEVELS) + "\n\n"
)
# Every section starts on a "## " line, never with a blank line: a blank line after a turn would
# tokenize together with the turn's last characters and spoil the per-piece token counts.
_CONTEXT_HEADER = "## Conversation so far (oldest first)\n"
_OMITTED = "[earlier turns omitted]\n"
_NO_CONTEXT = "(none: the target utterance opens the conversation)\n"
_TARGET_HEADER = "## Target utterance (the seeker's latest turn, to classify)\n"
_INSTRUCTION = ("## Question\nWhich DMRS defense level (0-8) does the seeker show in the target "
                "utterance? Answer with a single integer from 0 to 8.\nAnswer:")
_SHORTENED = "[...] "  # marks a target utterance whose beginning was cut to fit (see build_prompt)


def _clean(text: str) -> str:
    """One line per turn: collapse whitespace, so a turn's own newlines cannot break the tagging."""
    return " ".join(str(text).split())


def _line(speaker: str, text: str) -> str:
    return f"{str(speaker).upper()}: {_clean(text)}\n"


def _context_turns(dialogue: Sequence[Turn], max_turns: int) -> tuple[list[str], bool]:
    """Lines of the last ``max_turns`` turns before the target, and whether older turns exist."""
    earlier = list(dialogue)[:-1]
    kept = earlier[max(0, len(earlier) - max_turns):]
    return [_line(turn["speaker"], turn["text"]) for turn in kept], len(kept) < len(earlier)


def _assemble(lines: Sequence[str], omitted: bool, target: str) -> str:
    context = (_OMITTED if omitted else "") + "".join(lines)
    return (GUIDE + _CONTEXT_HEADER + (context or _NO_CONTEXT)
            + _TARGET_HEADER + _line("seeker", target) + _INSTRUCTION)


def _sizes(tokenizer, texts: Sequence[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


@lru_cache(maxsize=8)
def _constant_sizes(tokenizer) -> tuple[int, int]:
    """Token counts of the parts of every prompt (guide, headers, instruction) and of the
    ``[earlier turns omitted]`` line, computed once per tokenizer."""
    guide, target_header, instruction, omitted = _sizes(
        tokenizer, [GUIDE + _CONTEXT_HEADER, _TARGET_HEADER, _INSTRUCTION, _OMITTED])
    return guide + target_header + instruction, omitted


def build_prompt(dialogue: Sequence[Turn], *, max_turns: int = 30, tokenizer=None,
                 max_length: int = 1024) -> str:
    """The classification prompt for the last turn of ``dialogue`` (the target seeker utterance).

    ``max_turns`` is the number of turns BEFORE the target shown as context. Given a ``tokenizer``,
    the prompt (plus the tokenizer's special tokens) fits in ``max_length`` tokens: the oldest
    context turns are dropped first, and an ``[earlier turns omitted]`` line says so. Only when not
    even zero context turns fit (a target utterance of hundreds of words; rare) is the target
    shortened, keeping its END, which is the most recent part of the seeker's turn, behind a
    ``[...]`` mark. Raises ``ValueError`` if ``max_length`` cannot hold the guide and instruction.

    For speed the number of turns to keep comes from adding up the token counts of the pieces (the
    turns and the target line in one batch call, the constant parts once per tokenizer). Pieces end
    with a newline and start with a letter, ``#`` or ``[``, so with Qwen's byte-level BPE the sum is
    exact; one tokenization of the assembled prompt still checks it, for tokenizers where a piece
    boundary merges (it then drops one more turn).
    """
    lines, omitted = _context_turns(dialogue, max_turns)
    target = _clean(dialogue[-1]["text"])
    if tokenizer is None:
        return _assemble(lines, omitted, target)

    budget = max_length - tokenizer.num_special_tokens_to_add()
    constant, omitted_size = _constant_sizes(tokenizer)
    target_size, *line_sizes = _sizes(tokenizer, [_line("seeker", target), *lines])
    fixed = constant + target_size
    if not omitted and fixed + sum(line_sizes) <= budget:
        keep = len(lines)
    else:  # the most recent turns that fit beside the "[earlier turns omitted]" line
        room = budget - fixed - omitted_size
        keep = sum(1 for used in accumulate(reversed(line_sizes)) if used <= room)

    target_ids, cut = None, 0
    while True:
        kept = lines[len(lines) - keep:]
        prompt = _assemble(kept, omitted or keep < len(lines), target)
        excess = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) - budget
        if excess <= 0:
            return prompt
        if keep:
            keep -= 1
            continue
        if target_ids is None:
            target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        cut += excess
        if cut >= len(target_ids):
            raise ValueError(f"max_length={max_length} is too small for the DMRS guide and instruction")
        target = _SHORTENED + tokenizer.decode(target_ids[cut:]).lstrip()

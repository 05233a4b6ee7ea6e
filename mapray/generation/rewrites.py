"""Evol-Instruct rewrites for the second self-play loop: the prompt templates of the five strategies, and the
filters a rewrite must pass before it is sampled from.

The strategies are those of Evol-Instruct (WizardLM, arXiv 2304.12244) as the MAP reference code uses them
(`evol_select/evol_instruct.py`): one in breadth (a new prompt of the same domain) and four in depth. The
templates below are mapray's own wording of them; each asks the policy for the rewritten prompt alone.
"""

from __future__ import annotations

import re

_FRAME = (
    "You are a prompt rewriter. Rewrite the #Given Prompt# into a new prompt, following the #Method#. The new "
    "prompt must be reasonable, understandable by humans and answerable on its own, and it must not mention the "
    "#Given Prompt# or the #Method#. Do not answer it. Keep it at most {growth} times as long as the #Given "
    "Prompt#.\n\n#Method#: {method}\n\n#Given Prompt#:\n{prompt}\n\n#Rewritten Prompt#:\n"
)
METHODS = {
    "breadth": "Create a brand-new prompt in the same domain as the #Given Prompt#, on a rarer topic, of similar "
               "length and difficulty.",
    "deepen": "Increase the depth and breadth of what the #Given Prompt# asks, so that answering it takes more "
              "knowledge of the subject.",
    "constraints": "Add one more constraint or requirement to the #Given Prompt#.",
    "concretize": "Replace general concepts in the #Given Prompt# with more specific ones.",
    "reasoning": "If the #Given Prompt# can be answered with a few simple steps of thought, rewrite it to ask "
                 "explicitly for reasoning in several steps.",
}
# a label the policy may echo before the rewrite ("#Rewritten Prompt#:", "Rewritten prompt:")
_LABEL = re.compile(r"^\s*#*\s*(rewritten|new|created)\s+prompt\s*#*\s*:?\s*", re.IGNORECASE)


def rewrite_request(prompt: str, strategy: str, max_growth: float) -> list[dict]:
    """The chat turn that asks the policy for one rewrite of `prompt` with `strategy`."""
    return [{"role": "user", "content": _FRAME.format(method=METHODS[strategy], prompt=prompt,
                                                       growth=f"{max_growth:g}")}]


def last_user_text(messages: list[dict]) -> str:
    """The text a rewrite starts from: the prompt's last user turn."""
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def clean_rewrite(text: str) -> str:
    return _LABEL.sub("", text.strip(), count=1).strip()


def rewrite_problem(original: str, rewrite: str, max_growth: float, tokens: int, context: int,
                    finished: bool = True) -> str | None:
    """Why a rewrite is set aside, or None: empty, cut off by evolve.max_tokens (a half-written prompt; mapray's
    rule, not the reference code's), longer than `max_growth` times its original (characters), or not fitting the
    reward model's context (`tokens` of the prompt as the reward model reads it)."""
    if not rewrite:
        return "evolve: the rewrite is empty"
    if not finished:
        return "evolve: the rewrite was cut off at evolve.max_tokens"
    if len(rewrite) > max_growth * len(original):
        return (f"evolve: the rewrite is {len(rewrite) / len(original):.1f}x its original's length "
                f"(evolve.max_growth {max_growth:g})")
    if tokens >= context:
        return f"evolve: the rewrite is {tokens} tokens, it does not fit the reward model's max_length ({context})"
    return None

"""Built-in rewards: exact match, a math final-answer check, the toy addition task of the demo, and the
long-answer scratchpad task (tasks/scratchpad.py)."""

from __future__ import annotations

import re
from fractions import Fraction

from miles_stream.rewards.base import RewardInput, inline

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_LATEX_NOISE = re.compile(r"\\(?:left|right|!|,|;|:|displaystyle)|\\text\{([^{}]*)\}|\\mathrm\{([^{}]*)\}|\$")


@inline
def exact_match(x: RewardInput) -> float:
    """1.0 when the response, stripped of surrounding whitespace, equals the label."""
    return float(x.label is not None and x.response.strip() == x.label.strip())


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def final_answer(text: str) -> str | None:
    """The answer a response commits to: its last \\boxed{} if any, else its last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
    """Canonical form for comparison: LaTeX noise, spaces, thousands separators and a trailing period go;
    a number becomes its exact value (0.50, 1/2 and \\frac{1}{2} all read 1/2)."""
    s = _LATEX_NOISE.sub(lambda m: m.group(1) or m.group(2) or "", answer)
    s = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = s.replace(" ", "").rstrip(".").strip()
    s = re.sub(r"^\((-?[\d.]+)\)/\((\d+)\)$", r"\1/\2", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return s.lower()
    return str(value)


@inline
def math_answer(x: RewardInput) -> float:
    """1.0 when the response's final answer (last \\boxed{}, else last number) equals the label's."""
    if x.label is None:
        return 0.0
    got = final_answer(x.response)
    want = final_answer(x.label) or x.label
    return float(got is not None and normalize_answer(got) == normalize_answer(want))


@inline
def toy_addition(x: RewardInput) -> float:
    """The demo's task ("12+34=" -> "46"): 1.0 for the exact sum; otherwise partial credit of up to 0.5 for
    the digits right in place, counted from the last one, so a tiny model gets a gradient early on."""
    if x.label is None:
        return 0.0
    got, want = x.response.strip(), x.label.strip()
    if got == want:
        return 1.0
    right = sum(a == b for a, b in zip(reversed(got), reversed(want), strict=False))
    too_long = max(len(got) - len(want), 0)
    return 0.5 * max(right - too_long, 0) / max(len(want), 1)


@inline
def scratchpad_addition(x: RewardInput) -> float:
    """The scratchpad task (tasks/scratchpad.py): 1.0 when what follows the last '#' is the label (the sum)."""
    if x.label is None or "#" not in x.response:
        return 0.0
    return float(x.response.rpartition("#")[2].strip() == x.label.strip())

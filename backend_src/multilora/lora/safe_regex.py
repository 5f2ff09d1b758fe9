"""Regexes from adapter_config.json: refused when they could backtrack for long, matched under a deadline.

PEFT lets target_modules, exclude_modules, layers_pattern, rank_pattern and
alpha_pattern be regexes. Python's `re` backtracks and cannot be interrupted (it
holds the GIL), so one hostile pattern such as `(.*)*x` would freeze the server
for minutes on every load. The rule, checked on the parsed pattern before it
ever runs:

- at most MAX_PATTERN_LEN characters, and at most MAX_QUANTIFIERS quantifiers
  that repeat more than once (each one multiplies the work by the key length);
- a quantifier repeats single characters or fixed sequences only: no quantifier
  and no alternation inside it (the shapes that backtrack exponentially);
- no backreferences.

The engine matches these patterns only against module keys it builds itself
(`model.layers.<i>.<self_attn|mlp>.<module>`, under 64 characters), where the
rule keeps each match well under a millisecond; `MatchDeadline` also bounds all
the matches of one load together, so many patterns times many layers cannot
stall a load either.
"""

import re
import time
from re import _parser  # the stdlib's own parse tree: the only way to see a pattern's structure

MAX_PATTERN_LEN = 256
MAX_QUANTIFIERS = 3
MATCH_BUDGET_S = 2.0

_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}
_BACKREFS = {"GROUPREF", "GROUPREF_EXISTS", "GROUPREF_IGNORE", "GROUPREF_LOC_IGNORE", "GROUPREF_UNI_IGNORE"}


class PatternRefused(ValueError):
    """The pattern is refused as too costly: `str(error)` says why, for a message that names the adapter."""


class InvalidPattern(PatternRefused):
    """Not a valid regular expression at all."""


def check_pattern(pattern: str) -> None:
    """Raises PatternRefused unless `pattern` is a valid regex that the rule above accepts."""
    if len(pattern) > MAX_PATTERN_LEN:
        raise PatternRefused(f"is longer than {MAX_PATTERN_LEN} characters")
    try:
        tree = _parser.parse(pattern)
    except (re.error, OverflowError, RecursionError, ValueError):
        raise InvalidPattern("is not a valid regular expression") from None
    if _count_quantifiers(tree, inside_repeat=False) > MAX_QUANTIFIERS:
        raise PatternRefused(f"has more than {MAX_QUANTIFIERS} quantifiers (*, +, {{m,n}})")


def _count_quantifiers(items, inside_repeat: bool) -> int:
    count = 0
    for op, arg in items:
        kind = getattr(op, "name", str(op))
        if kind in _BACKREFS:
            raise PatternRefused("uses a backreference")
        if kind in _REPEATS:
            _, most, body = arg
            repeats = most > 1
            if repeats and inside_repeat:
                raise PatternRefused("nests a quantifier inside another (e.g. '(a+)+'), which can backtrack for ever")
            count += repeats + _count_quantifiers(body, inside_repeat or repeats)
        elif kind == "BRANCH":
            if inside_repeat:
                raise PatternRefused("repeats an alternation (e.g. '(a|ab)*'), which can backtrack for ever")
            count += sum(_count_quantifiers(branch, inside_repeat) for branch in arg[1])
        elif kind == "SUBPATTERN":
            count += _count_quantifiers(arg[-1], inside_repeat)
        elif kind in ("ASSERT", "ASSERT_NOT"):
            count += _count_quantifiers(arg[1], inside_repeat)
        elif kind == "ATOMIC_GROUP":
            count += _count_quantifiers(arg, inside_repeat)
    return count


class MatchDeadline:
    """One load's time budget for regex matching; `expired()` is checked before each match."""

    def __init__(self, seconds: float = MATCH_BUDGET_S, clock=time.monotonic):
        self._clock = clock
        self._end = clock() + seconds

    def expired(self) -> bool:
        return self._clock() > self._end

"""Errors and warnings raised while reading LoRA files.

Every message names the file, and the offending keys where there are some (the first few and a
count, so a file with thousands of bad keys still gives a readable message).
"""

from __future__ import annotations

from collections.abc import Iterable

#: How many keys a message lists before it says "and N more".
_KEYS_SHOWN = 5


class LoRAFormatError(ValueError):
    """A LoRA file is unreadable, malformed, or does not fit the target model."""


class UnsupportedLoRAAlgorithm(LoRAFormatError):
    """A file (or part of it) uses an adapter algorithm that is not additive LoRA.

    Attributes:
        algorithms: the algorithm names found (``"LoHa"``, ``"LoKr"``, ``"DoRA"``, …).
        keys: every key that belongs to them.
    """

    def __init__(self, message: str, algorithms: tuple[str, ...], keys: tuple[str, ...]) -> None:
        super().__init__(message)
        self.algorithms = algorithms
        self.keys = keys


class LoRAFormatWarning(UserWarning):
    """Something was skipped because ``strict=False`` (strict mode raises instead)."""


def summarize_keys(keys: Iterable[str]) -> str:
    """``'a', 'b', 'c' (3 keys)`` or ``'a', …, 'e' and 7 more (12 keys)``, in sorted order."""
    ordered = sorted(set(keys))
    shown = ", ".join(repr(k) for k in ordered[:_KEYS_SHOWN])
    rest = len(ordered) - _KEYS_SHOWN
    more = f" and {rest} more" if rest > 0 else ""
    noun = "key" if len(ordered) == 1 else "keys"
    return f"{shown}{more} ({len(ordered)} {noun})"

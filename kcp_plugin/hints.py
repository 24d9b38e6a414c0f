"""Close-match hints for error messages about unknown names (layers, criteria, models)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["did_you_mean"]


def did_you_mean(name: str, choices: Iterable[str], n: int = 3, otherwise: str = "") -> str:
    """``"; close matches: a, b"`` for the (at most ``n``) choices closest to ``name``, or
    ``otherwise`` when none is close (``difflib.get_close_matches``' default cutoff)."""
    close = difflib.get_close_matches(str(name), list(choices), n=n)
    return f"; close matches: {', '.join(close)}" if close else otherwise

"""Progress bars that degrade to nothing when tqdm is absent (it is not a hard dependency)."""

from __future__ import annotations

from typing import Any


class _Silent:
    def __init__(self, iterable: Any = None, **_: Any):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable or ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **_: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(iterable: Any = None, *, enabled: bool | None = None, **kwargs: Any) -> Any:
    """A tqdm bar (``enabled=None``: only on a terminal), or a silent stand-in."""
    if enabled is False:
        return _Silent(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Silent(iterable)
    return tqdm(iterable, disable=None if enabled is None else not enabled, leave=False, **kwargs)

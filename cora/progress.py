"""Progress of the long steps (base quantization, rank search, building, tuning), through tqdm.

On a terminal: a tqdm bar on stderr, with the elapsed time and the ETA. Otherwise (a log file, CI):
about ten plain lines per step, each ending in a newline and showing ``[elapsed<ETA]``, so logs stay
readable. Disabled (``CoRaConfig.progress=False``,
``--quiet``): nothing at all.
"""
from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["progress_bar"]


class _PlainLines:
    """A file-like stream for tqdm that turns its in-place redraws into whole lines."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.strip("\r\n").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, desc: str, enabled: bool = True, *, stream=None) -> tqdm:
    """A tqdm bar over ``total`` steps labelled ``desc``; use ``update(1)`` and ``set_postfix_str``.

    ``stream`` defaults to ``sys.stderr`` (read at call time). Close it (or use it as a context
    manager) when the step ends.
    """
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return tqdm(total=total, desc=desc, disable=True)
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, desc=desc, file=stream, dynamic_ncols=True, leave=True)
    # not a terminal: a line every tenth of the way (and the first and the last)
    return tqdm(
        total=total, desc=desc, file=_PlainLines(stream), miniters=max(1, total // 10), mininterval=0,
        bar_format="{desc} {n_fmt}/{total_fmt}{postfix} [{elapsed}<{remaining}]",
    )

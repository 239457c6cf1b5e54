"""Progress output (cora/progress.py): tqdm bars on a terminal, plain lines otherwise, nothing when off."""
from __future__ import annotations

import io

from cora.progress import progress_bar


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(stream, total=40, enabled=True):
    with progress_bar(total, "search", enabled, stream=stream) as bar:
        for i in range(total):
            bar.set_postfix_str(f"loss {i}", refresh=False)
            bar.update(1)
    return stream.getvalue()


def test_plain_lines_when_not_a_terminal():
    out = _run(io.StringIO())
    lines = out.splitlines()
    assert "\r" not in out and 5 <= len(lines) <= 14, lines
    assert all(line.startswith("search ") for line in lines)
    assert lines[-1].startswith("search 40/40, loss 39")
    assert all("<" in line.rsplit("[", 1)[1] for line in lines), lines  # [elapsed<ETA] on every line


def test_a_bar_on_a_terminal():
    out = _run(_Tty())
    assert "\r" in out and "40/40" in out


def test_nothing_when_disabled():
    assert _run(io.StringIO(), enabled=False) == ""
    assert _run(_Tty(), enabled=False) == ""

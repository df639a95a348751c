"""One exception type for every user-facing failure.

Why one type: the CLI turns a ``BlockpruneError`` into a single readable line and exit code 2,
while any other exception is a bug and keeps its traceback. Messages name the problem *and* the
fix, so each raise site passes both.
"""

from __future__ import annotations


class BlockpruneError(Exception):
    """A problem with the user's input or environment, with a suggested fix."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  fix: {fix}")

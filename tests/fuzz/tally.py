"""Counted outcomes of a seeded fuzz campaign.

Every case ends in exactly one outcome; a campaign passes only when no case ended in a failing
one. The counts are printed (one line per campaign) so CI logs show how much was tried:

    tally = Tally("configs")
    for case in cases:
        tally.record(case.name, CLEAN_ERROR)          # or OK, TRACEBACK, HANG, SERVER_ERROR, DATA_LOST
    tally.check()                                     # prints the counts, fails on any failing outcome
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

OK = "ok"                    # accepted and handled correctly
CLEAN_ERROR = "clean_error"  # refused with a one-line error naming the file, field or flag (4xx for HTTP)
TRACEBACK = "traceback"      # an unhandled exception or a multi-line traceback reached the user
HANG = "hang"                # did not finish within its time bound
SERVER_ERROR = "server_error"  # an HTTP 5xx, or a server that died
DATA_LOST = "data_lost"      # something that existed before the case is gone or corrupted

PASSING = (OK, CLEAN_ERROR)
OUTCOMES = (OK, CLEAN_ERROR, TRACEBACK, HANG, SERVER_ERROR, DATA_LOST)


@dataclass
class Tally:
    """Outcomes of one campaign (``name``: what was fuzzed)."""
    name: str
    counts: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)

    def record(self, case: str, outcome: str, detail: str = "") -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown fuzz outcome {outcome!r}")
        self.counts[outcome] += 1
        if outcome not in PASSING:
            self.failures.append((case, outcome, detail))

    @property
    def tried(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict:
        return {"campaign": self.name, "tried": self.tried,
                **{o: self.counts.get(o, 0) for o in OUTCOMES}}

    def check(self, min_cases: int = 1) -> None:
        """Print the counts; fail on any failing outcome or on fewer than ``min_cases`` cases."""
        print("fuzz " + json.dumps(self.summary()))
        assert self.tried >= min_cases, f"fuzz {self.name}: only {self.tried} cases (< {min_cases})"
        if self.failures:
            shown = "\n".join(f"  {c}: {o}: {d[:500]}" for c, o, d in self.failures[:10])
            raise AssertionError(f"fuzz {self.name}: {len(self.failures)} failing cases of "
                                 f"{self.tried}:\n{shown}")

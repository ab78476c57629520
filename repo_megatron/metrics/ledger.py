"""The hard-sample ledger: for every prompt, what happened to it at every step it was sampled.

    ledger = HardSampleLedger(reward_threshold=0.5)
    metrics = ledger.record(step, batch.sampled)   # after the rollout stage; ledger/* metrics
    ledger.export(os.path.join(run_dir, "ledger.jsonl"))
    trainer_state["ledger"] = ledger.state()       # checkpoints; ledger.load_state(...) resumes

Each step of a prompt records its on-policy pass rate (share of the G rollouts with reward >=
delta), whether the gate fired, the rephrase attempts and how many were verified, what was
injected (``rephrase``, ``expert`` for LUFFY, or nothing) and, for an injected rephrase, its
faithfulness: the share of its word 4-grams found in the reference solution (1.0 = copied
verbatim). From that history come the summary fields: when the prompt was first seen, first
gated, first injected, first solved on-policy, and when it was **rescued**: the first step it
was solved on-policy (at least one of its own rollouts passed, without help) after a step where
its gate had fired.

``RUN_DIR/ledger.jsonl`` holds one line per prompt (in the order they were first seen). It is
rewritten whole, atomically (written aside, fsynced, renamed over the old one), so a run killed
at any moment leaves the previous complete ledger; a resumed run rewrites it from the
checkpoint's state at once. Lines of prompts not sampled since the last export are kept
serialised, so an export costs the step's prompts plus writing the file.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from statistics import fmean
from typing import Iterable, Optional, Sequence

from ..rollout.types import Group
from ..runtime.failpoints import failpoint

LEDGER_FILE = "ledger.jsonl"
OVERLAP_N = 4
_WORD = re.compile(r"\w+|[^\w\s]")


def ngrams(text: str, n: int) -> Counter:
    """Word n-grams of ``text`` (words and punctuation marks, lower-cased)."""
    words = _WORD.findall(text.lower())
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def ngram_overlap(text: str, reference: str, n: int = OVERLAP_N) -> float:
    """Share of ``text``'s word n-grams that occur in ``reference`` (counts clipped, as in
    BLEU's modified precision): 1.0 when ``text`` is copied from ``reference``, near 0 for an
    independent rewrite. Texts shorter than n words compare by their shorter n-grams."""
    n = max(1, min(n, len(_WORD.findall(text))))
    ours, theirs = ngrams(text, n), ngrams(reference, n)
    total = sum(ours.values())
    if total == 0:
        return 0.0
    return sum(min(count, theirs[gram]) for gram, count in ours.items()) / total


def step_entry(step: int, group: Group, reward_threshold: float) -> dict:
    """What one group tells about its prompt at ``step`` (plain JSON types)."""
    injected = group.samples[group.injected_index] if group.injected_index is not None else None
    kind = None if injected is None else ("rephrase" if injected.is_rephrased else "expert")
    overlap = None
    if kind == "rephrase" and group.prompt.solution is not None:
        overlap = ngram_overlap(injected.response_text, group.prompt.solution)
    return {"step": step, "pass_rate": 1.0 - group.failure_rate, "gate_fired": group.gate_fired,
            "rephrase_attempts": len(group.rephrases),
            "rephrases_verified": sum(s.reward >= reward_threshold and not s.reward_failed
                                      for s in group.rephrases),
            "injected": kind, "rephrase_overlap": overlap}


def summarise(history: Sequence[dict]) -> dict:
    """The summary fields of a prompt's history (steps in order)."""
    def first(condition) -> Optional[int]:
        return next((h["step"] for h in history if condition(h)), None)

    gated = first(lambda h: h["gate_fired"])
    rescued = None if gated is None else first(lambda h: h["step"] > gated and h["pass_rate"] > 0)
    return {"first_seen_step": history[0]["step"], "first_gate_step": gated,
            "first_injected_step": first(lambda h: h["injected"] is not None),
            "first_solved_step": first(lambda h: h["pass_rate"] > 0),
            "rescued_step": rescued,
            "times_sampled": len(history),
            "gate_firings": sum(h["gate_fired"] for h in history),
            "injections": sum(h["injected"] is not None for h in history),
            "rephrase_attempts": sum(h["rephrase_attempts"] for h in history),
            "rephrases_verified": sum(h["rephrases_verified"] for h in history)}


def prompt_counts(summaries: Iterable[dict]) -> dict[str, int]:
    """How many prompts were seen, gated, solved on-policy and rescued (from their summaries)."""
    counts = Counter()
    for r in summaries:
        counts["prompts_seen"] += 1
        counts["prompts_gated"] += r["first_gate_step"] is not None
        counts["prompts_solved"] += r["first_solved_step"] is not None
        counts["prompts_rescued"] += r["rescued_step"] is not None
    return {k: counts[k] for k in ("prompts_seen", "prompts_gated", "prompts_solved",
                                   "prompts_rescued")}


class HardSampleLedger:
    """Per-prompt histories, fed with every group the rollout stage sampled."""

    def __init__(self, reward_threshold: float):
        self.reward_threshold = reward_threshold
        self.prompts: dict[str, dict] = {}      # uid -> {"source", "history", "summary"}

    def record(self, step: int, groups: Sequence[Group]) -> dict[str, float]:
        """Add the step's groups; returns ``ledger/*`` counts (cumulative) and the step's
        rephrase faithfulness (``rollout/rephrase_overlap_mean`` / ``_max`` over injected
        rephrases)."""
        overlaps = []
        for group in groups:
            entry = step_entry(step, group, self.reward_threshold)
            record = self.prompts.setdefault(group.prompt.uid,
                                             {"source": group.prompt.source, "history": []})
            record["history"].append(entry)
            record["summary"] = summarise(record["history"])
            record.pop("line", None)            # its ledger.jsonl line changed
            if entry["rephrase_overlap"] is not None:
                overlaps.append(entry["rephrase_overlap"])
        counts = prompt_counts(r["summary"] for r in self.prompts.values())
        metrics = {f"ledger/{k}": float(v) for k, v in counts.items()}
        if overlaps:
            metrics["rollout/rephrase_overlap_mean"] = fmean(overlaps)
            metrics["rollout/rephrase_overlap_max"] = max(overlaps)
        return metrics

    def records(self) -> list[dict]:
        """One record per prompt: uid, source, summary fields and the history."""
        return [self.record_of(uid) for uid in self.prompts]

    def record_of(self, uid: str) -> dict:
        r = self.prompts[uid]
        return {"uid": uid, "source": r["source"], **r["summary"], "history": r["history"]}

    def state(self) -> dict:
        """Plain data for the checkpoint: each prompt's source and history."""
        return {"prompts": {uid: {"source": r["source"], "history": r["history"]}
                            for uid, r in self.prompts.items()}}

    def load_state(self, state: Optional[dict]) -> None:
        """Restore a :meth:`state` (None: a checkpoint without a ledger, start empty)."""
        self.prompts = {}
        for uid, r in ({} if state is None else state["prompts"]).items():
            history = [dict(h) for h in r["history"]]
            self.prompts[uid] = {"source": r["source"], "history": history,
                                 "summary": summarise(history)}

    def export(self, path: str, step: int = 0) -> None:
        """Write the records to ``path`` atomically: aside, fsynced, then renamed over it."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            for uid, r in self.prompts.items():
                if "line" not in r:         # only prompts sampled since the last export
                    r["line"] = json.dumps(self.record_of(uid)) + "\n"
                f.write(r["line"])
            f.flush()
            os.fsync(f.fileno())
        failpoint("ledger_before_replace", step)      # the new ledger written, not yet in place
        os.replace(tmp, path)


def read_ledger(path: str) -> list[dict]:
    """The records of a ``ledger.jsonl`` ([] when there is none)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

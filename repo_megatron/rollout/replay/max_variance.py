"""``variance``: the k samples whose rewards have the largest variance (ties: larger reward
sum), to bring signal to prompts whose fresh rewards are all equal; among samples of equal
reward the newer ones are taken.

A max-variance subset of fixed size is always the j lowest plus the k - j highest values for
some j, so trying the k + 1 splits finds it without enumerating subsets.
"""

from __future__ import annotations

from statistics import pvariance


def max_variance(entries, k, rng):
    lowest_first = sorted(range(len(entries)), key=lambda i: (entries[i].reward, -i))
    highest_first = sorted(range(len(entries)), key=lambda i: (-entries[i].reward, -i))
    best_key, best = None, []
    for low in range(k + 1):
        chosen = lowest_first[:low]
        chosen += [i for i in highest_first if i not in chosen][:k - low]
        rewards = [entries[i].reward for i in chosen]
        key = (pvariance(rewards) if len(rewards) > 1 else 0.0, sum(rewards))
        if best_key is None or key > best_key:
            best_key, best = key, chosen
    return [entries[i] for i in sorted(best)]

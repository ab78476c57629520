"""``recency``: the k newest samples (closest to the current policy: smallest ratios)."""


def most_recent(entries, k, rng):
    return list(entries[len(entries) - k:])

"""``random``: k samples drawn uniformly without replacement (seeded per prompt and step)."""


def uniform(entries, k, rng):
    return rng.sample(list(entries), k)

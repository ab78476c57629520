"""``random``: k samples drawn uniformly without replacement (seeded per prompt and step)."""

from . import register_retrieval


@register_retrieval("random")
def uniform(entries, k, rng):
    return rng.sample(list(entries), k)

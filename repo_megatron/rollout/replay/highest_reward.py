"""``reward``: the k highest-reward samples, newer first on ties."""


def highest_reward(entries, k, rng):
    order = sorted(range(len(entries)), key=lambda i: (-entries[i].reward, -i))
    return [entries[i] for i in order[:k]]

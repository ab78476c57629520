"""Seeded fuzz of configs: hundreds of mutated YAML files and overrides through ``load_config``
(what ``repo-megatron train`` runs first). Each case must load or fail with one
:class:`ConfigError` line naming the file (or the command line); a traceback, a hang or a
changed config file fails the campaign."""

import hashlib
import random

import yaml

from repo_megatron.config import load_config
from repo_megatron.config.base import iter_knobs
from repo_megatron.config import Config
from repo_megatron.errors import ConfigError
from tests.fuzz.tally import CLEAN_ERROR, DATA_LOST, TRACEBACK, Tally
from tests.fuzz.cases import nested, run_case
from tests.helpers import write_tiny_llama

SEED = 20260113
CASES = 400
KNOBS = [k for k, t, *_ in iter_knobs(Config) if t != "section"]
SECTIONS = [k for k, t, *_ in iter_knobs(Config) if t == "section"]
SHAPE_KEYS = ["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
              "rope_theta", "rms_norm_eps", "tie_word_embeddings", "rope_scaling",
              "architectures", "model_type", "num_hiden_layers", "hidden_act", "torch_dtype"]


def random_value(rng: random.Random):
    pool = [0, 1, -1, 2, 3, 7, 64, 2 ** 31, 2 ** 32, 2 ** 63, 2 ** 64, -2 ** 63 - 1, 10 ** 400,
            0.0, -0.0, 0.5, 1e-6, 1e308, -1e308, 5e-324, float("nan"), float("inf"),
            float("-inf"), True, False, None, "", "abc", "1e400", "nan", "-1", "auto", "local",
            "\x00", "ü\u202e", "x" * 10000, "smollm2", "../../etc/passwd", [], [1, "a"],
            ["a", "b"], {}, {"a": 1}, {"num_hidden_layers": 0}, nested(rng.choice([5, 40, 300]))]
    return rng.choice(pool)


def set_key(data: dict, dotted: str, value) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def mutate_text(text: str, rng: random.Random) -> bytes:
    """Damage the YAML text itself."""
    raw = text.encode()
    kind = rng.randrange(9)
    if kind == 0:   # random bytes flipped
        data = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 1:   # truncated
        return raw[:rng.randrange(len(raw))]
    if kind == 2:   # not UTF-8
        return raw + b"\nrun_dir: caf\xe9\xff\n"
    if kind == 3:   # UTF-16 / UTF-32
        return text.encode(rng.choice(["utf-16", "utf-32", "utf-16-be"]))
    if kind == 4:   # nesting, flow or block
        depth = rng.choice([33, 200, 1000, 5000])
        if rng.random() < 0.5:
            return raw + b"\nx: " + b"[" * depth + b"]" * depth + b"\n"
        return raw + b"\n" + b"".join(b" " * i + b"k%d:\n" % i for i in range(depth))
    if kind == 5:   # a billion laughs: 9**9 strings if anything expands the aliases
        lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
        tail = rng.choice(["rollout:\n  stop: *a8\n", "model:\n  architecture_overrides:\n"
                           "    rope_scaling: {factor: *a8}\n", "extra: *a8\n"])
        return ("\n".join(lines) + "\n" + text + "\n" + tail).encode()
    if kind == 6:   # control characters, tabs
        return raw.replace(b": ", rng.choice([b":\t", b": \x07", b":\x00 "]), 1)
    if kind == 7:   # not a mapping at the top
        return rng.choice([b"- a\n- b\n", b"42\n", b"'just a string'\n", b"~\n", b"!!binary x\n"])
    return raw + rng.choice([b"\n!!python/object:os.system {}\n", b"\nx: !!python/name:os.system\n",
                             b"\n&a [*a]\n", b"\n? [a, b]\n: c\n", b"\nmodel: {hf_path: 1}\n"])


def make_case(rng: random.Random, base: dict) -> tuple[bytes, list[str]]:
    data = yaml.safe_load(yaml.safe_dump(base))
    overrides: list[str] = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(7)
        if kind == 0:
            set_key(data, rng.choice(KNOBS), random_value(rng))
        elif kind == 1:
            set_key(data, rng.choice(SECTIONS + [""]).strip(".") + "." + rng.choice(
                ["typo", "group_sizes", "lr ", "0", "__class__"]) if rng.random() < 0.8 else "x",
                    random_value(rng))
        elif kind == 2:
            set_key(data, "model.architecture_overrides." + rng.choice(SHAPE_KEYS),
                    random_value(rng))
        elif kind == 3:
            data[rng.choice(SECTIONS).split(".")[0]] = random_value(rng)
        elif kind == 4:
            key = rng.choice(KNOBS + ["", "a..b", ".x", "model.", "seed.x", "rollout.sglang"])
            raw = rng.choice(["1", "-1", "abc", "[", "{a: [}", "1e400", ".nan", "null", "[" * 400,
                              "!!python/object/apply:os.system [ls]", "2e-6", "true", ""])
            overrides.append(f"{key}={raw}" if rng.random() < 0.9 else key)
        elif kind == 5:
            set_key(data, rng.choice(KNOBS), rng.choice(KNOBS))  # a string where anything goes
        else:
            pass  # unchanged: must load
    text = yaml.safe_dump(data, width=1 << 20, allow_unicode=True)
    if rng.random() < 0.25:
        return mutate_text(text, rng), overrides
    return text.encode(), overrides


def test_fuzz_configs(tmp_path):
    from transformers import CONFIG_MAPPING
    CONFIG_MAPPING["llama"]()  # the one-time import is not part of any case's time bound
    model = write_tiny_llama(str(tmp_path / "model"))
    base = {"run_dir": "runs/x", "model": {"hf_path": model, "random_init": True,
                                           "transformer_impl": "local"},
            "rollout": {"group_size": 4, "prompts_per_step": 2},
            "data": {"path": "prompts.jsonl"}}
    rng = random.Random(SEED)
    tally = Tally("configs")
    for i in range(CASES):
        body, overrides = make_case(rng, base)
        path = tmp_path / f"case{i}.yaml"
        path.write_bytes(body)
        digest = hashlib.sha256(body).hexdigest()
        outcome, value = run_case(lambda: load_config(str(path), overrides), seconds=30,
                                  clean=(ConfigError,))
        if outcome == CLEAN_ERROR and not str(value).startswith((str(path), "command line",
                                                                 model)):
            outcome = TRACEBACK  # a "clean" error that does not say where (YAML or config.json)
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            outcome = DATA_LOST
        tally.record(f"case{i} {body[:80]!r} {overrides}", outcome, repr(value)[:400])
    tally.check(min_cases=CASES)

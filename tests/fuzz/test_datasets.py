"""Seeded fuzz of prompt datasets: hundreds of generated jsonl (and some parquet) files through
``load_prompts``, the function the trainer runs before building the model. Each file must load
(every prompt well-formed) or fail with one :class:`DataError` line naming the file; a
traceback, a hang or a changed file fails the campaign."""

import hashlib
import json
import random

import pytest

from repo_megatron.config.data import DataConfig
from repo_megatron.data import load_prompts
from repo_megatron.errors import DataError
from repo_megatron.data.chat import ChatFormatter
from tests.fuzz.tally import CLEAN_ERROR, DATA_LOST, OK, TRACEBACK, Tally
from tests.fuzz.cases import nested, run_case
from tests.rollout.fakes import ByteTokenizer

SEED = 20260113
CASES = 300


def random_cell(rng: random.Random):
    return rng.choice([
        "Compute 2 + 2.", "4", "", "   ", None, 4, -1, 10 ** 30, 2 ** 63, 1.5, True, [], ["a"],
        {"a": 1}, "ü\u202e\u0000x", "x" * rng.choice([10, 5000]), nested(rng.choice([3, 60])),
        "\\boxed{4}", "line\nbreak"])


def random_row(rng: random.Random) -> str:
    kind = rng.randrange(10)
    row = {"question": "Compute 3 * 3.", "answer": "9", "solution": "3 * 3 = \\boxed{9}"}
    if kind < 4:
        return json.dumps(row)
    if kind == 4:
        row[rng.choice(list(row))] = random_cell(rng)
        return json.dumps(row)
    if kind == 5:
        del row[rng.choice(list(row))]
        return json.dumps(row)
    if kind == 6:
        return rng.choice(['{"question": "q", "answer": ', "[1, 2]", "42", '"text"', "null",
                           '{"question": NaN, "answer": "1", "solution": "s"}', "{}", "   ",
                           '{"question": "q", "question": "r", "answer": "1", "solution": "s"}',
                           "[" * 5000 + "]" * 5000])
    if kind == 7:
        row["extra"] = random_cell(rng)
        return json.dumps(row)
    if kind == 8:
        return json.dumps({k: random_cell(rng) for k in row})
    return json.dumps(row, ensure_ascii=False) + rng.choice(["", "  ", "\t"])


def make_file(rng: random.Random, directory, i: int) -> str:
    kind = rng.randrange(12)
    if kind == 11:  # parquet, real or not
        import datasets
        path = directory / f"case{i}.parquet"
        if rng.random() < 0.5:
            try:
                rows = [json.loads(random_row(rng)) for _ in range(3)]
                datasets.Dataset.from_list(rows).to_parquet(str(path))
            except Exception:  # rows JSON or Arrow cannot take: write garbage instead
                path.write_bytes(b"PAR1" + rng.randbytes(64))
        else:
            path.write_bytes(rng.randbytes(rng.choice([0, 8, 200])))
        return str(path)
    path = directory / f"case{i}.jsonl"
    lines = [random_row(rng) for _ in range(rng.randint(0, 6))]
    text = "\n".join(lines) + ("\n" if rng.random() < 0.8 else "")
    raw = text.encode()
    if kind == 9:
        raw = text.encode(rng.choice(["utf-16", "utf-32", "utf-16-le", "latin-1"]),
                          errors="replace")
    elif kind == 10:
        data = bytearray(raw or b"{}")
        for _ in range(rng.randint(1, 5)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        raw = bytes(data)
    path.write_bytes(raw)
    return str(path)


def _well_formed(prompts) -> bool:
    return bool(prompts) and all(isinstance(p.question, str) and p.question.strip()
                                 and isinstance(p.answer, str) and p.answer.strip()
                                 and (p.solution is None or isinstance(p.solution, str))
                                 and len(p.prompt_ids) > 0 for p in prompts)


@pytest.fixture
def private_datasets_cache(tmp_path, monkeypatch):
    """Keep the hundreds of Arrow caches out of ~/.cache."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_fuzz_datasets(tmp_path, private_datasets_cache):
    formatter = ChatFormatter(ByteTokenizer(), apply_chat_template=False)
    rng = random.Random(SEED)
    tally = Tally("datasets")
    directory = tmp_path / "files"
    directory.mkdir()
    for i in range(CASES):
        path = make_file(rng, directory, i)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        cfg = DataConfig(path=path, max_prompt_tokens=4096)
        outcome, value = run_case(lambda: load_prompts(cfg, formatter), seconds=60,
                                  clean=(DataError,))
        if outcome == OK and not _well_formed(value):
            outcome = TRACEBACK  # accepted, but a prompt is not what the trainer expects
        if outcome == CLEAN_ERROR and not str(value).startswith(path):
            outcome = TRACEBACK
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != digest:
                outcome = DATA_LOST
        with open(path, "rb") as f:
            head = f.read(80)
        tally.record(f"case{i} {head!r}", outcome, repr(value)[:400])
    tally.check(min_cases=CASES)

"""Seeded fuzz of checkpoint damage: a real checkpoint (megatron torch_dist files, trainer
state, RNG, manifest) copied and damaged hundreds of ways -- bytes flipped, files truncated,
grown, deleted, added, swapped, meta.json mangled. Verification must refuse every copy whose
data no longer matches what was saved (else: data lost), accept intact ones, and never raise."""

import filecmp
import os
import random
import shutil

from tests.distributed import run_distributed
from tests.fuzz.tally import CLEAN_ERROR, DATA_LOST, OK, TRACEBACK, Tally

SEED = 20260113
CASES = 300


def damage(rng: random.Random, directory: str, files: list[str]) -> str:
    """Damage the checkpoint copy in ``directory``; returns what was done."""
    data_files = [f for f in files if f != "meta.json"]
    name = rng.choice(data_files)
    path = os.path.join(directory, name)
    kind = rng.randrange(11)
    if kind == 0:
        with open(path, "r+b") as f:
            size = os.path.getsize(path)
            for _ in range(rng.randint(1, 3)):
                f.seek(rng.randrange(max(size, 1)))
                f.write(bytes([rng.randrange(256)]))
        return f"flip bytes of {name}"
    if kind == 1:
        os.truncate(path, rng.randrange(max(os.path.getsize(path), 1)))
        return f"truncate {name}"
    if kind == 2:
        with open(path, "ab") as f:
            f.write(rng.randbytes(rng.choice([1, 1 << 20])))
        return f"append to {name}"
    if kind == 3:
        os.remove(path)
        return f"delete {name}"
    if kind == 4:
        extra = rng.choice(["extra.pt", "rng/rank_00009.pt", "__9_0.distcp", ".hidden"])
        with open(os.path.join(directory, extra), "wb") as f:
            f.write(rng.randbytes(16))
        return f"add {extra}"
    if kind == 5:
        with open(path, "r+b") as f:
            f.write(rng.randbytes(os.path.getsize(path)))
        return f"overwrite {name} (same size)"
    if kind == 6:
        os.remove(path)
        os.makedirs(path)
        return f"{name} replaced by a directory"
    if kind == 7 and len(data_files) > 1:
        other = rng.choice([f for f in data_files if f != name])
        a, b = os.path.join(directory, name), os.path.join(directory, other)
        os.rename(a, a + ".swap")
        os.rename(b, a)
        os.rename(a + ".swap", b)
        return f"swap {name} and {other}"
    meta = os.path.join(directory, "meta.json")
    with open(meta, "rb") as f:
        text = f.read()
    variants = [b"", b"{}", b"null", b"[]", b"\xff\xfe{", b"[" * 5000, text[:len(text) // 2],
                text.replace(b'"size": ', b'"size": 1', 1), text.replace(b'"sha256": "', b'"sha256": "0', 1),
                text.replace(b'"manifest": {', b'"manifest": {"../../etc/passwd": {"size": 1, "sha256": "x"}, ', 1),
                text.replace(b'"manifest": {', b'"manifest": {"x": 3, ', 1),
                text.replace(b'"size": ', b'"size": "', 1), text + b" \n"]
    with open(meta, "wb") as f:
        f.write(rng.choice(variants))
    return "mangle meta.json"


def _campaign(root: str) -> list:
    import torch
    from megatron.core.dist_checkpointing import ShardedTensor

    from repo_megatron.checkpoint.manager import CheckpointManager
    from repo_megatron.checkpoint.manifest import list_files
    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.runtime.distributed import initialize

    initialize(ParallelConfig(), seed=1)
    manager = CheckpointManager(os.path.join(root, "ckpt"))
    state = {f"w{i}": ShardedTensor.from_rank_offsets(f"w{i}", torch.randn(64, 64), replica_id=0)
             for i in range(3)}
    original = manager.save(1, state, {"step": 1, "sampler": {"epoch": 0, "index": 3}})
    files = list_files(original)
    rng = random.Random(SEED)
    out = []
    for i in range(CASES):
        copy = os.path.join(root, f"case{i}")
        shutil.copytree(original, copy)
        what = "nothing (control)" if i % 10 == 0 else damage(rng, copy, files)
        intact = all(os.path.isfile(os.path.join(copy, f))
                     and filecmp.cmp(os.path.join(original, f), os.path.join(copy, f), shallow=False)
                     for f in files if f != "meta.json") and list_files(copy) == files
        try:
            problem = manager.verify(copy)
        except BaseException as e:  # noqa: BLE001
            out.append((f"case{i} {what}", TRACEBACK, repr(e)[:300]))
            continue
        if problem is None:
            out.append((f"case{i} {what}", OK if intact else DATA_LOST, "accepted"))
        else:
            out.append((f"case{i} {what}", CLEAN_ERROR if "\n" not in problem else TRACEBACK,
                        problem))
        shutil.rmtree(copy, ignore_errors=True)
    return out


def test_fuzz_checkpoint_damage(tmp_path):
    (results,) = run_distributed(_campaign, 1, str(tmp_path), timeout=900)
    tally = Tally("checkpoints")
    for case, outcome, detail in results:
        tally.record(case, outcome, detail)
    controls = [o for c, o, _ in results if "control" in c]
    assert controls and set(controls) == {OK}, "an intact copy must verify"
    tally.check(min_cases=CASES)

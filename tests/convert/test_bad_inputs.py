"""Every bad input of issue 14 is one line on stderr naming the file or flag, and writes
nothing: corrupt, truncated, empty or oversized-header shards (refused by the safetensors
library itself too: it is the oracle for what a valid file is), an index naming a missing
shard, garbage or truncated .distcp / .metadata, a crafted .metadata pickle, bad flags. A
seeded byte-corruption campaign (tests/fuzz/tally.py) checks the same over random damage."""

import json
import os
import random
import re
import shutil
import struct

import pytest

from repo_megatron.cli import main
from tests.convert.tiny_models import make_tiny_model
from tests.fuzz.tally import CLEAN_ERROR, DATA_LOST, OK, TRACEBACK, Tally


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_tiny_model("llama", str(tmp_path_factory.mktemp("hf") / "llama"))


@pytest.fixture(scope="module")
def sharded(hf, tmp_path_factory):
    """The same model as several shards with an index (exported with small shards)."""
    root = tmp_path_factory.mktemp("sharded")
    assert main(["convert", "hf-to-megatron", "--hf", hf, "--out", str(root / "m"),
                 "--no-progress"]) == 0
    assert main(["convert", "megatron-to-hf", "--megatron", str(root / "m"), "--out",
                 str(root / "hf"), "--max-shard-size-gb", "0.0002", "--no-progress"]) == 0
    return str(root / "hf"), str(root / "m")


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(["convert", *args, "--no-progress"])
    return code, capsys.readouterr().err.strip()


def _truncate(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _write_at(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _safetensors_refuses(path: str) -> bool:
    """The safetensors library's own verdict on a file (the oracle)."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            for name in f.keys():
                f.get_tensor(name)
    except Exception:
        return True
    return False


SHARD = "model.safetensors"
SAFETENSORS_CASES = {
    "truncated shard": (lambda d: _truncate(os.path.join(d, SHARD), 5000),
                        r"model.safetensors: truncated \(tensor .* ends at byte \d+, the file "
                        r"has 5000\)"),
    "zero-byte shard": (lambda d: _truncate(os.path.join(d, SHARD), 0),
                        r"model.safetensors: file is empty \(0 bytes\)"),
    "huge header length": (lambda d: _write_at(os.path.join(d, SHARD), 0,
                                               struct.pack("<Q", 2**62)),
                           r"model.safetensors: header length 4611686018427387904 exceeds"),
    "header cut short": (lambda d: _truncate(os.path.join(d, SHARD), 100),
                         r"model.safetensors: truncated \(header of \d+ bytes, file of 100\)"),
    "garbage header": (lambda d: _write_at(os.path.join(d, SHARD), 8, b"\xff{not json"),
                       r"model.safetensors: header is not valid JSON"),
    "seven bytes": (lambda d: _truncate(os.path.join(d, SHARD), 7),
                    r"model.safetensors: truncated \(7 bytes, no safetensors header\)"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_corrupt_safetensors_is_one_line(hf, tmp_path, capsys, case):
    damage, message = SAFETENSORS_CASES[case]
    src = shutil.copytree(hf, tmp_path / "hf")
    damage(str(src))
    assert _safetensors_refuses(str(src / SHARD))
    code, err = run_cli(["hf-to-megatron", "--hf", str(src), "--out", str(tmp_path / "m")],
                        capsys)
    assert code == 2 and err.count("\n") == 0 and err.startswith("ConversionError: "), err
    assert re.search(message, err), err
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_index_naming_a_missing_shard(sharded, tmp_path, capsys):
    src = shutil.copytree(sharded[0], tmp_path / "hf")
    shards = sorted(set(json.load(open(src / "model.safetensors.index.json"))["weight_map"]
                        .values()))
    assert len(shards) > 2
    os.remove(src / shards[1])
    code, err = run_cli(["hf-to-megatron", "--hf", str(src), "--out", str(tmp_path / "m")],
                        capsys)
    assert code == 2 and err.count("\n") == 0
    assert f"model.safetensors.index.json: names shard {shards[1]}, which does not exist" in err


def test_index_that_is_not_json(sharded, tmp_path, capsys):
    src = shutil.copytree(sharded[0], tmp_path / "hf")
    (src / "model.safetensors.index.json").write_text('{"weight_map": ')
    code, err = run_cli(["hf-to-megatron", "--hf", str(src), "--out", str(tmp_path / "m")],
                        capsys)
    assert code == 2 and err.count("\n") == 0 and "not a safetensors index" in err


def _distcp(ckpt) -> str:
    (name,) = [n for n in os.listdir(ckpt) if n.endswith(".distcp")]
    return os.path.join(ckpt, name)


MEGATRON_CASES = {
    "garbage .distcp": (lambda d: _write_at(_distcp(d), 0, os.urandom(os.path.getsize(_distcp(d)))),
                        r"__0_0.distcp: tensor .* record at byte \d+ is unreadable"),
    "truncated .distcp": (lambda d: _truncate(_distcp(d), 10_000),
                          r"__0_0.distcp: truncated \(tensor .* record ends at byte"),
    "zero-byte .distcp": (lambda d: _truncate(_distcp(d), 0),
                          r"__0_0.distcp: truncated"),
    "missing .distcp": (lambda d: os.remove(_distcp(d)), r"__0_0.distcp: missing"),
    "garbage .metadata": (lambda d: _write_at(os.path.join(d, ".metadata"), 0,
                                              os.urandom(256)),
                          r"\.metadata: not a torch_dist \.metadata file"),
    "zero-byte .metadata": (lambda d: _truncate(os.path.join(d, ".metadata"), 0),
                            r"\.metadata: not a torch_dist \.metadata file \(EOFError"),
    "no .metadata": (lambda d: os.remove(os.path.join(d, ".metadata")),
                     r"not a torch_dist checkpoint \(no \.metadata file\)"),
}


@pytest.mark.parametrize("case", list(MEGATRON_CASES))
def test_corrupt_torch_dist_is_one_line(sharded, tmp_path, capsys, case):
    damage, message = MEGATRON_CASES[case]
    ckpt = shutil.copytree(sharded[1], tmp_path / "m")
    damage(str(ckpt))
    code, err = run_cli(["megatron-to-hf", "--megatron", str(ckpt), "--out",
                         str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 0 and err.startswith("ConversionError: "), err
    assert re.search(message, err), err
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_crafted_metadata_pickle_does_not_run(sharded, tmp_path, capsys):
    """.metadata is a pickle: a crafted one must not execute anything."""
    import pickle

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    ckpt = shutil.copytree(sharded[1], tmp_path / "m")
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(Exploit(), f)
    code, err = run_cli(["megatron-to-hf", "--megatron", str(ckpt), "--out",
                         str(tmp_path / "out")], capsys)
    assert code == 2 and "refusing to load posix.system" in err
    assert not os.path.exists(tmp_path / "pwned")


@pytest.mark.parametrize("flags, message", [
    (["--tp", "0"], "--tp 0: must be a positive integer"),
    (["--pp", "-2"], "--pp -2: must be a positive integer"),
    (["--vpp", "0"], "--vpp 0: must be a positive integer"),
    (["--make-vocab-size-divisible-by", "0"],
     "--make-vocab-size-divisible-by 0: must be a positive integer"),
    (["--threads", "0"], "--threads 0: must be a positive integer"),
])
def test_bad_import_flags_are_one_line(hf, tmp_path, capsys, flags, message):
    code, err = run_cli(["hf-to-megatron", "--hf", hf, "--out", str(tmp_path / "m"), *flags],
                        capsys)
    assert code == 2 and err == f"ConversionError: {message}"
    assert os.listdir(tmp_path) == []


def test_bad_shard_size_is_one_line(sharded, tmp_path, capsys):
    code, err = run_cli(["megatron-to-hf", "--megatron", sharded[1], "--out",
                         str(tmp_path / "o"), "--max-shard-size-gb", "0"], capsys)
    assert code == 2 and err == "ConversionError: --max-shard-size-gb 0: must be positive"


def _classify(code: int, err: str, before: dict, after: dict) -> str:
    if code == 0:
        return OK  # --overwrite: the new output replaced the old one, as asked
    if after != before:
        return DATA_LOST
    if code in (1, 2) and err.count("\n") == 0 and "Traceback" not in err:
        return CLEAN_ERROR
    return TRACEBACK


def test_random_byte_damage_campaign(hf, sharded, tmp_path, capsys):
    """Seeded campaign: random bytes overwritten in a shard header, a .distcp record or
    .metadata; each run either converts (the damage hit tensor data) or fails in one line,
    and never touches an existing --out."""
    from tests.convert.test_output_directory import snapshot

    rng = random.Random(14)
    tally = Tally("convert inputs")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("existing output")
    before = snapshot(out)
    for i in range(30):
        case = tmp_path / f"case{i}"
        if i % 3 == 0:
            src = shutil.copytree(hf, case)
            target, args = src / SHARD, ["hf-to-megatron", "--hf", str(src)]
            span = 8 + struct.unpack("<Q", open(target, "rb").read(8))[0]
        else:
            src = shutil.copytree(sharded[1], case)
            target = _distcp(src) if i % 3 == 1 else src / ".metadata"
            args = ["megatron-to-hf", "--megatron", str(src)]
            span = os.path.getsize(target)
        offset = rng.randrange(span)
        _write_at(str(target), offset, bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))))
        try:
            code, err = run_cli([*args, "--out", str(out), "--overwrite"], capsys)
        except Exception as e:  # noqa: BLE001  (a traceback is what the campaign looks for)
            code, err = -1, f"{type(e).__name__}: {e}"
        outcome = _classify(code, err, before, snapshot(out))
        if outcome == OK:  # the damage hit tensor bytes: out was replaced; put the old one back
            shutil.rmtree(out)
            out.mkdir()
            (out / "keep").write_text("existing output")
        tally.record(f"{os.path.basename(target)}@{offset}", outcome, err)
        shutil.rmtree(case)
    tally.check()

"""Every bad input of issue 13 gets one line naming the file and key, through the CLI as users
run it: unreadable YAML, absurd values, ``architecture_overrides`` mistakes, bad datasets
(caught before the model is built)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import write_tiny_llama
from tests.run.conftest import ROOT, tiny_chat_model, tiny_run_config  # noqa: F401 (fixture)

MODEL_LINE = "model: {{hf_path: {model}, random_init: true, transformer_impl: local}}\n"


def _config_cases(model: str) -> list[tuple[str, bytes, list, str]]:
    """(name, file bytes, overrides, expected stderr line with {path} for the file)."""
    head = MODEL_LINE.format(model=model).encode()
    overrides = "model: {{hf_path: {model}, random_init: true, architecture_overrides: {{{o}}}}}\n"

    def override(o: str) -> bytes:
        return overrides.format(model=model, o=o).encode()

    return [
        ("non_utf8", head + b"run_dir: caf\xe9\n", [],
         f"ConfigError: {{path}}: is not UTF-8 text (byte 0xe9 at offset {len(head) + 12})"),
        ("utf16", head.decode().encode("utf-16"), [],
         "ConfigError: {path}: is UTF-16 text: save it as UTF-8"),
        ("nested_1000_flow", head + b"x: " + b"[" * 1000 + b"]" * 1000 + b"\n", [],
         "ConfigError: {path}: nested too deeply (a config has at most 32 levels)"),
        ("nested_1000_block", head + b"".join(b" " * i + b"k%d:\n" % i for i in range(1000)), [],
         "ConfigError: {path}: nested too deeply (a config has at most 32 levels)"),
        ("nested_40", head + b"rollout: {stop: " + b"[" * 40 + b"]" * 40 + b"}\n", [],
         "ConfigError: {path}: rollout.stop: nested deeper than 32 levels"),
        ("seed_2_64", head, [f"seed={2 ** 64}"],
         "ConfigError: {path}: seed=18446744073709551616 must be <= 4294967295"),
        ("nan_lr", head + b"optimizer: {lr: .nan}\n", [],
         "ConfigError: {path}: optimizer.lr=.nan must be a finite number"),
        ("huge_int", head, ["rollout.max_new_tokens=100000000000000000000000"],
         "ConfigError: {path}: rollout.max_new_tokens=100000000000000000000000 must be a 64-bit "
         "integer"),
        *[(f"{key}_{value}", override(f"{key}: {value}"), [],
           f"ConfigError: {{path}}: model.architecture_overrides.{key}={value} must be an "
           "integer >= 1")
          for key, value in (("num_hidden_layers", "abc"), ("num_hidden_layers", 0),
                             ("num_attention_heads", 0), ("max_position_embeddings", -4))],
        ("misspelt_key", override("num_hiden_layers: 2"), [],
         "ConfigError: {path}: model.architecture_overrides.num_hiden_layers is not a key of "
         "LlamaConfig (did you mean num_hidden_layers?)"),
        ("heads_vs_kv_heads", override("num_attention_heads: 6"), [],
         "ConfigError: {path}: model.architecture_overrides.num_attention_heads=6 is not a "
         "multiple of num_key_value_heads=4 (grouped-query attention)"),
    ]


RUN_ALL = """
import contextlib, io, json, sys
from repo_megatron.cli import main
out = []
for path, overrides in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", path, *overrides])
    out.append([code, err.getvalue()])
print(json.dumps(out))
"""


def test_bad_configs_print_one_line_each(tmp_path):
    """All cases through ``repo_megatron.cli.main`` in one process (each fails before anything
    starts, so they do not interfere)."""
    model = write_tiny_llama(str(tmp_path / "model"), num_attention_heads=8,
                             num_key_value_heads=4, head_dim=8)
    cases = _config_cases(model)
    runs = []
    for name, body, overrides, _ in cases:
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(body)
        runs.append([str(path), overrides])
    proc = subprocess.run([sys.executable, "-c", RUN_ALL, json.dumps(runs)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (name, _, _, expected), (path, _), (code, err) in zip(cases, runs,
                                                              json.loads(proc.stdout)):
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2, (name, err)
        assert lines == [expected.format(path=path)], name


def _dataset_cases(tmp_path) -> list[tuple[str, str, str]]:
    """(name, data.path, expected stderr line)."""
    row = {"question": "Compute 2 + 2.", "answer": "4", "solution": "2 + 2 = 4"}
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes((json.dumps(row) + "\n").encode("utf-16"))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"question": "caf\xe9?", "answer": "4", "solution": "s"}\n')
    directory = tmp_path / "prompts.jsonl"
    directory.mkdir()
    deep = tmp_path / "deep.jsonl"
    deep.write_text(json.dumps(row) + "\n" + "[" * 5000 + "]" * 5000 + "\n")
    null_first = tmp_path / "null_first.jsonl"  # pyarrow 26 segfaults on this one
    null_first.write_text("null\n" + json.dumps(row))
    return [
        ("utf16", str(utf16), f"DataError: {utf16}: is UTF-16 or UTF-32 text: save it as UTF-8"),
        ("non_utf8", str(latin1),
         f"DataError: {latin1}, row 1: is not UTF-8 text (byte 0xe9 at column 18)"),
        ("directory", str(directory),
         f"DataError: {directory}: is a directory, not a .jsonl or .parquet file (data.path)"),
        ("nested_5000", str(deep), f"DataError: {deep}, row 2: nested too deeply to read"),
        ("null_then_object", str(null_first),
         f"DataError: {null_first}, row 1: must be a JSON object, got null"),
    ]


def test_bad_datasets_give_one_line_errors(tmp_path):
    from repo_megatron.config.data import DataConfig
    from repo_megatron.data import load_prompts
    from repo_megatron.errors import DataError
    from repo_megatron.data.chat import ChatFormatter
    from tests.rollout.fakes import ByteTokenizer

    formatter = ChatFormatter(ByteTokenizer(), apply_chat_template=False)
    for name, data_path, expected in _dataset_cases(tmp_path):
        with pytest.raises(DataError) as error:
            load_prompts(DataConfig(path=data_path), formatter)
        assert f"DataError: {error.value}" == expected, name


def test_a_bad_dataset_through_the_cli(tiny_chat_model, tmp_path):
    """What users see: the same line from ``repo-megatron train``, exit code 2."""
    name, data_path, expected = _dataset_cases(tmp_path)[2]  # a directory as data.path
    cfg = tiny_run_config(tiny_chat_model, str(tmp_path / "run"), data={"path": data_path})
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    proc = subprocess.run([sys.executable, "-m", "repo_megatron.cli", "train", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, (name, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, name
    assert proc.stderr.strip().splitlines()[-1] == expected, name


def _session_with_bad_data(cfg: dict) -> str:
    from repo_megatron.config import config_from_dict
    from repo_megatron.errors import DataError
    from repo_megatron.run import session as session_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")

    session_module.build_model = no_model
    try:
        session_module.Session(config_from_dict(cfg))
    except DataError as e:
        return str(e)
    return "no error"


def test_data_is_checked_before_the_model_is_built(tiny_chat_model, tmp_path):
    from tests.distributed import run_distributed

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "1", "solution": "s"}\n{"question": 3\n')
    cfg = tiny_run_config(tiny_chat_model, str(tmp_path / "run"), data={"path": str(bad)})
    (message,) = run_distributed(_session_with_bad_data, 1, cfg, timeout=300)
    assert message.startswith(f"{bad}, row 2: not valid JSON"), message

"""Bad configs give one-line errors that name the file and the full key path (no traceback)."""

import os
import subprocess
import sys

import pytest
import yaml

from repo_megatron.config import load_config
from repo_megatron.errors import ConfigError
from tests.helpers import write_tiny_llama

# (name, YAML body with {model} for the model dir, overrides, the error line printed by the CLI)
BAD_CONFIGS = [
    ("tp_not_dividing_heads", "model: {{hf_path: {model}}}\nparallel: {{tensor_model_parallel_size: 3}}\n", [],
     "ConfigError: {path}: parallel.tensor_model_parallel_size=3 does not divide "
     "model.num_attention_heads=8"),
    ("max_staleness_with_colocated_servers",
     "model: {{hf_path: {model}}}\nrollout: {{engine: sglang, max_staleness: 1, "
     "sglang: {{urls: ['http://127.0.0.1:1'], weight_sync: tensor}}}}\n", [],
     "ConfigError: {path}: rollout.max_staleness=1 needs the servers generating while the "
     "trainer trains, but rollout.sglang.weight_sync=tensor colocates them (they take turns "
     "on the GPUs): set rollout.max_staleness=0 or disaggregate"),
    ("group_size_too_small", "model: {{hf_path: {model}}}\nrollout: {{group_size: 1}}\n", [],
     "ConfigError: {path}: rollout.group_size=1 must be >= 2"),
    ("unknown_key", "model: {{hf_path: {model}}}\nrollout: {{group_sizes: 8}}\n", [],
     "ConfigError: {path}: rollout.group_sizes is not a known key (known here: engine, "
     "prompts_per_step, group_size, temperature, top_p, top_k, max_new_tokens, stop, "
     "stop_token_ids, batch_size, max_staleness, sglang)"),
    ("wrong_type", "model: {{hf_path: {model}}}\noptimizer: {{lr: fast}}\n", [],
     "ConfigError: {path}: optimizer.lr=fast must be float"),
    ("bad_choice", "model: {{hf_path: {model}}}\nalgorithm: {{loss_agg_mode: mean}}\n", [],
     "ConfigError: {path}: algorithm.loss_agg_mode=mean must be one of token-mean, "
     "seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm"),
    ("invalid_yaml", "model: {{hf_path: {model}\nparallel: [\n", [],
     "ConfigError: {path}: not valid YAML at line 2, column 9: expected ',' or '}}', but got "
     "':'"),
    ("no_model", "rollout: {{group_size: 4}}\n", [],
     "ConfigError: {path}: model.hf_path=null: set model.hf_path (a Hugging Face model "
     "directory) or model.gguf_file"),
    ("vpp_without_pp", "model: {{hf_path: {model}}}\n", ["parallel.virtual_pipeline_model_parallel_size=2"],
     "ConfigError: {path}: parallel.virtual_pipeline_model_parallel_size=2 needs "
     "parallel.pipeline_model_parallel_size > 1"),
    ("layers_not_dividing_pp", "model: {{hf_path: {model}}}\nparallel: {{pipeline_model_parallel_size: 3}}\n", [],
     "ConfigError: {path}: parallel.pipeline_model_parallel_size=3 = 3 model chunks does not "
     "divide model.num_layers=4"),
    ("fp8_on_local_spec", "model: {{hf_path: {model}, transformer_impl: local, fp8: e4m3, "
     "params_dtype: bf16}}\n", [],
     "ConfigError: {path}: model.fp8=e4m3 needs model.transformer_impl=transformer_engine or "
     "auto (the local spec has no FP8)"),
    ("bad_override", "model: {{hf_path: {model}}}\n", ["rollout.group_size"],
     "ConfigError: command line: override 'rollout.group_size' must look like key.path=value"),
    ("unsupported_architecture", "model: {{hf_path: {model}}}\n", ["model.architecture_overrides={architectures: [GPT2LMHeadModel], model_type: gpt2}"],
     "ConfigError: {model}/config.json: architecture GPT2LMHeadModel is not supported "
     "(supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
     "llama, mistral, qwen2, qwen3)"),
    ("few_shot_without_answer", "model: {{hf_path: {model}}}\ndata: {{few_shot: [{{user: 'Compute 1 + 1.'}}]}}\n", [],
     "ConfigError: {path}: data.few_shot[0].assistant is empty: a few-shot example needs both turns"),
    ("few_shot_unknown_key", "model: {{hf_path: {model}}}\ndata: {{few_shot: [{{question: q, assistant: a}}]}}\n", [],
     "ConfigError: {path}: data.few_shot[0].question is not a known key (known here: user, assistant)"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llama(str(tmp_path_factory.mktemp("m") / "tiny"), num_attention_heads=8,
                            num_key_value_heads=4, head_dim=8)


def _write(tmp_path, name, body, model_dir):
    path = tmp_path / f"{name}.yaml"
    path.write_text(body.format(model=model_dir))
    return str(path)


def test_cli_prints_one_line_per_bad_config(tmp_path, model_dir):
    """All cases in one process per config (the CLI is what users run)."""
    for name, body, overrides, expected in BAD_CONFIGS:
        path = _write(tmp_path, name, body, model_dir)
        proc = subprocess.run([sys.executable, "-m", "repo_megatron.cli", "train", path, *overrides],
                              capture_output=True, text=True, timeout=120)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2, (name, proc.stderr)
        assert "Traceback" not in proc.stderr, (name, proc.stderr)
        assert lines == [expected.format(path=path, model=model_dir)], name


def test_good_config_loads_with_overrides(tmp_path, model_dir):
    path = _write(tmp_path, "good", "model: {{hf_path: {model}}}\nrollout: {{group_size: 4}}\n",
                  model_dir)
    cfg = load_config(path, ["rollout.group_size=6", "optimizer.lr=2e-6", "rollout.stop=[a, b]"])
    assert cfg.rollout.group_size == 6
    assert cfg.optimizer.lr == 2e-6
    assert cfg.rollout.stop == ["a", "b"]
    assert cfg.architecture().num_attention_heads == 8


def test_ints_are_accepted_for_floats_but_bools_are_not_ints(tmp_path, model_dir):
    path = _write(tmp_path, "x", "model: {{hf_path: {model}}}\n", model_dir)
    assert load_config(path, ["optimizer.lr=1"]).optimizer.lr == 1.0
    with pytest.raises(ConfigError, match="rollout.group_size=true must be int"):
        load_config(path, ["rollout.group_size=true"])


def test_shipped_configs_are_valid():
    root = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "configs")
    names = sorted(n for n in os.listdir(root) if n.endswith(".yaml"))
    assert names, "no shipped configs"
    for name in names:
        with open(os.path.join(root, name)) as f:
            data = yaml.safe_load(f)
        from repo_megatron.config import config_from_dict
        config_from_dict(data, source=name, check_model=False)


def test_config_reference_is_up_to_date():
    from repo_megatron.config import config_reference
    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "config_reference.md")
    with open(path) as f:
        assert f.read() == config_reference(), \
            "docs/config_reference.md is stale: python -m repo_megatron.config --reference " \
            "docs/config_reference.md"

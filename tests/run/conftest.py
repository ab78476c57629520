import os

import pytest

from tests.helpers import write_tiny_chat_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    return write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny") / "model"))


def tiny_run_config(model_dir: str, run_dir: str, **sections) -> dict:
    """A 2-layer random Llama on the shipped arithmetic data: a few seconds a step."""
    cfg = {
        "run_dir": run_dir, "seed": 3, "train_steps": 2,
        "model": {"hf_path": model_dir, "random_init": True, "transformer_impl": "local"},
        "rollout": {"engine": "embedded", "prompts_per_step": 2, "group_size": 2,
                    "max_new_tokens": 8, "temperature": 1.0},
        "algorithm": {"micro_batch_size": 2},
        "data": {"path": os.path.join(ROOT, "examples", "data", "arith_train.jsonl"),
                 "eval_path": os.path.join(ROOT, "examples", "data", "arith_eval.jsonl"),
                 "eval_max_prompts": 2, "reward": "math"},
        "checkpoint": {"hf_export_at_end": False},
        "logging": {"tensorboard": False, "progress_bar": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values) if isinstance(values, dict) else cfg.update({name: values})
    return cfg

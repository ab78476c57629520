"""The one registry class: built-in variants declared by import path and imported on first use,
others registered with a decorator, and one-line errors naming the config key."""

import importlib
import sys

import pytest

from repo_megatron.algorithm.registry import ADVANTAGE_ESTIMATORS, POLICY_LOSSES
from repo_megatron.config.algorithm import AlgorithmConfig
from repo_megatron.config.base import build
from repo_megatron.errors import ConfigError
from repo_megatron.registry import Registry
from repo_megatron.rewards.registry import REWARDS
from repo_megatron.rollout.injection.registry import INJECTIONS
from repo_megatron.rollout.replay.registry import RETRIEVALS
from repo_megatron.weight_sync.registry import STRATEGIES

DECLARED = [POLICY_LOSSES, ADVANTAGE_ESTIMATORS, INJECTIONS, RETRIEVALS, REWARDS, STRATEGIES]


@pytest.mark.parametrize("registry", DECLARED, ids=lambda r: r.config_key)
def test_every_declared_variant_is_where_its_line_says(registry):
    assert registry.builtins
    for name, path in registry.builtins.items():
        variant = registry.get(name)
        assert f"{variant.__module__}:{variant.__name__}" == path, name


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A module ``scratch_plugin`` with a function ``double``, importable but not imported."""
    (tmp_path / "scratch_plugin.py").write_text("def double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "scratch_plugin"
    sys.modules.pop("scratch_plugin", None)


def test_a_declared_variant_is_imported_only_when_used(plugin):
    registry = Registry("doubler", "section.doubler", {"double": f"{plugin}:double"})
    assert "double" in registry and list(registry) == ["double"]
    registry.check("double")
    assert plugin not in sys.modules
    assert registry.get("double")(21) == 42
    assert registry.get("double") is importlib.import_module(plugin).double


def test_an_unknown_name_names_the_key_and_the_registered_names(plugin):
    registry = Registry("doubler", "section.doubler", {"double": f"{plugin}:double"})
    registry.register("triple")(lambda x: 3 * x)
    with pytest.raises(ConfigError, match=r"^section\.doubler=half is not a registered doubler "
                                          r"\(registered: double, triple\)$"):
        registry.get("half")
    with pytest.raises(ConfigError, match=r"^other\.key='' is not a registered doubler"):
        registry.check("", "other.key")
    with pytest.raises(KeyError):
        registry["half"]
    assert plugin not in sys.modules


def test_a_declared_name_cannot_be_registered_again(plugin):
    registry = Registry("doubler", "section.doubler", {"double": f"{plugin}:double"})
    with pytest.raises(ValueError, match=r"doubler 'double' is already registered by "
                                         r"scratch_plugin:double"):
        registry.register("double")(lambda x: x + x)


def test_the_config_accepts_a_name_registered_at_run_time(monkeypatch):
    monkeypatch.setattr(POLICY_LOSSES, "_entries", dict(POLICY_LOSSES._entries))
    with pytest.raises(ConfigError, match="algorithm.policy_loss=reinforce is not a registered"):
        build(AlgorithmConfig, {"policy_loss": "reinforce"}, "algorithm")
    POLICY_LOSSES.register("reinforce")(lambda *args: None)
    assert build(AlgorithmConfig, {"policy_loss": "reinforce"}, "algorithm").policy_loss == \
        "reinforce"

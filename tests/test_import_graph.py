"""The package's import graph: shared descriptions are leaves, and no module imports one that
(directly or not) imports it back.

The graph is read from the source (every ``import`` statement, at module level or inside a
function: a deferred import is still a dependency), so it holds whether or not a code path
runs. A package's ``__init__`` counts as the module ``pkg``; the implicit import of a parent
package when a submodule is imported is not an edge.
"""

import ast
import os
import subprocess
import sys

import repo_megatron

PACKAGE = "repo_megatron"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(repo_megatron.__file__)))

# Cycles that existed when this test was written, in packages other than models/ and convert/.
# Each must be broken by its owner; a cycle that is gone must be removed from here, and any new
# cycle fails.
KNOWN_CYCLES: set[frozenset[str]] = set()
# Each kind's registry: a leaf below its variants, which it names by import path.
REGISTRIES = ["repo_megatron.algorithm.registry", "repo_megatron.rollout.injection.registry",
              "repo_megatron.rollout.replay.registry", "repo_megatron.rewards.registry",
              "repo_megatron.weight_sync.registry"]


def package_modules() -> dict[str, str]:
    """Module name -> source path of every module of the package."""
    out = {}
    for directory, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(directory, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source."""
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod.
                edges.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                             for a in node.names)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), set()

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_deferred_import_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == {frozenset("abc")}
    assert cycles({"a": {"b"}, "b": set()}) == set()


def test_graph_sees_relative_and_deferred_imports():
    graph = import_graph()
    # families/llama.py: `from ..architecture import ...` and `from ..weight_mapping import ...`
    assert {"repo_megatron.models.architecture", "repo_megatron.models.weight_mapping"} <= \
        graph["repo_megatron.models.families.llama"]
    # data/chat.py imports the GGUF lookup inside a function.
    assert "repo_megatron.hf_files" in graph["repo_megatron.data.chat"]


def test_models_and_convert_are_in_no_import_cycle():
    for cycle in cycles(import_graph()):
        assert not any(m.startswith(("repo_megatron.models", "repo_megatron.convert",
                                     "repo_megatron.hf_files", "repo_megatron.weight_sync.plan"))
                       for m in cycle), sorted(cycle)


def test_package_has_no_new_import_cycles():
    found = cycles(import_graph())
    new = [sorted(c) for c in found - KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"
    gone = [sorted(c) for c in KNOWN_CYCLES - found]
    assert not gone, f"cycles no longer present, remove them from KNOWN_CYCLES: {gone}"


def test_leaves_import_nothing_above_them():
    graph = import_graph()
    for leaf in ("repo_megatron.errors", "repo_megatron.gguf_cache", "repo_megatron.runtime.ports"):
        assert graph[leaf] == set(), leaf
    assert graph["repo_megatron.registry"] == {"repo_megatron.errors"}
    for registry in REGISTRIES:
        assert graph[registry] == {"repo_megatron.registry"}, registry
    assert graph["repo_megatron.hf_files"] <= {"repo_megatron.errors", "repo_megatron.gguf_cache"}
    assert graph["repo_megatron.models.hf_checks"] <= {"repo_megatron.config.base",
                                                       "repo_megatron.errors"}
    assert graph["repo_megatron.models.architecture"] <= {"repo_megatron.errors",
                                                          "repo_megatron.registry",
                                                          "repo_megatron.hf_files",
                                                          "repo_megatron.models.hf_checks"}
    assert graph["repo_megatron.models.weight_mapping"] <= {
        "repo_megatron.errors", "repo_megatron.registry", "repo_megatron.models.architecture"}


def _imported_after(code: str) -> list[str]:
    """The package modules loaded by running ``code`` in a fresh interpreter."""
    probe = (f"import sys\n{code}\n"
             f"print('\\n'.join(m for m in sys.modules if m.startswith('{PACKAGE}')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return out.stdout.split()


def test_reading_an_architecture_does_not_import_the_converters(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, '
        '"num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}')
    loaded = _imported_after("import repo_megatron.models.architecture as a\n"
                             f"assert a.read_architecture({str(tmp_path)!r}).family == 'llama'")
    assert "repo_megatron.models.weight_mapping" in loaded  # the families registered
    assert not [m for m in loaded if m.startswith("repo_megatron.convert")], loaded


def test_importing_convert_loads_none_of_its_submodules():
    loaded = _imported_after("import repo_megatron.convert")
    assert not [m for m in loaded if m.startswith("repo_megatron.convert.")], loaded
    loaded = _imported_after("from repo_megatron.weight_sync import megatron_to_hf_named_tensors")
    assert "repo_megatron.weight_sync.plan" in loaded
    assert "repo_megatron.convert.hf_to_megatron" not in loaded


def test_loading_a_config_imports_no_variant_and_no_torch():
    # The config's choices come from the registries, which name their variants by import path.
    loaded = _imported_after(
        "from repo_megatron.config import load_config\n"
        "load_config('examples/configs/quickstart.yaml', check_model=False)\n"
        "assert 'torch' not in sys.modules and 'megatron' not in sys.modules")
    assert set(REGISTRIES) <= set(loaded)
    packages = {m for m, path in package_modules().items() if path.endswith("__init__.py")}
    outside_config = {m for m in loaded if not m.startswith("repo_megatron.config")} - packages
    assert outside_config == {"repo_megatron.errors", "repo_megatron.lazy_exports",
                              "repo_megatron.registry", *REGISTRIES}, sorted(outside_config)


def test_the_gpu_checks_trainer_step_imports_no_http_client():
    # scripts/gpu_check.sh's image has no aiohttp (docs/gpu_check.md): the trainer, its
    # session and the dry run's step import the SGLang client's HTTP library only when a
    # client connects to a server
    _imported_after("import repo_megatron.run.dry_run, repo_megatron.run.session\n"
                    "import repo_megatron.engines.sglang.engine\n"
                    "assert 'aiohttp' not in sys.modules, 'aiohttp imported'")

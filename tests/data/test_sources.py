"""Mixture sources: config checks, per-source columns, Hugging Face datasets with splits, and
one-line errors that name the source, row and column."""

import json

import pytest

from repo_megatron.config.base import build
from repo_megatron.config.data import DataConfig
from repo_megatron.data import load_sources, resolve_sources
from repo_megatron.data.chat import ChatFormatter
from repo_megatron.errors import ConfigError, DataError
from tests.rollout.fakes import ByteTokenizer

FORMATTER = ChatFormatter(ByteTokenizer(), apply_chat_template=False)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def data_config(**data) -> DataConfig:
    return build(DataConfig, data, "data")


@pytest.fixture
def files(tmp_path):
    math = write_jsonl(tmp_path / "math.jsonl",
                       [{"question": f"q{i}", "answer": str(i), "solution": f"s{i}"}
                        for i in range(3)])
    fin = write_jsonl(tmp_path / "fin.jsonl",
                      [{"problem": "What is 10% of 50?", "final": "5", "rationale": "0.1 * 50"}])
    return math, fin


def test_sources_load_with_their_own_columns_names_and_rewards(files):
    math, fin = files
    cfg = data_config(sources=[
        {"path": math, "weight": 3},
        {"path": fin, "name": "finance", "reward": "judge",
         "fields": {"question": "problem", "answer": "final", "solution": "rationale"}}],
        judge={"urls": ["http://127.0.0.1:1/v1"]})
    (m, m_prompts), (f, f_prompts) = load_sources(cfg, FORMATTER)
    assert (m.name, m.weight, m.reward) == ("math", 3.0, "math")
    assert (f.name, f.weight, f.reward) == ("finance", 1.0, "judge")
    assert [p.uid for p in m_prompts] == ["math:1", "math:2", "math:3"]
    (p,) = f_prompts
    assert (p.uid, p.source, p.question, p.answer, p.solution) == \
        ("finance:1", "finance", "What is 10% of 50?", "5", "0.1 * 50")


def test_data_path_is_the_one_source_shorthand(files):
    math, _ = files
    ((source, prompts),) = load_sources(data_config(path=math), FORMATTER)
    assert (source.name, source.label, source.reward) == ("math", math, "math")
    assert prompts[0].source == "math" and prompts[0].uid == "math:1"


def test_a_hugging_face_dataset_directory_is_read_by_split(tmp_path):
    directory = tmp_path / "arith"
    directory.mkdir()
    write_jsonl(directory / "train.jsonl", [{"question": "a", "answer": "1"}] * 2)
    write_jsonl(directory / "test.jsonl", [{"question": "b", "answer": "2"}])
    cfg = data_config(solution_key=None, sources=[{"dataset": str(directory), "split": "test"}])
    ((source, prompts),) = load_sources(cfg, FORMATTER)
    assert source.name == "arith" and [p.question for p in prompts] == ["b"]


def test_an_unknown_dataset_is_a_one_line_error_naming_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = data_config(sources=[{"dataset": "no-such-org/no-such-dataset", "name": "gsm"}])
    with pytest.raises(DataError) as error:
        load_sources(cfg, FORMATTER)
    message = str(error.value)
    assert message.startswith("source 'gsm' (no-such-org/no-such-dataset): cannot load "
                              "no-such-org/no-such-dataset@train (data.sources[0].dataset): ")
    assert "\n" not in message


def test_a_bad_row_names_the_source_row_and_column(files, tmp_path):
    math, _ = files
    bad = write_jsonl(tmp_path / "fin.jsonl", [{"problem": "p", "final": "1"},
                                               {"problem": "p", "final": ""}])
    cfg = data_config(solution_key=None, sources=[
        {"path": math}, {"path": bad, "name": "finance",
                         "fields": {"question": "problem", "answer": "final"}}])
    with pytest.raises(DataError, match=rf"^source 'finance' \({bad}\), row 2, column 'final': "
                                        rf"is empty$"):
        load_sources(cfg, FORMATTER)


def test_a_missing_column_names_the_source_key_to_change(files):
    _, fin = files
    cfg = data_config(sources=[{"path": fin, "fields": {"question": "problem",
                                                        "answer": "final"}}])
    with pytest.raises(DataError, match=r"^source 'fin' \(.*fin.jsonl\), column 'solution': no "
                                        r"column 'solution' \(data.sources\[0\].fields.solution\)"
                                        r"; the file has problem, final, rationale \(or "
                                        r"data.sources\[0\].fields.solution: null to train "
                                        r"without solutions\)$"):
        load_sources(cfg, FORMATTER)


def test_a_malformed_line_of_a_source_file_is_named(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"question": "q", "answer": "1"}', "{oops"])
    cfg = data_config(solution_key=None, sources=[{"path": bad, "name": "broken"}])
    with pytest.raises(DataError, match=r"^source 'broken' \(.*bad.jsonl\), row 2: not valid "
                                        r"JSON"):
        load_sources(cfg, FORMATTER)


def test_a_missing_source_file_names_its_key(tmp_path):
    cfg = data_config(sources=[{"path": str(tmp_path / "x.jsonl")},
                               {"path": str(tmp_path / "gone.jsonl")}])
    with pytest.raises(DataError, match=r"no such file \(data.sources\[0\].path\)"):
        load_sources(cfg, FORMATTER)


@pytest.mark.parametrize("data, message", [
    ({"path": "a.jsonl", "sources": [{"path": "b.jsonl"}]},
     "data.path=a.jsonl and data.sources are exclusive (path is the one-source shorthand)"),
    ({"sources": [{"path": "a.jsonl", "dataset": "org/a"}]},
     "data.sources[0]: set exactly one of path and dataset (got path=a.jsonl, dataset=org/a)"),
    ({"sources": [{"name": "x"}]},
     "data.sources[0]: set exactly one of path and dataset (got path=null, dataset=null)"),
    ({"sources": [{"path": "a.jsonl", "weight": 0}]}, "data.sources[0].weight=0.0 must be > 0"),
    ({"sources": [{"path": "a/x.jsonl"}, {"path": "b/x.jsonl"}]},
     "data.sources[1].name=x is also the name of data.sources[0]: names label metrics and "
     "prompt ids, give each source its own"),
    ({"sources": [{"path": "a.jsonl", "name": "a/b"}]},
     "data.sources[0].name=a/b may use only letters, digits, '_', '.' and '-'"),
    ({"sources": [{"path": "a.jsonl", "fields": {"prompt": "q"}}]},
     "data.sources[0].fields.prompt is not a field (fields: question, answer, solution)"),
    ({"sources": [{"path": "a.jsonl", "fields": {"answer": None}}]},
     "data.sources[0].fields.answer=null must be a column name"),
    ({"sources": [{"path": "a.jsonl", "weights": 2}]},
     "data.sources[0].weights is not a known key (known here: name, path, dataset, subset, "
     "split, weight, reward, fields)"),
    ({"sources": ["a.jsonl"]}, "data.sources[0] must be a mapping, got a.jsonl"),
    ({"path": "a.jsonl", "reward": "judge"},
     "data.judge.urls=[]: reward judge needs judge servers (set data.judge.urls or "
     "data.judge.launch.num_servers)"),
    ({"sources": [{"path": "a.jsonl", "reward": "judge"}], "judge": {"urls": ["u"],
                                                                      "template": "{question}"}},
     "data.judge.template must contain {response}"),
])
def test_bad_source_configs_are_one_line_errors_with_the_key_path(data, message):
    with pytest.raises(ConfigError) as error:
        data_config(**data)
    assert str(error.value) == message


def test_resolve_sources_without_data_is_empty():
    assert resolve_sources(DataConfig()) == []

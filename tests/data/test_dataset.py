"""Loading prompt files: columns, validation errors that name file, row and column."""

import json

import pytest

from repo_megatron.config.data import DataConfig
from repo_megatron.data import load_prompts
from repo_megatron.errors import DataError
from repo_megatron.data.chat import ChatFormatter

from tests.rollout.fakes import ByteTokenizer

FORMATTER = ChatFormatter(ByteTokenizer(), apply_chat_template=False)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


ROWS = [{"question": "Compute 2 + 2.", "answer": "4", "solution": "2 + 2 = \\boxed{4}"},
        {"question": "Compute 3 * 3.", "answer": 9, "solution": None}]


def test_loads_rows_with_solutions_and_prompt_ids(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    first, second = load_prompts(DataConfig(path=path), FORMATTER)
    assert (first.uid, first.question, first.answer) == ("train:1", "Compute 2 + 2.", "4")
    assert first.solution == "2 + 2 = \\boxed{4}"
    assert first.prompt_ids == tuple(b"Compute 2 + 2.")
    assert (second.answer, second.solution) == ("9", None)      # numbers become text


def test_column_names_are_configurable(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"problem": "p", "final": "1", "worked": "w"}])
    (p,) = load_prompts(DataConfig(path=path, question_key="problem", answer_key="final",
                                   solution_key="worked"), FORMATTER)
    assert (p.question, p.answer, p.solution) == ("p", "1", "w")


def test_parquet_files_load(tmp_path):
    import datasets
    path = str(tmp_path / "train.parquet")
    datasets.Dataset.from_list([ROWS[0]]).to_parquet(path)
    (p,) = load_prompts(DataConfig(path=path), FORMATTER)
    assert p.solution == ROWS[0]["solution"]


def test_missing_solution_column_names_the_key_to_change(tmp_path):
    path = write_jsonl(tmp_path / "nosol.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(DataError, match=r"nosol.jsonl, column 'solution': no column 'solution' "
                                        r"\(data.solution_key\).*solution_key: null"):
        load_prompts(DataConfig(path=path), FORMATTER)
    (p,) = load_prompts(DataConfig(path=path, solution_key=None), FORMATTER)
    assert p.solution is None


def test_missing_question_column(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "q", "answer": "1", "solution": "s"}])
    with pytest.raises(DataError, match=r"no column 'question' \(data.question_key\); "
                                        r"the file has prompt, answer, solution"):
        load_prompts(DataConfig(path=path), FORMATTER)


def test_malformed_json_line_is_named(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], '{"question": "q", "answer": ', ROWS[0]])
    with pytest.raises(DataError, match=r"bad.jsonl, row 2: not valid JSON"):
        load_prompts(DataConfig(path=path), FORMATTER)


def test_a_row_that_is_not_an_object_is_named(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", [ROWS[0], "[1, 2]"])
    with pytest.raises(DataError, match=r"list.jsonl, row 2: must be a JSON object"):
        load_prompts(DataConfig(path=path), FORMATTER)


def test_a_cell_of_the_wrong_type_is_named_with_its_row(tmp_path):
    path = write_jsonl(tmp_path / "types.jsonl",
                       [ROWS[0], {"question": "q", "answer": {"value": 4}, "solution": "s"}])
    with pytest.raises(DataError, match=r"types.jsonl, row 2, column 'answer': must be text, "
                                        r"got object"):
        load_prompts(DataConfig(path=path), FORMATTER)


@pytest.mark.parametrize("row,column,what", [
    ({"question": "", "answer": "1", "solution": "s"}, "question", "is empty"),
    ({"question": "q", "answer": None, "solution": "s"}, "answer", "is empty"),
    ({"question": "q", "answer": "1", "solution": True}, "solution", "must be text, got boolean"),
])
def test_bad_cells_are_named(tmp_path, row, column, what):
    path = write_jsonl(tmp_path / "cells.jsonl", [ROWS[0], row])
    with pytest.raises(DataError, match=rf"cells.jsonl, row 2, column '{column}': {what}"):
        load_prompts(DataConfig(path=path), FORMATTER)


def test_too_long_prompt_is_named(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [ROWS[0]])
    with pytest.raises(DataError, match=r"row 1, column 'question': prompt is 14 tokens, more "
                                        r"than data.max_prompt_tokens=4"):
        load_prompts(DataConfig(path=path, max_prompt_tokens=4), FORMATTER)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_prompts(DataConfig(path=str(tmp_path / "none.jsonl")), FORMATTER)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_prompts(DataConfig(path=str(tmp_path / "x.csv")), FORMATTER)
    with pytest.raises(DataError, match="data.path"):
        load_prompts(DataConfig(), FORMATTER)

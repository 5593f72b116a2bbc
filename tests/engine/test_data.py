import json

import pytest

from lolrl.engine.data import DataError, load_jsonl, load_jsonl_with_datasets, load_task_dir, records_to_dataset


def write(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


GOOD = {"id": "a", "prompt": "hi", "response": "hello", "reward": 0.5}


def test_reads_new_and_original_field_names(tmp_path):
    path = write(tmp_path / "t.jsonl", [
        GOOD,
        {"id": 2, "prompt_or_input_text": "x", "references": "y",
         "reward_components": {"a": 0.25, "final_reward": 0.75}, "meta_data": {"k": 1}},
        {"id": "c", "prompt": [{"role": "user", "content": "q"}], "response": "r", "reward": -1},
    ])
    records = load_jsonl(path, require_reward=True)
    assert [r.id for r in records] == ["a", "2", "c"]
    assert records[1].prompt == "x" and records[1].response == "y" and records[1].reward == 0.75
    assert records[1].reward_components == {"a": 0.25, "final_reward": 0.75} and records[1].meta == {"k": 1}
    assert records[2].is_chat and records[2].reward == -1.0


@pytest.mark.parametrize("row, field, words", [
    ("{not json", None, "invalid JSON"),
    ({"id": "a", "response": "r", "reward": 1}, "prompt", "missing"),
    ({"id": "a", "prompt": "p", "reward": 1}, "response", "missing"),
    ({"id": "a", "prompt": "p", "response": "r"}, "reward", "missing"),
    ({"id": "a", "prompt": "p", "response": "r", "reward": "high"}, "reward", "finite number"),
    ({"id": "a", "prompt": "p", "response": "r", "reward": True}, "reward", "finite number"),
    ({"id": "a", "prompt": "p", "response": "  ", "reward": 1}, "response", "empty"),
    ({"id": "a", "prompt": 5, "response": "r", "reward": 1}, "prompt", "string or a list"),
    ({"id": "a", "prompt": [{"role": "user"}], "response": "r", "reward": 1}, "prompt", "message 0"),
    ({"id": "a", "prompt": "p", "response": "r", "reward_components": {"x": 1.0}}, "reward_components.final_reward",
     "missing"),
    ({"id": "a", "prompt": "p", "response": "r", "reward_components": {"final_reward": None}},
     "reward_components.final_reward", "finite"),
    ([1, 2], None, "JSON object"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, field, words):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + (row if isinstance(row, str) else json.dumps(row)) + "\n")
    with pytest.raises(DataError) as info:
        load_jsonl(path, require_reward=True)
    message = str(info.value)
    assert message.startswith(f"{path}:2:")
    assert words in message
    if field:
        assert f"field '{field}'" in message
    assert info.value.line == 2


def test_non_finite_reward_from_json(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"id": "a", "prompt": "p", "response": "r", "reward": NaN}\n')
    with pytest.raises(DataError, match=r"t.jsonl:1: field 'reward'"):
        load_jsonl(path, require_reward=True)


def test_duplicate_ids_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match=r":2: field 'id': duplicate id 'a' \(first on line 1\)"):
        load_jsonl(write(tmp_path / "d.jsonl", [GOOD, GOOD]))
    with pytest.raises(DataError, match="has no records"):
        load_jsonl(write(tmp_path / "e.jsonl", ["", "  "]))
    with pytest.raises(DataError, match="file not found"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_task_dir_and_split_renames(tmp_path):
    for name in ("pos_train.jsonl", "val.jsonl", "test.jsonl"):
        write(tmp_path / name, [GOOD])
    with pytest.raises(DataError, match="train.jsonl: file not found"):
        load_task_dir(tmp_path)
    data = load_task_dir(tmp_path, {"train": "pos_train.jsonl"})
    assert len(data.train) == len(data.val) == len(data.test) == 1


def test_reward_not_required_outside_training(tmp_path):
    records = load_jsonl(write(tmp_path / "v.jsonl", [{"id": 1, "prompt": "p", "response": "r"}]))
    assert records[0].reward is None


def test_datasets_reader_matches_and_validates(tmp_path):
    path = write(tmp_path / "t.jsonl", [GOOD, {**GOOD, "id": "b", "reward": 0.25}])
    assert [(r.id, r.reward) for r in load_jsonl_with_datasets(path, True)] == [("a", 0.5), ("b", 0.25)]
    assert records_to_dataset(load_jsonl(path)).num_rows == 2
    bad = write(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "id": "b", "response": ""}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'response': is empty"):
        load_jsonl_with_datasets(bad)

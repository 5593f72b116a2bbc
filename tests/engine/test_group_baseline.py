"""value_source="group": A_i = R_i - mean_{j != i} R_j over the other logged responses to the same prompt
(RLOO's leave-one-out baseline, offline), with V(x) or a refusal for a prompt with a single response."""
import json

import numpy as np
import pytest

from lolrl.engine.config import OfflineRLConfig
from lolrl.engine.data import Record, TaskData, load_task_dir
from lolrl.engine.stages import leave_one_out_baselines, prompt_groups
from lolrl.engine.trainer import OfflineRLTrainer
from lolrl.utils.errors import ConfigError

# three prompts with 3, 2 and 1 responses; the rows of a prompt need not be consecutive
REWARDS = {"p0": [1.0, 2.0, 6.0], "p1": [0.5, -0.5], "p2": [2.0]}
# by hand: p0's baselines (2+6)/2=4, (1+6)/2=3.5, (1+2)/2=1.5; p1's -0.5 and 0.5
EXPECTED = {"p0": [-3.0, -1.5, 4.5], "p1": [1.0, -1.0]}
ORDER = [("p0", 0), ("p1", 0), ("p0", 1), ("p2", 0), ("p1", 1), ("p0", 2)]


def grouped_data(toy_dir, prompts=("p0", "p1", "p2")) -> TaskData:
    toy = load_task_dir(toy_dir)
    text = {p: toy.train[i].prompt for i, p in enumerate(("p0", "p1", "p2"))}
    assert len(set(text.values())) == 3
    train = [Record(id=f"{p}-{k}", prompt=text[p], response=toy.train[3 + j].response, reward=REWARDS[p][k])
             for j, (p, k) in enumerate(ORDER) if p in prompts]
    return TaskData(train=train, val=toy.val[:6], test=None)


def expected_advantages(data: TaskData) -> list[float | None]:
    return [EXPECTED[r.id.split("-")[0]][int(r.id.split("-")[1])] if not r.id.startswith("p2") else None
            for r in data.train]


def test_leave_one_out_baselines_by_hand():
    records = [Record(id=str(i), prompt=p, response="r") for i, p in enumerate(["a", "b", "a", "c", "b", "a"])]
    groups = prompt_groups(records)
    assert [g.tolist() for g in groups] == [[0, 2, 5], [1, 4], [3]]
    baselines = leave_one_out_baselines(np.array([1.0, 0.5, 2.0, 2.0, -0.5, 6.0]), groups)
    np.testing.assert_allclose(baselines[[0, 2, 5, 1, 4]], [4.0, 3.5, 1.5, -0.5, 0.5])
    assert np.isnan(baselines[3])
    chats = [Record(id=str(i), prompt=[{"role": "user", "content": c}], response="r") for i, c in enumerate("xyx")]
    assert [g.tolist() for g in prompt_groups(chats)] == [[0, 2], [1]]


def _config(tmp_path, model, **settings):
    settings = {"value_source": "group", **settings}
    return OfflineRLConfig(model_name=model, output_dir=str(tmp_path / "run"), algorithm="a_lol", max_resp_length=6,
                           per_device_eval_batch_size=8, per_device_train_batch_size=2, **settings)


class RecordingTrainer(OfflineRLTrainer):
    """Records the advantages every loss call receives."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.seen = getattr(self, "seen", []) + [inputs["advantages"].tolist()]
        return super().compute_loss(model, inputs, *args, **kwargs)


@pytest.mark.slow
def test_group_advantages_reach_the_loss_and_the_sampler(tmp_path, tiny_models, toy_dir):
    """Every prompt grouped: no V(x) is fit (no reward needed), A is the hand-computed one, in the training
    table, the sampler's weights (A+) and the loss's batches; advantage_stats.json counts the rows."""
    data = grouped_data(toy_dir, ("p0", "p1"))
    trainer = RecordingTrainer(args=_config(tmp_path, tiny_models["causal"], max_steps=2, do_predict=False,
                                            eval_strategy="no", val_log_frequency=1), data=data)
    trainer.train()
    out = tmp_path / "run"
    expected = expected_advantages(data)
    table = trainer.train_dataset.table
    assert table["advantage"] == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(trainer.sampler.weights, np.clip(expected, 0, None))
    stats = json.loads((out / "advantage_stats.json").read_text())
    assert stats["estimates"] == {"group": 5, "value": 0} and stats["prompt_groups"] == 2
    assert "value_fit" not in stats and not (out / "value_fit.json").exists()
    assert stats["mean"] == pytest.approx(np.mean(expected))
    seen = [a for batch in trainer.seen for a in batch]
    assert seen and set(np.round(seen, 5)) <= {4.5, 1.0}  # priority sampling: only the positive rows
    assert json.loads((out / "args.json").read_text())["value_source"] == "group"


def test_singletons_fall_back_to_v_fit_on_them_only(tmp_path, tiny_models, toy_dir):
    """--group_singletons data: V(x) is fit (on the validation records' rewards) and used for the one
    singleton row; the grouped rows keep their leave-one-out advantages."""
    data = grouped_data(toy_dir)
    trainer = OfflineRLTrainer(args=_config(tmp_path, tiny_models["causal"], group_singletons="data",
                                            value_epochs=2), data=data)
    rows = trainer.row_tokenizer(data.train)
    signal = trainer.prepare_training_signal(rows, trainer.row_tokenizer(trainer._val_records()))
    expected = expected_advantages(data)
    singleton = [i for i, a in enumerate(expected) if a is None]
    assert singleton == [3]
    grouped = [i for i in range(len(expected)) if i not in singleton]
    np.testing.assert_allclose(signal.advantages[grouped], [expected[i] for i in grouped], atol=1e-12)
    out = tmp_path / "run"
    fit = json.loads((out / "value_fit.json").read_text())
    assert fit["n_fit"] == 6
    # the singleton's advantage is R - V(x), V(x) the head's prediction on its prompt
    value = 2.0 - signal.advantages[3]
    assert np.isfinite(value) and fit["target_mean"] - 5 * fit["target_std"] <= value
    assert value <= fit["target_mean"] + 5 * fit["target_std"]
    stats = json.loads((out / "advantage_stats.json").read_text())
    assert stats["estimates"] == {"group": 5, "value": 1} and "value_fit" in stats
    # a second trainer on the same cache: the same advantages, the value fit read back, not redone
    again = OfflineRLTrainer(args=_config(tmp_path, tiny_models["causal"], group_singletons="data",
                                          value_epochs=2), data=data)
    signal2 = again.prepare_training_signal(rows, again.row_tokenizer(again._val_records()))
    np.testing.assert_array_equal(signal2.advantages, signal.advantages)
    assert again.stage_seconds == {}


def test_cache_keyed_by_value_source(tmp_path, tiny_models, toy_dir):
    """The same data and cache folder with value_source data then group: group's advantages, not the cached V(x)'s."""
    data = grouped_data(toy_dir, ("p0", "p1"))
    cache = str(tmp_path / "cache")
    first = OfflineRLTrainer(args=_config(tmp_path, tiny_models["causal"], value_source="data", value_epochs=1,
                                          cache_dir=cache), data=data)
    rows = first.row_tokenizer(data.train)
    first.prepare_training_signal(rows, first.row_tokenizer(first._val_records()))
    second = OfflineRLTrainer(args=_config(tmp_path, tiny_models["causal"], cache_dir=cache), data=data)
    signal = second.prepare_training_signal(rows, second.row_tokenizer(second._val_records()))
    np.testing.assert_allclose(signal.advantages, expected_advantages(data), atol=1e-12)
    assert "reference_pass" in second.stage_seconds  # computed, not read from the other source's entry


def test_cache_keyed_by_the_value_fits_version(tmp_path, tiny_models, toy_dir, monkeypatch):
    """A V(x) fit by code whose draws differ (another ``value.FIT_VERSION``) is not read back: recomputed; the same
    version is read back."""
    import lolrl.engine.stages as stages

    data = grouped_data(toy_dir, ("p0", "p1"))
    cache = str(tmp_path / "cache")

    def signal_of():
        trainer = OfflineRLTrainer(args=_config(tmp_path, tiny_models["causal"], value_source="data", value_epochs=1,
                                                cache_dir=cache), data=data)
        val_rows = trainer.row_tokenizer(trainer._val_records())
        trainer.prepare_training_signal(trainer.row_tokenizer(data.train), val_rows)
        return trainer.stage_seconds

    assert "reference_pass" in signal_of()
    assert signal_of() == {}  # the same version: read back
    monkeypatch.setattr(stages, "FIT_VERSION", stages.FIT_VERSION + 1)
    assert "reference_pass" in signal_of()


def test_refuse_names_the_singleton_row(tmp_path, tiny_models, toy_dir):
    with pytest.raises(ConfigError, match=r"training row 3 \(id 'p2-0'.*only response to its prompt \(1 such rows\)"):
        OfflineRLTrainer(args=_config(tmp_path, tiny_models["causal"], group_singletons="refuse"),
                         data=grouped_data(toy_dir))
    # the default fallback fits V(x) on generations: it needs a reward, and says so
    with pytest.raises(ConfigError, match="group_singletons data or refuse"):
        OfflineRLTrainer(args=_config(tmp_path, tiny_models["causal"]), data=grouped_data(toy_dir))
    with pytest.raises(ConfigError, match="group_singletons must be one of"):
        _config(tmp_path, tiny_models["causal"], group_singletons="drop")


def test_hh_records_with_all_candidates_form_groups(tmp_path, tiny_models):
    """HH's data path: pro_records(..., candidates="all") gives both suffixes of a record the same prompt text,
    so value_source group pairs them: A = +-(sigmoid(r0) - sigmoid(r1)), no singleton refused."""
    from hh_tiny import TURNS, pro_row

    from lolrl.tasks.hh.data import pro_records, sigmoid

    rows = []
    for i, rewards in enumerate([(1.0, -1.0), (0.2, 0.7), (-0.3, 2.0)]):
        row = pro_row(("a kind and helpful answer", "go away"), rewards)
        turns = [TURNS[0] + f" number {i}", *TURNS[1:]]
        row["prefix"] = [turns, turns]
        rows.append(row)
    train = pro_records(rows, "llama", "all", "train")
    val = pro_records([pro_row()] * 4, "llama", "sft", "dev")
    trainer = OfflineRLTrainer(args=_config(tmp_path, tiny_models["llama"], group_singletons="refuse"),
                               data=TaskData(train=train, val=val, test=None))
    signal = trainer.prepare_training_signal(trainer.row_tokenizer(train), trainer.row_tokenizer(val))
    expected = []
    for r0, r1 in [(1.0, -1.0), (0.2, 0.7), (-0.3, 2.0)]:
        expected += [sigmoid(r0) - sigmoid(r1), sigmoid(r1) - sigmoid(r0)]
    np.testing.assert_allclose(signal.advantages, expected, atol=1e-12)
    stats = json.loads((tmp_path / "run" / "advantage_stats.json").read_text())
    assert stats["estimates"] == {"group": 6, "value": 0} and stats["prompt_groups"] == 3


@pytest.mark.slow
def test_hh_a_lol_script_with_the_group_baseline(tmp_path, tiny_models):
    """lolrl hh a-lol --sampling_strategy all_priority --value_source group: both suffixes of each record are
    one prompt's group; no reward model, no V(x) (--reward none), the advantages are the pairs' differences."""
    from hh_tiny import TURNS, pro_row, save_nonzero_adapter

    from lolrl.tasks.hh.data import sigmoid
    from lolrl.tasks.hh.offline import alol_main

    pairs = [(1.0, -1.0), (0.2, 0.7), (-0.3, 2.0), (1.5, 0.5)]
    (tmp_path / "train").mkdir()
    rows = []
    for i, rewards in enumerate(pairs):
        row = pro_row(("a kind and helpful answer", "go away"), rewards)
        row["prefix"] = [[TURNS[0] + f" number {i}", *TURNS[1:]]] * 2
        rows.append(row)
    (tmp_path / "train" / "cleaner_train.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dev.json").write_text("".join(json.dumps(pro_row()) + "\n" for _ in range(4)))
    out = tmp_path / "out"
    adapter = save_nonzero_adapter(tiny_models["llama"], tmp_path / "adapter")
    code = alol_main(["--model_name_or_path", tiny_models["llama"], "--adapter_path", str(adapter),
                      "--train_file_path", str(tmp_path / "train"),
                      "--eval_file_path", str(tmp_path / "dev.json"), "--output_dir", str(out),
                      "--cache_dir", str(tmp_path / "cache"),
                      "--algorithm", "a_lol", "--sampling_strategy", "all_priority", "--reward", "none",
                      "--value_source", "group", "--group_singletons", "refuse", "--max_steps", "2",
                      "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                      "--per_device_eval_batch_size", "4"])
    assert code == 0
    stats = json.loads((out / "advantage_stats.json").read_text())
    assert stats["estimates"] == {"group": 8, "value": 0} and stats["prompt_groups"] == 4
    assert not (out / "value_fit.json").exists()
    from datasets import Dataset

    expected = [d for r0, r1 in pairs for d in (sigmoid(r0) - sigmoid(r1), sigmoid(r1) - sigmoid(r0))]
    assert Dataset.from_file(str(out / "train_table.arrow"))["advantage"] == pytest.approx(expected, abs=1e-12)

"""Data in the ecosystem's form: 🤗 datasets in TRL's prompt-completion form, conversational rows rendered
as TRL renders them, TRL's reward functions, and the README's Python example run as written."""
import json
import math
import re
import shutil
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, load_dataset

from lolrl import GenerationSettings, OfflineRLConfig, OfflineRLTrainer
from lolrl.engine.collation import Tokenizer, render_chat
from lolrl.engine.data import DataError, TaskData, load_task_dir
from lolrl.engine.rewards import RewardSpecError, reward_from_funcs

README = Path(__file__).resolve().parents[2] / "README.md"
CHAT = [{"role": "user", "content": "topic: hiking\nuser: any tips?"}]
ANSWER = [{"role": "assistant", "content": "take water and a map."}]
# A template whose prompt rendered alone is not a prefix of the whole conversation (an extra marker after the
# generation prompt, as DeepSeek-R1's): TRL keeps the common prefix as the prompt.
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>#{% endif %}")


def rows(n=3, **extra):
    return [{"id": f"r{i}", "prompt": f"p {i}", "completion": f"c {i}", "reward": float(i), **extra}
            for i in range(n)]


def test_prompt_completion_rows_and_response_alias():
    data = TaskData.from_datasets(train=Dataset.from_list(rows()),
                                  eval=Dataset.from_list([{"prompt": "q", "response": "a"}]))
    assert [(r.id, r.prompt, r.response, r.reward) for r in data.train] == [
        ("r0", "p 0", "c 0", 0.0), ("r1", "p 1", "c 1", 1.0), ("r2", "p 2", "c 2", 2.0)]
    assert data.val[0].response == "a" and data.val[0].reward is None and data.test is None


@pytest.mark.parametrize("row, column, words", [
    ({"prompt": "p", "completion": "c", "response": "c", "reward": 1.0}, "response",
     "both 'completion' and 'response'"),
    ({"prompt": "p", "completion": "  ", "reward": 1.0}, "completion", "is empty"),
    ({"prompt": "p", "reward": 1.0}, "completion", "missing"),
    ({"prompt": "p", "completion": "c", "reward": float("nan")}, "reward", "finite number"),
    ({"prompt": "p", "completion": "c"}, "reward", "missing"),
    ({"prompt": CHAT, "completion": [{"role": "assistant"}], "reward": 1.0}, "completion", "message 0"),
    ({"prompt": CHAT, "completion": [{"role": "assistant", "content": " "}], "reward": 1.0}, "completion", "is empty"),
])
def test_bad_row_names_split_row_and_column(row, column, words):
    if isinstance(row["prompt"], list):  # an Arrow column holds one type: a good conversational row first
        good = {"id": "good", "prompt": CHAT, "completion": ANSWER, "reward": 1.0}
    else:  # from_list takes its columns from the first row
        good = {**{k: None for k in row}, **rows(1)[0]}
    train = Dataset.from_list([good, {"id": "bad", **row}])
    with pytest.raises(DataError) as info:
        TaskData.from_datasets(train=train, eval=Dataset.from_list(rows(1)))
    message = str(info.value)
    assert message.startswith(f"train_dataset row 1: column '{column}':"), message
    assert words in message and "\n" not in message


def test_conversational_completion_needs_a_conversational_prompt():
    train = Dataset.from_list([{"prompt": "p", "completion": ANSWER, "reward": 1.0}])
    with pytest.raises(DataError, match=r"^train_dataset row 0: column 'completion': is a list of chat messages but "
                                        r"the prompt is not"):
        TaskData.from_datasets(train=train, eval=Dataset.from_list(rows(1)))


def test_eval_split_errors_and_datasetdict():
    with pytest.raises(DataError, match=r"^eval_dataset row 0: column 'prompt': missing"):
        TaskData.from_datasets(train=Dataset.from_list(rows()), eval=Dataset.from_list([{"completion": "c"}]))
    splits = DatasetDict(validation=Dataset.from_list(rows(2)), test=Dataset.from_list(rows(1)))
    data = TaskData.from_datasets(train=Dataset.from_list(rows()), eval=splits)
    assert len(data.val) == 2 and len(data.test) == 1
    with pytest.raises(DataError, match="expected one named validation or val or eval"):
        TaskData.from_datasets(train=Dataset.from_list(rows()), eval=DatasetDict(dev=Dataset.from_list(rows())))


def test_reward_components_columns_and_extra_columns():
    """``reward_components`` as a struct column (a name some rows lack is Arrow's None: left out) and any
    other column kept for the reward functions."""
    train = Dataset.from_list([
        {"prompt": "p", "completion": "c", "topic": "hiking",
         "reward_components": {"safe": 1.0, "fluent": 0.5, "final_reward": 1.5}},
        {"prompt": "q", "completion": "d", "topic": "chess", "reward_components": {"safe": 0.0, "final_reward": 0.0}},
    ])
    data = TaskData.from_datasets(train=train, eval=train)
    first, second = data.train
    assert first.reward == 1.5 and first.reward_components == {"safe": 1.0, "fluent": 0.5, "final_reward": 1.5}
    assert second.reward == 0.0 and second.reward_components == {"safe": 0.0, "final_reward": 0.0}
    assert [r.meta for r in data.train] == [{"topic": "hiking"}, {"topic": "chess"}]


def test_reward_funcs_and_weights_as_grpo():
    def length(prompts, completions, **kw):
        return [float(len(c)) for c in completions]

    def topic_said(prompts, completions, topic, **kw):
        return [float(t in c) for t, c in zip(topic, completions)]

    reward = reward_from_funcs([length, topic_said, length], reward_weights=[0.5, 2.0, 1.0])
    assert reward.component_names == ["length", "topic_said", "length_2"]
    scores = reward(prompts=["a", "b"], completions=["chess!", "xy"], topic=["chess", "go"], show_progress=False)
    assert scores["final_reward"] == [0.5 * 6 + 2.0 + 6, 0.5 * 2 + 0 + 2]
    with pytest.raises(RewardSpecError, match="2 reward_weights for 1 reward_funcs"):
        reward_from_funcs(length, [1.0, 2.0])
    assert reward_from_funcs("lolrl.demo.task:safety", [3.0]).components[0].weight == 3.0


@pytest.fixture(scope="module")
def chat_model(tiny_models, tmp_path_factory):
    """The tiny GPT-2 with a chat template (offline: the template is set on its tokenizer and saved)."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_models["causal"], directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(directory)
    return str(directory), AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("prompt", [CHAT, CHAT + [{"role": "assistant", "content": "well,"}]])
def test_conversational_rows_rendered_as_trl(chat_model, prompt):
    """Prompt and completion text as TRL's apply_chat_template splits them (the prompt with the generation
    prompt, or continuing a final assistant message), tokenised without an EOS added (TRL's SFT adds none)."""
    from trl.data_utils import apply_chat_template

    _, tokenizer = chat_model
    expected = apply_chat_template({"prompt": prompt, "completion": ANSWER}, tokenizer)
    assert render_chat(tokenizer, prompt, ANSWER) == (expected["prompt"], expected["completion"])
    record = TaskData.from_datasets(train=Dataset.from_list([{"prompt": prompt, "completion": ANSWER, "reward": 1}]),
                                    eval=Dataset.from_list(rows(1))).train[0]
    row = Tokenizer(tokenizer, False, 512, 512)([record])[0]
    assert row.prompt_ids == tokenizer(expected["prompt"], add_special_tokens=False)["input_ids"]
    assert row.response_ids == tokenizer(expected["completion"], add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_conversational_run_passes_messages_and_columns_to_reward(tmp_path, chat_model):
    """A run on conversational datasets: the reward gets TRL's conversational completions (messages) and
    the extra columns."""
    model, _ = chat_model
    seen = []

    def says_topic(prompts, completions, topic, **kw):
        seen.append((completions, topic))
        return [float(t in c[0]["content"]) for t, c in zip(topic, completions)]

    data = [{"id": str(i), "prompt": [{"role": "user", "content": f"tell me about {t}"}],
             "completion": [{"role": "assistant", "content": f"{t} is fun"}], "topic": t, "reward": float(i % 2)}
            for i, t in enumerate(["hiking", "chess", "cooking", "music"] * 3)]
    args = OfflineRLConfig(output_dir=str(tmp_path / "run"), algorithm="wbc", num_train_epochs=1,
                           per_device_train_batch_size=4, max_steps=1,
                           max_resp_length=8, val_log_frequency=1, do_predict=False,
                           generation=GenerationSettings(max_new_tokens=8))
    output = OfflineRLTrainer(model=model, args=args, train_dataset=Dataset.from_list(data),
                              eval_dataset=Dataset.from_list(data[:4]), reward_funcs=says_topic).train()
    completions, topics = seen[-1]
    assert topics == ["hiking", "chess", "cooking", "music"]
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in completions)
    assert all(isinstance(c[0]["content"], str) for c in completions) and "val/generated/says_topic" in output.metrics


def _train_log(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_run_from_datasets_matches_run_from_task_folder(tmp_path, tiny_models, toy_dir, toy_reward_spec):
    from lolrl import load_reward
    from lolrl.demo.task import fluency, on_topic, safety

    def config(name):
        return OfflineRLConfig(model_name=tiny_models["causal"], output_dir=str(tmp_path / name), algorithm="a_lol",
                               num_train_epochs=1, per_device_train_batch_size=8, max_resp_length=8, max_steps=3,
                               logging_steps=1,
                               val_log_frequency=1, do_predict=False, generation=GenerationSettings(max_new_tokens=4),
                               value_source="data", value_epochs=2, value_folds=3)

    OfflineRLTrainer(args=config("folder"), data=load_task_dir(toy_dir, need_test=False),
                     reward=load_reward(toy_reward_spec)).run()
    splits = load_dataset("json", data_files={s: str(Path(toy_dir) / f"{s}.jsonl") for s in ("train", "val")})
    OfflineRLTrainer(args=config("datasets"), train_dataset=splits["train"], eval_dataset=splits["val"],
                     reward_funcs=[safety, on_topic, fluency]).train()
    folder, datasets_log = _train_log(tmp_path / "folder"), _train_log(tmp_path / "datasets")
    assert len(folder) == len(datasets_log) == 3
    for a, b in zip(folder, datasets_log):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
        assert abs(a["advantage"] - b["advantage"]) <= 1e-6


def test_trainer_refuses_two_of_one_thing(tmp_path, toy_dir):
    args = OfflineRLConfig(output_dir=str(tmp_path / "run"), algorithm="wbc")
    train = Dataset.from_list(rows())
    with pytest.raises(Exception, match="no model"):
        OfflineRLTrainer(args=args, train_dataset=train, eval_dataset=train)
    with pytest.raises(Exception, match="give the data once"):
        OfflineRLTrainer(args=args, model="m", data=load_task_dir(toy_dir), train_dataset=train, eval_dataset=train)
    with pytest.raises(Exception, match="give the reward once"):
        OfflineRLTrainer(args=args, model="m", train_dataset=train, eval_dataset=train, reward=len, reward_funcs=len)
    with pytest.raises(Exception, match="model= takes a model folder"):
        OfflineRLTrainer(args, args=args, train_dataset=train, eval_dataset=train)


def readme_python_example() -> str:
    text = README.read_text()
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_python_example_runs_as_written(tmp_path, tiny_models, toy_dir, monkeypatch):
    """The README's snippet, with the demo's folders pointed at the tiny test task and model."""
    (tmp_path / "runs" / "demo" / "runs" / "nll").mkdir(parents=True)
    shutil.copytree(toy_dir, tmp_path / "runs" / "demo" / "data")
    shutil.copytree(tiny_models["causal"], tmp_path / "runs" / "demo" / "runs" / "nll" / "model")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(readme_python_example(), "README.md", "exec"), namespace)
    output, trainer = namespace["output"], namespace["trainer"]
    assert math.isfinite(output.metrics["test/generated/final_reward"])
    assert output.global_step == trainer.state.global_step > 0
    assert trainer.config.generation.do_sample  # sampled decoding, where pi_ref leaves room to improve
    assert (tmp_path / "runs" / "api_a_lol" / "model" / "model.safetensors").exists()
    assert (tmp_path / "runs" / "api_a_lol" / "advantage_stats.json").exists()
    recorded = json.loads((tmp_path / "runs" / "api_a_lol" / "args.json").read_text())["reward"]
    assert all(name in recorded for name in ("safety", "on_topic", "fluency"))  # the reward_funcs, by name


def test_chat_rows_without_a_chat_template_name_their_source_and_row(tmp_path, tiny_models):
    """The tiny test tokenizer has no chat template: a conversational dataset is refused before any model
    loads, naming the dataset and the row."""
    from lolrl.engine.data import DataError

    data = [{"id": f"r{i}", "prompt": [{"role": "user", "content": "hi"}], "completion": "hello", "reward": 1.0}
            for i in range(4)]
    args = OfflineRLConfig(output_dir=str(tmp_path / "run"), algorithm="wbc")
    with pytest.raises(DataError, match=r"train_dataset: field 'prompt': row 'r0' is a list of chat messages"):
        OfflineRLTrainer(model=tiny_models["causal"], args=args, train_dataset=Dataset.from_list(data),
                         eval_dataset=Dataset.from_list(data))

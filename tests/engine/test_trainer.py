"""The offline engine is transformers' Trainer (issue 23): the config is a TrainingArguments, the trainer a
Trainer whose callbacks, logs, evaluation metrics and checkpoints are the Trainer's."""
import json
import math

import pytest
import transformers
from transformers import TrainerCallback, TrainingArguments

from lolrl import OfflineRLConfig, OfflineRLTrainer, load_reward, load_task_dir
from lolrl.utils.errors import ConfigError


def test_the_trainer_and_its_config_are_the_transformers_ones(tmp_path):
    assert issubclass(OfflineRLTrainer, transformers.Trainer)
    assert issubclass(OfflineRLConfig, TrainingArguments)
    config = OfflineRLConfig(output_dir=str(tmp_path), algorithm="a_lol", per_device_train_batch_size=4,
                             gradient_accumulation_steps=3, bf16=True)
    # the paper's defaults where they differ from the Trainer's; the Trainer's names for the rest
    assert (config.seed, config.learning_rate, config.weight_decay, config.save_total_limit) == (901, 2e-5, 0.01, 2)
    assert config.dtype == "bf16" and config.sampling_strategy == "good_priority" and config.ppo_clip == 0.9
    saved = json.loads(json.dumps(config.to_dict()))  # args.json: every setting, nested ones as mappings
    assert saved["gradient_accumulation_steps"] == 3 and saved["lora"]["r"] == 0
    assert saved["generation"]["num_beams"] == 2
    from lolrl.utils.checkpoint import run_key

    key = run_key(config.to_dict())  # what a checkpoint must agree with to resume: results, not bookkeeping
    assert run_key({**config.to_dict(), "logging_dir": "elsewhere"}) == key
    assert run_key({**config.to_dict(), "optim": "sgd"}) != key


def test_the_config_refuses_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="unknown algorithm"):
        OfflineRLConfig(output_dir=str(tmp_path), algorithm="a_lolz")
    with pytest.raises(ConfigError, match="priority sampling needs rewards"):
        OfflineRLConfig(output_dir=str(tmp_path), algorithm="nll", sampling_strategy="good_priority")
    with pytest.raises(ConfigError, match="At most one of fp16 and bf16"):  # the Trainer's own check, as one line
        OfflineRLConfig(output_dir=str(tmp_path), bf16=True, fp16=True)


class Recorder(TrainerCallback):
    def __init__(self):
        self.steps, self.logs, self.evaluations, self.saves = [], [], [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluations.append((state.global_step, dict(metrics)))

    def on_save(self, args, state, control, **kwargs):
        self.saves.append(state.global_step)


@pytest.mark.slow
def test_a_user_callback_sees_steps_logs_validations_and_checkpoints(tmp_path, tiny_models, toy_dir,
                                                                     toy_reward_spec):
    recorder = Recorder()
    config = OfflineRLConfig(model_name=tiny_models["causal"], output_dir=str(tmp_path / "run"), algorithm="a_lol",
                             per_device_train_batch_size=8, max_steps=3, logging_steps=1, save_steps=2,
                             max_resp_length=6, val_log_frequency=1, eval_on_start=True, do_predict=False)
    trainer = OfflineRLTrainer(args=config, data=load_task_dir(toy_dir, need_test=False),
                               reward=load_reward(toy_reward_spec), callbacks=[recorder])
    output = trainer.train()
    assert recorder.steps == [1, 2, 3] and output.global_step == 3
    assert recorder.saves == [2, 3]  # every 2 steps, and the last
    train_logs = [entry for entry in recorder.logs if "loss" in entry and "learning_rate" in entry]
    assert len(train_logs) == 3 and all(math.isfinite(e["importance_weight"]) for e in train_logs)
    # the starting model's validation (eval_on_start), then the last step's, with the task's metric
    assert [step for step, _ in recorder.evaluations] == [0, 3]
    assert all("eval_final_reward" in metrics for _, metrics in recorder.evaluations)
    assert trainer.args.metric_for_best_model == "final_reward"
    assert math.isfinite(output.metrics["val/generated/final_reward"])
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-3" / "manifest.json").exists()


def test_sampling_default_is_the_papers_and_an_explicit_choice_stays(tmp_path):
    def strategy(algorithm, **kwargs):
        return OfflineRLConfig(output_dir=str(tmp_path), algorithm=algorithm, **kwargs).sampling_strategy

    assert (strategy("a_lol"), strategy("wbc"), strategy("nll")) == ("good_priority", "uniform", "uniform")
    assert strategy("a_lol", sampling_strategy="uniform") == "uniform"
    assert strategy("a_lol", sampling_strategy="None") == "uniform"  # the original's spelling
    assert strategy("wbc", sampling_strategy="good_random") == "good_random"

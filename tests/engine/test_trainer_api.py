"""The scripts' form of the Python API: a config, a trainer, records of a task folder and a reward built in Python
(the README's TRL-form example: tests/engine/test_datasets_input.py)."""
import math

from lolrl import OfflineRLConfig, OfflineRLTrainer, TaskInfo, load_reward, load_task_dir
from lolrl.demo.task import fluency, safety
from lolrl.engine.rewards import RewardFunction


def test_readme_api_example(tmp_path, tiny_models, toy_dir, toy_reward_spec):
    data = load_task_dir(toy_dir)
    reward = load_reward(toy_reward_spec)
    config = OfflineRLConfig(model_name=tiny_models["causal"], output_dir=str(tmp_path / "run"), algorithm="a_lol",
                             num_train_epochs=1, per_device_train_batch_size=16, max_resp_length=8, max_steps=2,
                             val_log_frequency=1)
    trainer = OfflineRLTrainer(args=config, data=data, reward=reward, task=TaskInfo("demo", val_metric="safety"))
    results = trainer.run()
    assert math.isfinite(results["test/generated"]["final_reward"])
    assert trainer.keeper.metric == "safety"  # the task's description chose the validation measure
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_reward_from_python_callables(tmp_path, tiny_models, toy_dir):
    reward = RewardFunction.from_callables({"safe": safety, "fluent": fluency}, weights={"fluent": 0.5})
    config = OfflineRLConfig(model_name=tiny_models["seq2seq"], output_dir=str(tmp_path / "run"), algorithm="wbc",
                             num_train_epochs=1, per_device_train_batch_size=16, max_resp_length=8, max_steps=1,
                             val_log_frequency=1,
                             do_predict=False)
    results = OfflineRLTrainer(args=config, data=load_task_dir(toy_dir, need_test=False), reward=reward).run()
    assert set(results) == {"val/generated", "val/gold"}
    generated = results["val/generated"]
    assert math.isclose(generated["final_reward"], generated["safe"] + 0.5 * generated["fluent"], rel_tol=1e-9)


def test_final_evaluation_runs_without_the_optimizer_state(tmp_path, tiny_models, toy_dir, toy_reward_spec,
                                                           monkeypatch):
    """After training, the optimizer's moments and the best weights' copy are let go before the final evaluation
    generates (they would keep training's memory through it); the evaluation still uses the best weights."""
    seen = {}
    release = OfflineRLTrainer._release_training_state
    evaluate_split = OfflineRLTrainer.evaluate_split

    def released(self):
        seen["moments_before"] = sum(len(v) for v in self.optimizer.state.values())
        seen["best_before"] = self.best_state is not None
        release(self)

    def evaluated(self, split, records, rows):
        seen.setdefault("during", []).append((split, len(self.optimizer.state), self.best_state))
        return evaluate_split(self, split, records, rows)

    monkeypatch.setattr(OfflineRLTrainer, "_release_training_state", released)
    monkeypatch.setattr(OfflineRLTrainer, "evaluate_split", evaluated)
    config = OfflineRLConfig(model_name=tiny_models["causal"], output_dir=str(tmp_path / "run"), algorithm="a_lol",
                             num_train_epochs=1, per_device_train_batch_size=16, max_resp_length=8, max_steps=2,
                             val_log_frequency=1)
    trainer = OfflineRLTrainer(args=config, data=load_task_dir(toy_dir), reward=load_reward(toy_reward_spec))
    results = trainer.run()
    assert seen["moments_before"] > 0 and seen["best_before"], seen  # AdamW's exp_avg, exp_avg_sq, step per weight
    assert seen["during"] == [("val", 0, None), ("test", 0, None)], seen
    assert math.isfinite(results["test/generated"]["final_reward"])

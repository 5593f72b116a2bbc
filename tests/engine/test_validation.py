"""The one validation-and-best-model writer shared by the offline trainer, PPO and the TRL callback."""
import json

from lolrl.engine.validation import BestModelKeeper


class FakeAccelerator:
    is_main_process = True

    def __init__(self):
        self.logged = []

    def wait_for_everyone(self):
        pass

    def log(self, values, step):
        self.logged.append((step, values))


def test_keeper_logs_every_validation_and_saves_only_finite_improvements(tmp_path):
    keeper = BestModelKeeper(tmp_path / "out", tmp_path / "best", "final_reward")
    (tmp_path / "out").mkdir()
    (tmp_path / "best").mkdir()
    saves, acc = [], FakeAccelerator()
    measures = [0.5, float("nan"), 0.4, 0.7, float("inf"), 0.7]
    improved = [keeper.record(step, step / 10, {"final_reward": m, "n": 3}, m, lambda s=step: saves.append(s), acc)
                for step, m in enumerate(measures)]
    assert improved == [True, False, False, True, False, False]
    assert saves == [0, 3] and keeper.best == 0.7
    lines = [json.loads(line) for line in (tmp_path / "out" / "validation_stats.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(6))
    assert all({"step", "epoch", "metric", "measure", "final_reward", "n"} <= set(line) for line in lines)
    assert lines[1]["measure"] is None  # JSON has no NaN: written as null
    assert json.loads((tmp_path / "best" / "best.json").read_text()) == {
        "step": 3, "epoch": 0.3, "metric": "final_reward", "measure": 0.7}
    assert [v for _, v in acc.logged][3] == {"val/final_reward": 0.7}

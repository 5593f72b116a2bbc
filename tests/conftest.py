import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
# Liger's Triton kernels (tests/engine/test_liger.py) run on the CPU under Triton's interpreter; it is read when
# triton decorates a kernel, so before anything imports liger_kernel. Without CUDA nothing else runs Triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
# pytest -n 2 (the README's test command): each worker one intra-op thread, so two workers share the two cores
# instead of four threads contending for them (read by torch when it is first imported, below)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from lolrl.demo import task as demo_task  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A tiny GPT-2 (tokenizer without a pad token, like GPT-2's), a tiny T5 and a tiny Llama, saved to disk."""
    from lolrl.demo.tiny import build_causal_lm, build_llama_lm, build_seq2seq_lm, train_tokenizer

    root = tmp_path_factory.mktemp("models")
    causal_tok = train_tokenizer(demo_task.corpus(), root / "tok_causal", with_pad=False)
    build_causal_lm(causal_tok, root / "causal")
    seq_tok = train_tokenizer(demo_task.corpus(), root / "tok_seq2seq", with_pad=True)
    build_seq2seq_lm(seq_tok, root / "seq2seq")
    build_llama_lm(causal_tok, root / "llama", hidden=32, heads=2)
    return {"causal": str(root / "causal"), "seq2seq": str(root / "seq2seq"), "llama": str(root / "llama")}


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    return demo_task.write_task(tmp_path_factory.mktemp("toy"), n_train=48, n_val=12, n_test=8)


@pytest.fixture(scope="session")
def toy_reward_spec():
    return demo_task.REWARD_SPEC


@pytest.fixture
def hh_fixture(tmp_path, tiny_models):
    """The HH PPO script's arguments on tiny PRO-format train/dev files, a LoRA adapter (non-zero, so it
    differs from the base) and a tiny reward model (tests/online/test_ppo.py, tests/engine/test_liger.py)."""
    import json

    from hh_tiny import pro_row, save_nonzero_adapter, tiny_reward_model

    (tmp_path / "train").mkdir()
    rows = [pro_row(("a kind and helpful answer", "go away"), (0.5, -0.5)) for _ in range(8)]
    (tmp_path / "train" / "cleaner_train.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dev.json").write_text("".join(json.dumps(pro_row()) + "\n" for _ in range(4)))
    save_nonzero_adapter(tiny_models["llama"], tmp_path / "adapter")
    tiny_reward_model(tmp_path / "rm")
    return tmp_path, ["--model_name_or_path", tiny_models["llama"], "--adapter_path", str(tmp_path / "adapter"),
                      "--train_file_path", str(tmp_path / "train"), "--eval_file_path", str(tmp_path / "dev.json"),
                      "--cache_dir", str(tmp_path / "cache"), "--reward_model", str(tmp_path / "rm"),
                      "--per_device_eval_batch_size", "4", "--ppo_rollout_batch_size", "4",
                      "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                      "--ppo_epochs", "2", "--max_new_tokens", "6", "--learning_rate", "1e-3"]


def status_of(main, *args, **kwargs) -> int:
    """A script's exit status: what its ``main`` returns, or the status of the ``SystemExit`` its parser raises
    (a bad setting is refused while the command line is parsed, as argparse refuses a bad flag)."""
    try:
        return main(*args, **kwargs)
    except SystemExit as stop:
        return stop.code


class Merged:
    """A script's settings dataclasses read as one (the task's data settings and the engine's config)."""

    def __init__(self, *parts):
        self.parts = parts

    def __getattr__(self, name):
        for part in self.parts:
            if hasattr(part, name):
                return getattr(part, name)
        raise AttributeError(name)

    def __eq__(self, other):
        return isinstance(other, Merged) and self.parts == other.parts


def parse_settings(classes, argv, description=None):
    """``lolrl.tasks.hh.cli.parse_hh`` read as one object (:class:`Merged`) for a tuple of classes."""
    from lolrl.tasks.hh.cli import parse_hh

    parsed = parse_hh(classes, argv, description)
    return Merged(*parsed) if isinstance(classes, tuple) else parsed

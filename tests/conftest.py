import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

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

"""The toy task of the PPO tests: a tiny Llama over a word vocabulary, rewarded for one word."""
from pathlib import Path

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "ran", "far", "big", "red", "sun", "sky", "good", "day", "a", "is"]
MAX_NEW = 8


def word_model(directory: Path):
    """A tiny Llama over a 19-token word vocabulary: every word (the target included) starts near 1/19."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lolrl.demo.tiny import build_llama_lm

    vocab = {w: i for i, w in enumerate(["<eos>", "<unk>", "<pad>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # words joined by spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")
    tokenizer.save_pretrained(str(directory))
    build_llama_lm(tokenizer, directory, hidden=32, heads=2, seed=0)


def target_word_share(prompts, completions, **_):
    """The toy reward: the share of the response budget spent on the word 'good'."""
    return [c.split().count("good") / MAX_NEW for c in completions]

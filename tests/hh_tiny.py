"""Shared HH test material: a PRO-format record, a tiny OpenAssistant-style reward model, a non-zero LoRA adapter."""
TURNS = ["<|prompter|>Q1", "<|assistant|>A1", "<|prompter|>Q2", "<|assistant|>"]


def pro_row(suffix=("good answer", "bad answer"), reward=(1.0, -1.0)):
    return {"prefix": [TURNS, TURNS], "suffix": list(suffix), "reward": list(reward), "sft_index": 0,
            "meta": {"task": "dialogue"}}


def tiny_reward_model(directory):
    """A 1-layer GPT-NeoX reward model of the OpenAssistant architecture, saved to ``directory``."""
    import torch

    from lolrl.demo.tiny import train_tokenizer
    from lolrl.tasks.hh.reward_model import GPTNeoXRewardModel, GPTNeoXRewardModelConfig

    tokenizer = train_tokenizer(["<|prompter|>Q1", "<|assistant|>A1", "an answer", "<eos>"] * 5, directory,
                                vocab_size=300, with_pad=True)
    torch.manual_seed(0)
    config = GPTNeoXRewardModelConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=256,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    GPTNeoXRewardModel(config).save_pretrained(directory)


def save_nonzero_adapter(base, directory, target_modules=("q_proj", "v_proj"), r=2, seed=0):
    """A LoRA adapter on ``base`` with random (non-zero) B matrices, so the adapted model differs from the base."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lolrl.engine.modeling import load_model

    torch.manual_seed(seed)
    model = get_peft_model(load_model(base), LoraConfig(r=r, target_modules=list(target_modules),
                                                        init_lora_weights=False))
    model.save_pretrained(directory)
    return directory


SP_PIECES = ["<unk>", "<s>", "</s>", "▁", "▁###", "▁a", "▁Human", "▁Assistant", ":", "▁Sure", ".", "#", "a", "▁Q"]


def sentencepiece_tokenizer(directory=None, legacy: bool = True):
    """A LLaMA-style tokenizer built offline with the ``tokenizers`` library, ``▁###`` in its vocabulary.

    ``legacy=True`` follows SentencePiece's rules (transformers 4.x's LLaMA tokenizer): a ``▁`` is
    prepended to the text and every space becomes ``▁``, so ``" ###"`` is two tokens, ``['▁', '▁###']``.
    ``legacy=False`` is today's Metaspace pre-tokenizer (no second ``▁``): ``" ###"`` is ``['▁###']``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram([(p, -1.0 if len(p) > 1 else -5.0) for p in SP_PIECES], unk_id=0))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if directory is not None:
        fast.save_pretrained(str(directory))
    return fast

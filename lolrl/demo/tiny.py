"""Tiny models and tokenizers built from scratch, for tests, demos and benchmarks that must run offline.

They are saved with ``save_pretrained`` and loaded back with ``from_pretrained``, so they take
exactly the code path of real hub models.
"""
from __future__ import annotations

from pathlib import Path


def train_tokenizer(texts: list[str], directory: str | Path, vocab_size: int = 400, with_pad: bool = True):
    """A byte-level BPE tokenizer trained on ``texts``; ``with_pad=False`` mimics GPT-2 (no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<eos>", "<unk>"] + (["<pad>"] if with_pad else [])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>" if with_pad else None)
    fast.save_pretrained(str(directory))
    return fast


def build_causal_lm(tokenizer, directory: str | Path, n_layer: int = 2, n_embd: int = 32, n_head: int = 2,
                    n_positions: int = 512, seed: int = 0, dropout: float = 0.1):
    """A GPT-2 configuration of a few thousand parameters, randomly initialised and saved."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                        n_positions=n_positions, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return model


def build_llama_lm(tokenizer, directory: str | Path, n_layer: int = 2, hidden: int = 128, heads: int = 4,
                   max_positions: int = 256, seed: int = 0, init_std: float = 0.02):
    """A tiny Llama (rotary positions, as SmolLM2 and most current models): learns faster than GPT-2 here.
    ``init_std`` 0.3 gives logits as spread as a trained model's (std about 2), where bf16 rounding shows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=n_layer, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=init_std)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return model


def build_seq2seq_lm(tokenizer, directory: str | Path, d_model: int = 32, layers: int = 2, heads: int = 2,
                     seed: int = 0):
    """A T5 configuration (encoder-decoder) of the same tiny size, randomly initialised and saved."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model,
                      num_layers=layers, num_decoder_layers=layers, num_heads=heads, pad_token_id=pad,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=pad)
    model = T5ForConditionalGeneration(config)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return model

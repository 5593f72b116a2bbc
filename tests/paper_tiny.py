"""Tiny random models of the paper tasks' architectures, and the Keras-style naming of RoBERTa weights.

GPT-2-family models use a BPE tokenizer whose EOS is GPT-2's ``<|endoftext|>``; RoBERTa models a
BPE tokenizer with RoBERTa's specials and pair template. Everything is saved with
``save_pretrained`` so the scripts load it through their real loading code.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

EOS = "<|endoftext|>"
WORDS = ["the", "a", "is", "was", "what", "do", "you", "think", "about", "this", "that", "it", "really", "good",
         "bad", "game", "movie", "cat", "dog", "car", "buys", "wants", "drive", "show", "off", "sleeps", "wakes",
         "up", "knowledge", "paris", "capital", "france", "travel", "europe", "been", "have", "where", "should", "i",
         "we", "they", "like", "love", "hate", "person", "personx", "persony", "because", "needed", "feels", "seen",
         "as", "result", "hindered", "by", "can", "before", "so", "thanks", "nice", "great", "idea", "agree",
         "disagree", "funny", "lol", "yes", "no", "maybe", "never", "always"]


def corpus() -> list[str]:
    rng = np.random.RandomState(0)
    return [" ".join(rng.choice(WORDS, size=12)) for _ in range(300)] + [" ".join(WORDS)]


def gpt2_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   model_max_length=1024)
    fast.save_pretrained(str(directory))
    return fast


def roberta_tokenizer(directory: Path):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                   model_max_length=512, model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(str(directory))
    return fast


def roberta_config(tokenizer):
    from transformers import RobertaConfig

    return RobertaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=24, max_position_embeddings=514, type_vocab_size=1,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=2)


def gpt2_config(tokenizer, **kwargs):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=1024,
                      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)


def build_all(root: Path) -> dict[str, str]:
    """Policy (GPT-2 LM), CoLA / FaithCritic (RoBERTa classifiers), DialogRPT depth / updown
    (GPT2ForSequenceClassification), ToxiChat (GPT-2 + off_classifier) and the RoBERTa tokenizer/config."""
    from transformers import (
        GPT2ForSequenceClassification,
        RobertaForSequenceClassification,
    )

    from lolrl.demo.tiny import build_causal_lm
    from lolrl.tasks.paper.rewards import _toxichat_class

    root = Path(root)
    paths = {k: root / k for k in ("policy", "cola", "faithcritic", "depth", "updown", "offensive", "roberta")}
    gtok = gpt2_tokenizer(paths["policy"])
    build_causal_lm(gtok, paths["policy"], n_layer=1, n_embd=16, n_head=2, n_positions=1024, dropout=0.0)
    rtok = roberta_tokenizer(paths["roberta"])
    roberta_config(rtok).save_pretrained(str(paths["roberta"]))
    for seed, key in enumerate(("cola", "faithcritic")):
        torch.manual_seed(10 + seed)
        config = roberta_config(rtok)
        config.num_labels = 2
        RobertaForSequenceClassification(config).save_pretrained(str(paths[key]))
        rtok.save_pretrained(str(paths[key]))
    for seed, key in enumerate(("depth", "updown")):
        torch.manual_seed(20 + seed)
        model = GPT2ForSequenceClassification(gpt2_config(gtok, num_labels=1, pad_token_id=gtok.eos_token_id))
        with torch.no_grad():  # a visible spread of scores
            model.score.weight.normal_(0, 2.0)
        model.save_pretrained(str(paths[key]))
        gtok.save_pretrained(str(paths[key]))
    torch.manual_seed(30)
    _toxichat_class()(gpt2_config(gtok)).save_pretrained(str(paths["offensive"]))
    gtok.save_pretrained(str(paths["offensive"]))
    return {k: str(v) for k, v in paths.items()}


# --------------------------------------------------------------------------- Keras naming of the critic
def pt_to_keras_name(name: str) -> tuple[str, bool]:
    """The TF-RoBERTa name of a PyTorch RobertaModel parameter, written out independently of the converter:
    ``encoder.layer.0.attention.self.query.weight`` -> ``roberta/encoder/layer_._0/attention/self/query/kernel:0``."""
    parts = name.split(".")
    scopes, last = parts[:-1], parts[-1]
    out, i = [], 0
    while i < len(scopes):
        if scopes[i] == "layer" and i + 1 < len(scopes) and scopes[i + 1].isdigit():
            out.append(f"layer_._{scopes[i + 1]}")
            i += 2
        else:
            out.append(scopes[i])
            i += 1
    if scopes[-1] == "LayerNorm":
        last, transpose = {"weight": "gamma", "bias": "beta"}[last], False
    elif scopes[-1] in ("position_embeddings", "token_type_embeddings"):
        last, transpose = "embeddings", False
    elif scopes[-1] == "word_embeddings":
        last, transpose = "weight", False
    elif last == "weight":
        last, transpose = "kernel", True
    else:
        transpose = False
    return "roberta/" + "/".join(out + [last]) + ":0", transpose


def keras_weights_of(model, head_dense: torch.nn.Linear, head_out: torch.nn.Linear) -> dict[str, np.ndarray]:
    """A RobertaModel + head as the Keras critic names and stores them (kernels in x out)."""
    named = {}
    for name, param in model.named_parameters():
        keras_name, transpose = pt_to_keras_name(name)
        value = param.detach().numpy()
        named[keras_name] = value.T.copy() if transpose else value.copy()
    named["dense/kernel:0"] = head_dense.weight.detach().numpy().T.copy()
    named["dense/bias:0"] = head_dense.bias.detach().numpy().copy()
    named["dense_1/kernel:0"] = head_out.weight.detach().numpy().T.copy()
    named["dense_1/bias:0"] = head_out.bias.detach().numpy().copy()
    return named

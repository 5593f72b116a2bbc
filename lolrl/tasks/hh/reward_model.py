"""The OpenAssistant Pythia reward models of the HH experiments, loadable offline from a path.

The checkpoints (``OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5`` for training-time rewards,
``OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1`` for the test) use a custom architecture,
``gpt_neox_reward_model``: a GPT-NeoX backbone, the hidden state of the last attended token
(or the mean, ``pooling="mean"``) and a linear head to one logit. It is registered here with the
Auto classes, so ``AutoModelForSequenceClassification.from_pretrained`` loads them.

The reward model reads the dialogue in its own marker format: every turn followed by the EOS
token, the response appended to the final ``<|assistant|>`` slot,
``<|prompter|>Q<|endoftext|><|assistant|>RESPONSE<|endoftext|>``, left-truncated to 1,024 tokens;
the reward is the sigmoid of the logit, as in the original.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPTNeoXConfig,
    GPTNeoXModel,
    GPTNeoXPreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from lolrl.engine.modeling import ModelLoadError
from lolrl.tasks.hh.data import ASSISTANT

TRAINING_RM = "OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5"
TEST_RM = "OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1"


class GPTNeoXRewardModelConfig(GPTNeoXConfig):
    model_type = "gpt_neox_reward_model"

    def __init__(self, pooling: str = "last", **kwargs):
        super().__init__(**kwargs)
        self.pooling = pooling or "last"


class GPTNeoXRewardModel(GPTNeoXPreTrainedModel):
    config_class = GPTNeoXRewardModelConfig

    def __init__(self, config):
        super().__init__(config)
        self.gpt_neox = GPTNeoXModel(config)
        self.out_proj = nn.Linear(config.hidden_size, 1)
        self.pooling = config.pooling
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs) -> SequenceClassifierOutput:
        hidden = self.gpt_neox(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if attention_mask is None:
            pooled = hidden.mean(dim=1) if self.pooling == "mean" else hidden[:, -1]
        elif self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
        else:  # the last attended position, wherever the padding is
            last = attention_mask.cumsum(dim=1).argmax(dim=1)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return SequenceClassifierOutput(logits=self.out_proj(pooled))


def register() -> None:
    """Make the Auto classes know the OpenAssistant reward-model architecture (idempotent)."""
    try:
        AutoConfig.register(GPTNeoXRewardModelConfig.model_type, GPTNeoXRewardModelConfig)
        AutoModelForSequenceClassification.register(GPTNeoXRewardModelConfig, GPTNeoXRewardModel)
    except ValueError:  # already registered
        pass


def reward_model_text(turns: list[str], response: str, eos: str) -> str:
    """``turn<eos>`` for every turn, the response filling the final bare ``<|assistant|>`` slot."""
    if not turns or turns[-1] != ASSISTANT:
        raise ValueError("the dialogue must end with the bare '<|assistant|>' slot")
    return "".join(t + eos for t in turns[:-1]) + ASSISTANT + response + eos


class HHRewardModel:
    """A reward function with TRL's signature: ``f(prompts, completions, turns=..., **columns)``.

    ``turns`` (a column of the HH records, see :func:`lolrl.tasks.hh.data.pro_records`) holds each row's
    marker-format dialogue; the score is ``sigmoid(logit)`` in (0, 1)."""

    def __init__(self, model_name: str = TRAINING_RM, device: str | None = None, batch_size: int = 16,
                 max_length: int = 1024):
        register()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_name)
            model = AutoModelForSequenceClassification.from_pretrained(model_name)
        except (OSError, ValueError) as exc:  # the hub client's answer to a missing folder or repository
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"--reward_model {model_name!r}: cannot load the reward model ({first})") from None
        self.tokenizer.truncation_side = "left"
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(self.device).eval()
        self.batch_size, self.max_length = batch_size, max_length
        self.__name__ = "hh_reward_model"

    @torch.no_grad()
    def __call__(self, prompts, completions, turns=None, **columns) -> list[float]:
        if turns is None:
            raise ValueError("the HH reward model needs the 'turns' column (marker-format dialogues)")
        texts = [reward_model_text(t, c, self.tokenizer.eos_token) for t, c in zip(turns, completions)]
        scores: list[float] = []
        for start in tqdm(range(0, len(texts), self.batch_size), desc="HH reward model", leave=False):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            scores += torch.sigmoid(self.model(**batch).logits[:, 0].float()).tolist()
        return scores

"""The reward components of the paper's small-model tasks, as named, reusable recipes.

Every component is a callable with TRL's reward signature ``f(prompts, completions, **columns)
-> list[float]`` (see :mod:`lolrl.engine.rewards`), loads its model lazily (from a hub id or a local
path, with ``from_pretrained``) on first use, scores in batches of ``batch_size`` on
``device`` (CUDA when available), and returns one score in [0, 1] per row:

| component | model (flag) | input | score |
|---|---|---|---|
| ``fluency`` | ``textattack/roberta-base-CoLA`` (``-cm``) | R | ``softmax(logits)[1]`` = P(acceptable) |
| ``depth`` | ``microsoft/DialogRPT-depth`` (``-dcm``) | C + R (Reddit), H + R (dialogue) | ``sigmoid(logit)`` [1] |
| ``updown`` | ``microsoft/DialogRPT-updown`` (``-ucm``) | C + R | ``sigmoid(logit)`` [1] |
| ``safe`` | ToxiChat DialoGPT offensive classifier (``-om``) | C + R + EOS | ``softmax(logits)[0]`` (safe) [2] |
| ``faithdial`` | ``McGill-NLP/roberta-large-faithcritic`` (``-fcm``) | pair (knowledge, R) | ``softmax(logits)[0]`` |
| ``p_valid_model`` | the COMET critic (``-ccm``) [3] | pair (head, relation + tail) | ``sigmoid(head(pooler))`` |
| ``tfidf`` | TF-IDF fitted on the training references | R | mean non-zero tf-idf weight x length penalty |
| ``ngram_diversity`` | none | R | distinct-1 + distinct-2 + distinct-3 of the response |

[1] at the last real token; [2] at the last EOS; [3] from ``convert_keras_roberta_to_huggingface.py``;
``fluency`` is P(LABEL_1), ``faithdial`` P(faithful), ``p_valid_model`` reads the pooler output.

C is the record's prompt (ending in ``<|endoftext|>``), R the response with one trailing
``<|endoftext|>`` removed (references carry it, generations do not), H the dialogue history
(the prompt after its ``Knowledge: ...<|endoftext|>`` part). ``final_reward`` is the plain sum.

Fixed bugs of the original code (documented per component): DialogRPT is scored at each
sequence's last real token (the original's transformers version pooled at the first pad =
EOS, i.e. the end of the context, so the score ignored the response); the ToxiChat threads
longer than 512 tokens keep their last 512 tokens (the original crashed); a batch of one
returns a list (the original's ``squeeze().tolist()`` returned a float); the COMET critic's
random names are drawn from a seeded generator per row and averaged over several draws, as in
the Symbolic Knowledge Distillation critic that scored the training data (the original drew
one fresh unseeded sample per call).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from lolrl.engine.rewards import RewardComponent, RewardFunction, RewardSpecError
from lolrl.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"  # the GPT-2 / DialoGPT end-of-text string the tasks' data is written with
KNOWLEDGE_PREFIX = "Knowledge:"
TFIDF_FILE = "tfidf.json"
COMET_HEAD_FILE = "custom_roberta_classification_head.safetensors"
COMET_HEAD_FILE_ORIGINAL = "custom_roberta_classification_head.pt"

DEFAULT_MODELS = {
    "cola": "textattack/roberta-base-CoLA",
    "updown": "microsoft/DialogRPT-updown",
    "depth": "microsoft/DialogRPT-depth",
    "offensive": "saved_models/DGPT_medium_OC_S_and_SBF_offensive_e2",
    "faithcritic": "McGill-NLP/roberta-large-faithcritic",
    "comet_critic": "saved_models/comet_critic_keras_to_pytorch",
}
# the original's flags for each model, as in ``-cm textattack/roberta-base-CoLA``
MODEL_FLAGS = {"cola": "-cm", "updown": "-ucm", "depth": "-dcm", "offensive": "-om", "faithcritic": "-fcm",
               "comet_critic": "-ccm"}
# the models that only exist as local folders (not on the hub)
LOCAL_ONLY = ("offensive", "comet_critic")

# COMET: relation -> natural-language phrase of the critic's input (from Symbolic Knowledge Distillation)
COMET_RELATION_PHRASES = {
    "HinderedBy": "can be hindered by",
    "xNeed": "but before, PersonX needed",
    "xWant": "as a result, PersonX wants",
    "xIntent": "because PersonX wanted",
    "xReact": "as a result, PersonX feels",
    "xAttr": "so, PersonX is seen as",
    "xEffect": "as a result, PersonX",
}
# First names substituted for PersonX / PersonY before the critic reads a triple. The original drew
# them with the ``names`` package; a fixed list with a seeded draw makes the reward reproducible.
FIRST_NAMES = (
    "James", "Mary", "Robert", "Patricia", "John", "Jennifer", "Michael", "Linda", "David", "Elizabeth",
    "William", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah", "Charles", "Karen",
    "Christopher", "Lisa", "Daniel", "Nancy", "Matthew", "Betty", "Anthony", "Margaret", "Mark", "Sandra",
    "Donald", "Ashley", "Steven", "Kimberly", "Paul", "Emily", "Andrew", "Donna", "Joshua", "Michelle",
    "Kenneth", "Carol", "Kevin", "Amanda", "Brian", "Dorothy", "George", "Melissa", "Timothy", "Deborah",
)


# ----------------------------------------------------------------------------- text helpers
def strip_eos(text: str) -> str:
    """The response the reward models read: one trailing ``<|endoftext|>`` removed, if present."""
    return text.removesuffix(EOS)


def split_dialogue_prompt(prompt: str) -> tuple[str, str]:
    """``Knowledge: K<eos>H<eos>`` -> (knowledge, history + EOS), as the original parsed it.

    The knowledge is the prompt up to its first EOS with the 10 characters ``Knowledge:`` cut, so
    it keeps its leading space (the original's input to FaithCritic, kept so scores match)."""
    if not prompt.startswith(KNOWLEDGE_PREFIX) or EOS not in prompt:
        raise ValueError(f"a dialogue prompt must start with {KNOWLEDGE_PREFIX!r} and contain {EOS!r}: "
                         f"{prompt[:80]!r}")
    knowledge, _, history = prompt.partition(EOS)
    return knowledge[len(KNOWLEDGE_PREFIX):], history


def dialogue_knowledge(prompt: str) -> str:
    """The knowledge of a dialogue prompt as the original's coverage/density read it: the text before
    the first EOS, without ``Knowledge:``, stripped."""
    return split_dialogue_prompt(prompt)[0].strip()


_HEAD_RE = re.compile(r"<head>(.*?)</head>", re.DOTALL)
_RELATION_RE = re.compile(r"<relation>(.*?)</relation>", re.DOTALL)


def parse_comet_prompt(prompt: str) -> tuple[str, str]:
    """``<head> H </head> <relation> R </relation> [GEN] `` -> (H, R), both stripped."""
    head, relation = _HEAD_RE.search(prompt), _RELATION_RE.search(prompt)
    if head is None or relation is None:
        raise ValueError(f"not a COMET prompt (needs <head>...</head> and <relation>...</relation>): {prompt[:80]!r}")
    return head.group(1).strip(), relation.group(1).strip()


def _as_text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"the paper's reward models score plain text, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------- model loading
def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def check_model_location(location: str, key: str) -> None:
    """Fail before anything loads on a local path that does not exist (or a hub id while offline)."""
    flag = MODEL_FLAGS.get(key, key)
    path = Path(location).expanduser()
    if path.exists():
        return
    looks_local = key in LOCAL_ONLY or location.startswith((".", "/", "~")) or location.count("/") > 1
    if looks_local:
        raise RewardSpecError(f"{flag} {location!r}: no such folder")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no"):
        raise RewardSpecError(f"{flag} {location!r}: not a local folder, and HF_HUB_OFFLINE is set")


def _load(loader, location: str, key: str):
    try:
        return loader(location)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RewardSpecError(f"{MODEL_FLAGS.get(key, key)} {location!r}: cannot load ({first})") from None


class _ModelScorer:
    """Lazy model loading, batching and device placement shared by the model-based components."""

    key = ""  # which DEFAULT_MODELS entry / flag

    def __init__(self, location: str, device: str | torch.device | None = None, batch_size: int = 32):
        check_model_location(location, self.key)
        self.location = location
        self.device = torch.device(device) if device is not None else default_device()
        self.batch_size = batch_size
        self.model = None
        self.tokenizer = None
        self.__name__ = type(self).__name__

    @property
    def source(self) -> str:
        return f"lolrl.tasks.paper.rewards:{type(self).__name__}({self.location})"

    def load(self) -> None:
        if self.model is None:
            self._load()
            self.model.to(self.device)
            self.model.eval()

    def _load(self) -> None:
        raise NotImplementedError

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns) -> list[float]:
        self.load()
        out: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            batch_cols = {k: list(v[start:stop]) for k, v in columns.items()}
            with torch.inference_mode():
                scores = self.score_batch([_as_text(p) for p in prompts[start:stop]],
                                          [strip_eos(_as_text(c)) for c in completions[start:stop]], **batch_cols)
            out.extend(float(s) for s in scores)
        return out

    def score_batch(self, prompts: list[str], responses: list[str], **columns) -> list[float]:
        raise NotImplementedError

    def _encode(self, *texts, max_length: int, **kwargs) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(*texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                             **kwargs)
        return {k: v.to(self.device) for k, v in enc.items()}


def _sequence_classifier(location: str):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(location)


def _tokenizer(location: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location)


# ----------------------------------------------------------------------------- transforms
def cola_transform(logits: torch.Tensor) -> torch.Tensor:
    """P(LABEL_1) = softmax(logits)[:, 1]: the original took the pipeline's top label's score, or 1 minus it
    for LABEL_0, which for a 2-label model is exactly this."""
    return torch.softmax(logits.float(), dim=-1)[:, 1]


def dialogrpt_transform(logits: torch.Tensor) -> torch.Tensor:
    """sigmoid of the single logit (already pooled at the last real token): [batch, 1] -> [batch]."""
    return torch.sigmoid(logits.float()[:, 0])


def safe_transform(logits: torch.Tensor) -> torch.Tensor:
    """ToxiChat: class 0 is safe, class 1 offensive; safe = softmax(logits)[:, 0] = 1 - P(offensive)."""
    return torch.softmax(logits.float(), dim=-1)[:, 0]


def faithcritic_transform(logits: torch.Tensor) -> torch.Tensor:
    """FaithCritic: index 0 is "faithful" (the original's reading of the model); softmax(logits)[:, 0]."""
    return torch.softmax(logits.float(), dim=-1)[:, 0]


# ----------------------------------------------------------------------------- components
class CoLAFluency(_ModelScorer):
    """``fluency``: P(acceptable) of the response alone under a CoLA classifier (truncated to 512 tokens)."""

    key = "cola"

    def _load(self) -> None:
        self.tokenizer = _load(_tokenizer, self.location, self.key)
        self.model = _load(_sequence_classifier, self.location, self.key)
        if self.model.config.num_labels != 2:
            raise RewardSpecError(f"-cm {self.location!r}: expected a 2-label CoLA classifier, "
                                  f"got {self.model.config.num_labels} labels")

    def score_batch(self, prompts, responses, **columns):
        return cola_transform(self.model(**self._encode(responses, max_length=512)).logits).tolist()


def last_token_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits of a decoder sequence classifier at each row's last real token (right padding).

    transformers' own pooling picks the position from ``pad_token_id``; with DialogRPT's pad = EOS
    that is the end of the *context* (the first EOS) and the response is ignored, the original's bug.
    Here the position comes from the attention mask."""
    base = getattr(model, model.base_model_prefix, None)
    head = getattr(model, "score", None)
    lengths = attention_mask.sum(dim=1) - 1
    if base is None or head is None:  # not a GPT-2-style classifier: rely on the model's pooling
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths]
    return head(picked)


class DialogRPTScore(_ModelScorer):
    """``depth`` / ``updown``: sigmoid of a DialogRPT logit on ``context + response``.

    ``context="prompt"`` (Reddit) reads the whole prompt (``parent<eos>``), ``context="history"``
    (dialogue) the prompt after its knowledge part (``u1<eos>u2<eos>``). Scored at the last real
    token of each sequence (see :func:`last_token_logits`)."""

    def __init__(self, location: str, key: str = "depth", context: str = "prompt", **kwargs):
        if context not in ("prompt", "history"):
            raise ValueError(f"context must be 'prompt' or 'history', got {context!r}")
        self.key = key
        self.context = context
        super().__init__(location, **kwargs)

    @property
    def source(self) -> str:
        return f"lolrl.tasks.paper.rewards:DialogRPTScore({self.location},context={self.context})"

    def _load(self) -> None:
        self.tokenizer = _load(_tokenizer, self.location, self.key)
        self.model = _load(_sequence_classifier, self.location, self.key)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        positions = getattr(self.model.config, "n_positions", None) or 1024
        self.max_length = min(int(self.tokenizer.model_max_length), int(positions))

    def score_batch(self, prompts, responses, **columns):
        contexts = prompts if self.context == "prompt" else [split_dialogue_prompt(p)[1] for p in prompts]
        enc = self._encode([c + r for c, r in zip(contexts, responses)], max_length=self.max_length)
        return dialogrpt_transform(last_token_logits(self.model, enc["input_ids"], enc["attention_mask"])).tolist()


def _toxichat_class():
    from torch import nn
    from transformers import GPT2Model, GPT2PreTrainedModel

    class ToxiChatOffensiveClassifier(GPT2PreTrainedModel):
        """The ToxiChat offensive classifier (``GPT2ForOC_S_offensive``): a DialoGPT body and a linear
        ``off_classifier`` (hidden -> 2: safe, offensive) read at every utterance's EOS. Loads the
        original's saved folder (its ``lm_head`` is not needed and is ignored)."""

        _keys_to_ignore_on_load_unexpected = (r"lm_head", r"critic", r"stance_classifier", r"target_classifier")

        def __init__(self, config):
            super().__init__(config)
            self.transformer = GPT2Model(config)
            self.dropout = nn.Dropout(config.embd_pdrop)
            self.off_classifier = nn.Linear(config.hidden_size, 2)
            self.post_init()

        def forward(self, input_ids, attention_mask=None, eos_positions=None):
            """Logits [batch, 2] at ``eos_positions`` (one position per row)."""
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), eos_positions]
            return self.off_classifier(self.dropout(picked))

    return ToxiChatOffensiveClassifier


class ToxiChatSafety(_ModelScorer):
    """``safe``: 1 - P(offensive) of the response's utterance in the thread ``context + response + EOS``.

    The thread is tokenized without special tokens; the classifier reads the final-layer state at
    the last EOS (the end of the response). A thread longer than ``max_length`` (512, the
    classifier's training limit) keeps its last tokens, so the response's EOS is always scored."""

    key = "offensive"

    def __init__(self, location: str, max_length: int = 512, **kwargs):
        self.max_length = max_length
        super().__init__(location, **kwargs)

    def _load(self) -> None:
        self.tokenizer = _load(_tokenizer, self.location, self.key)
        self.model = _load(_toxichat_class().from_pretrained, self.location, self.key)
        if self.tokenizer.eos_token_id is None:
            raise RewardSpecError(f"-om {self.location!r}: the tokenizer has no EOS token")

    def score_batch(self, prompts, responses, **columns):
        eos_id = self.tokenizer.eos_token_id
        rows = []
        for prompt, response in zip(prompts, responses):
            ids = self.tokenizer(prompt + response + EOS, add_special_tokens=False)["input_ids"][-self.max_length:]
            rows.append(ids)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), eos_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        positions = []
        for i, ids in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            mask[i, :len(ids)] = 1
            eos_at = [j for j, t in enumerate(ids) if t == eos_id]
            positions.append(eos_at[-1] if eos_at else len(ids) - 1)
        logits = self.model(input_ids.to(self.device), mask.to(self.device),
                            torch.tensor(positions, device=self.device))
        return safe_transform(logits).tolist()


class FaithCritic(_ModelScorer):
    """``faithdial``: P(faithful) of the response given the knowledge, a (knowledge, response) text pair.

    The knowledge comes from the prompt as the original parsed it (see :func:`split_dialogue_prompt`)."""

    key = "faithcritic"

    def _load(self) -> None:
        self.tokenizer = _load(_tokenizer, self.location, self.key)
        self.model = _load(_sequence_classifier, self.location, self.key)

    def score_batch(self, prompts, responses, **columns):
        knowledge = [split_dialogue_prompt(p)[0] for p in prompts]
        logits = self.model(**self._encode(knowledge, responses, max_length=512)).logits
        return faithcritic_transform(logits).tolist()


class CometCriticHead(torch.nn.Module):
    """The critic's head on RoBERTa's ``pooler_output``: Linear(h, 512) -> GELU -> Linear(512, 1) -> sigmoid.
    No dropout (inference). Keys ``dense.*`` and ``out_proj.*``."""

    def __init__(self, hidden_size: int = 1024, inner_size: int = 512):
        super().__init__()
        self.dense = torch.nn.Linear(hidden_size, inner_size)
        self.out_proj = torch.nn.Linear(inner_size, 1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out_proj(torch.nn.functional.gelu(self.dense(pooled))))


def load_comet_head(directory: str | Path) -> CometCriticHead:
    """The head from ``custom_roberta_classification_head.safetensors`` (or the original's ``.pt``)."""
    directory = Path(directory)
    if (directory / COMET_HEAD_FILE).is_file():
        from safetensors.torch import load_file

        state = load_file(str(directory / COMET_HEAD_FILE))
    elif (directory / COMET_HEAD_FILE_ORIGINAL).is_file():
        state = torch.load(directory / COMET_HEAD_FILE_ORIGINAL, map_location="cpu", weights_only=True)
    else:
        raise RewardSpecError(f"-ccm {str(directory)!r}: no {COMET_HEAD_FILE} "
                              "(run convert_keras_roberta_to_huggingface.py)")
    head = CometCriticHead(state["dense.weight"].shape[1], state["dense.weight"].shape[0])
    head.load_state_dict(state)
    return head


def comet_critic_inputs(head: str, relation: str, tail: str, rng: random.Random) -> tuple[str, str]:
    """The critic's text pair: (head, relation phrase + " " + tail) with PersonX / PersonY replaced by two
    different first names drawn from ``rng``, then ``ftfy.fix_text``, as the original did."""
    import ftfy

    if relation not in COMET_RELATION_PHRASES:
        raise ValueError(f"unknown COMET relation {relation!r} (expected one of {', '.join(COMET_RELATION_PHRASES)})")
    text = f"{head}**SEP**{COMET_RELATION_PHRASES[relation]} {tail}"
    first, second = rng.sample(FIRST_NAMES, 2)
    text = ftfy.fix_text(text.replace("PersonX", first).replace("PersonY", second))
    left, _, right = text.partition("**SEP**")
    return left, right


class CometCritic(_ModelScorer):
    """``p_valid_model``: the COMET critic's probability that (head, relation, tail) is a valid triple.

    Head and relation come from the prompt, the tail is the response. Each row is scored with
    ``name_samples`` name substitutions (random names drawn from a generator seeded by the row's
    text, so the score is reproducible) and the scores are averaged; 5, as the Symbolic Knowledge
    Distillation critic that produced the training data's ``p_valid_model``."""

    key = "comet_critic"

    def __init__(self, location: str, name_samples: int = 5, **kwargs):
        self.name_samples = name_samples
        super().__init__(location, **kwargs)

    @property
    def source(self) -> str:
        return f"lolrl.tasks.paper.rewards:CometCritic({self.location},name_samples={self.name_samples})"

    def _load(self) -> None:
        from transformers import AutoModel

        self.tokenizer = _load(_tokenizer, self.location, self.key)
        encoder = _load(AutoModel.from_pretrained, self.location, self.key)
        if getattr(encoder, "pooler", None) is None:
            raise RewardSpecError(f"-ccm {self.location!r}: the encoder has no pooler (needed for pooler_output)")
        self.model = torch.nn.ModuleDict({"encoder": encoder, "head": load_comet_head(self.location)})

    def score_triples(self, triples: list[tuple[str, str, str]]) -> list[float]:
        self.load()
        totals = [0.0] * len(triples)
        for k in range(self.name_samples):
            pairs = []
            for head, relation, tail in triples:
                seed = hashlib.sha256(f"{k}\x00{head}\x00{relation}\x00{tail}".encode()).hexdigest()
                pairs.append(comet_critic_inputs(head, relation, tail, random.Random(seed)))
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[start:start + self.batch_size]
                enc = self.tokenizer([a for a, _ in chunk], [b for _, b in chunk], padding=True, return_tensors="pt")
                enc = {key: v.to(self.device) for key, v in enc.items()}
                with torch.inference_mode():
                    pooled = self.model["encoder"](**enc).pooler_output
                    probs = self.model["head"](pooled)[:, 0].tolist()
                for i, p in enumerate(probs):
                    totals[start + i] += p
        return [t / self.name_samples for t in totals]

    def score_batch(self, prompts, responses, **columns):
        return self.score_triples([(*parse_comet_prompt(p), r) for p, r in zip(prompts, responses)])


# ----------------------------------------------------------------------------- TF-IDF and n-grams
_TOKEN_RE = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn CountVectorizer's default token pattern


def tfidf_terms(text: str) -> list[str]:
    """CountVectorizer's default analysis: lower-case, tokens of 2+ word characters."""
    return _TOKEN_RE.findall(text.lower())


class TfidfScorer:
    """``tfidf``: the original's "diversity" reward, without scikit-learn or pickles.

    Fit (as ``CountVectorizer()`` + ``TfidfTransformer(smooth_idf=True, use_idf=True)``):
    idf(t) = ln((1 + n) / (1 + df(t))) + 1 over the n training references. A response's vector
    holds count(t) * idf(t) for its in-vocabulary terms, L2-normalised; with k non-zero entries,

        reward = mean(non-zero entries) * (k / 10 if k < 5 else 1),   0 when k = 0.

    (The original's comment says "#words/10 if < 10 words"; its code, reproduced here, uses the
    number of distinct in-vocabulary terms and the threshold 5.) Saved as JSON ``{"idf": {term: idf}}``.
    """

    __name__ = "tfidf"

    def __init__(self, idf: dict[str, float], source: str = "fitted"):
        self.idf = dict(idf)
        self.source = source

    @classmethod
    def fit(cls, texts: Sequence[str]) -> TfidfScorer:
        df: dict[str, int] = {}
        for text in texts:
            for term in set(tfidf_terms(strip_eos(text))):
                df[term] = df.get(term, 0) + 1
        n = len(texts)
        return cls({t: math.log((1 + n) / (1 + d)) + 1.0 for t, d in sorted(df.items())})

    def save(self, path: str | Path) -> Path:
        atomic_write_text(path, json.dumps({"format": "lolrl-tfidf-1", "idf": self.idf}) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> TfidfScorer:
        path = Path(path)
        if not path.is_file():
            raise RewardSpecError(f"TF-IDF file {str(path)!r} not found (the preprocessing script writes it "
                                  f"to its output folder as {TFIDF_FILE})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            idf = {str(k): float(v) for k, v in data["idf"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RewardSpecError(f"TF-IDF file {str(path)!r} is not valid ({exc})") from None
        return cls(idf, source=f"lolrl.tasks.paper.rewards:TfidfScorer({path})")

    def vector(self, text: str) -> dict[str, float]:
        counts: dict[str, int] = {}
        for term in tfidf_terms(text):
            if term in self.idf:
                counts[term] = counts.get(term, 0) + 1
        raw = {t: c * self.idf[t] for t, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in raw.values()))
        return {t: v / norm for t, v in raw.items()} if norm > 0 else {}

    def score(self, text: str) -> float:
        values = [v for v in self.vector(strip_eos(text)).values() if v != 0]
        if not values:
            return 0.0
        k = len(values)
        return (sum(values) / k) * (k / 10 if k < 5 else 1.0)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns) -> list[float]:
        return [self.score(_as_text(c)) for c in completions]


def ngram_diversity(prompts: Sequence[Any], completions: Sequence[Any], **columns) -> list[float]:
    """Per response: distinct-1 + distinct-2 + distinct-3 on case-sensitive whitespace tokens, each
    term = unique n-grams / n-grams (0 when the response has no n-gram of that order; the original
    divided by zero on an empty response). Range [0, 3]."""
    scores = []
    for text in completions:
        tokens = strip_eos(_as_text(text)).split()
        total = 0.0
        for n in (1, 2, 3):
            grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
            total += len(set(grams)) / len(grams) if grams else 0.0
        scores.append(total)
    return scores


# ----------------------------------------------------------------------------- recipes
@dataclass
class PaperRewardModels:
    """Where each classifier lives (hub id or local folder), by the original's flags; defaults as in its README."""

    cola: str = DEFAULT_MODELS["cola"]
    updown: str = DEFAULT_MODELS["updown"]
    depth: str = DEFAULT_MODELS["depth"]
    offensive: str = DEFAULT_MODELS["offensive"]
    faithcritic: str = DEFAULT_MODELS["faithcritic"]
    comet_critic: str = DEFAULT_MODELS["comet_critic"]
    device: str | None = None
    batch_size: int = 32

    @classmethod
    def from_args(cls, args, batch_size: int = 32) -> PaperRewardModels:
        """From an argparse namespace with the original's long flag names (None keeps the default)."""
        names = {"cola": "cola_classifier_model", "updown": "updown_dialogRPT_model", "depth": "depth_dialogRPT_model",
                 "offensive": "offensive_model_dir", "faithcritic": "faithdial_critic_model",
                 "comet_critic": "comet_critic_model"}
        given = {key: getattr(args, attr, None) for key, attr in names.items()}
        return cls(**{k: v for k, v in given.items() if v is not None}, batch_size=batch_size)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


REDDIT_TASKS = ("reddit_pos", "reddit_neg")
DIALOGUE_TASKS = ("wow", "faithdial", "faithdial_wow")
COMET_TASKS = ("comet",)


def task_reward_components(task: str, models: PaperRewardModels, tfidf: TfidfScorer | str | Path | None = None
                           ) -> dict[str, Any]:
    """The task's components, name -> callable, in the original's order (``final_reward`` = their sum)."""
    task = task.lower()
    kwargs = {"device": models.device, "batch_size": models.batch_size}
    if task in COMET_TASKS:
        return {"p_valid_model": CometCritic(models.comet_critic, **kwargs)}
    if task not in REDDIT_TASKS + DIALOGUE_TASKS:
        raise RewardSpecError(f"task {task!r} has no paper reward recipe "
                              f"(known: {', '.join(REDDIT_TASKS + DIALOGUE_TASKS + COMET_TASKS)})")
    if tfidf is None:
        raise RewardSpecError(f"task {task!r}: the tfidf component needs the preprocessed folder's {TFIDF_FILE}")
    if not isinstance(tfidf, TfidfScorer):
        tfidf = TfidfScorer.load(tfidf)
    if task in REDDIT_TASKS:
        return {"fluency": CoLAFluency(models.cola, **kwargs),
                "depth": DialogRPTScore(models.depth, key="depth", context="prompt", **kwargs),
                "updown": DialogRPTScore(models.updown, key="updown", context="prompt", **kwargs),
                "safe": ToxiChatSafety(models.offensive, **kwargs),
                "tfidf": tfidf}
    return {"fluency": CoLAFluency(models.cola, **kwargs),
            "faithdial": FaithCritic(models.faithcritic, **kwargs),
            "depth": DialogRPTScore(models.depth, key="depth", context="history", **kwargs),
            "tfidf": tfidf}


def build_task_reward(task: str, models: PaperRewardModels | None = None,
                      tfidf: TfidfScorer | str | Path | None = None) -> RewardFunction:
    """The task's reward: every component with weight 1, so ``final_reward`` is their plain sum."""
    components = task_reward_components(task, models or PaperRewardModels(), tfidf)
    return RewardFunction([RewardComponent(name, 1.0, fn, getattr(fn, "source", name))
                           for name, fn in components.items()])

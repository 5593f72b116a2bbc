"""Loading models and tokenizers, and the one forward pass every stage shares.

Causal LMs and encoder-decoder LMs are both supported; which one a checkpoint is comes from
its config (``is_encoder_decoder``). LoRA adapters come from peft.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields

import torch

from lolrl.engine import liger
from lolrl.engine.collation import TOKENIZATION, Collator
from lolrl.utils.cache import model_identity
from lolrl.utils.cli import setting
from lolrl.utils.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelLoadError(UserError):
    """A model or tokenizer that cannot be loaded; the message names the path."""


@dataclass
class LoraSettings:
    """LoRA (peft); the scripts' flags ``--lora_r``, ``--lora_alpha``, ``--lora_dropout``, ``--lora_target_modules``."""

    r: int = setting(0, "LoRA rank; 0 trains all weights", min=0)
    alpha: float = setting(16, "LoRA alpha")
    dropout: float = setting(0.05, "LoRA dropout (0 with --disable_dropout, the default)", min=0.0, max=1.0)
    target_modules: str | None = setting(None, "comma-separated module names; none: peft's choice for the "
                                               "architecture")

    @property
    def enabled(self) -> bool:
        return self.r > 0


def _check_local_or_hub(name: str) -> None:
    """Fail early on a path that cannot exist; 'org/name' is left to the hub client."""
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not os.path.exists(os.path.expanduser(name)):
        raise ModelLoadError(f"model path '{name}' does not exist")


def split_adapter(name: str, adapter_path: str | None = None) -> tuple[str, str | None]:
    """A folder holding a peft adapter (``adapter_config.json``) stands for base model + adapter."""
    config_file = os.path.join(os.path.expanduser(name), "adapter_config.json")
    if adapter_path is None and os.path.isfile(config_file):
        with open(config_file) as handle:
            base = json.load(handle).get("base_model_name_or_path")
        if not base:
            raise ModelLoadError(f"adapter '{name}' does not name its base model (base_model_name_or_path)")
        return base, name
    return name, adapter_path


def load_config(name: str):
    from transformers import AutoConfig

    name, _ = split_adapter(name)
    _check_local_or_hub(name)
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model config from '{name}': {str(exc).splitlines()[0]}") from None


def is_encoder_decoder(name: str) -> bool:
    return bool(getattr(load_config(name), "is_encoder_decoder", False))


def load_tokenizer(name: str, tokenizer_name: str | None = None):
    """Tokenizer with a pad token: a tokenizer without one reuses EOS (GPT-2 style), as is usual."""
    from transformers import AutoTokenizer

    source = tokenizer_name or name
    _check_local_or_hub(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load tokenizer from '{source}': {str(exc).splitlines()[0]}") from None
    if len(tokenizer) == 0 or not tokenizer("a b c").input_ids:  # transformers' answer to a folder without one
        raise ModelLoadError(f"'{source}' has no tokenizer files (an empty tokenizer loaded): copy them there "
                             "or name the tokenizer (--model_tokenizer / tokenizer_name)")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer '{source}' has neither a pad nor an eos token")
        logger.info("tokenizer '%s' has no pad token: using eos (%r) for padding", source, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("auto", *DTYPES)


@dataclass(kw_only=True)
class QuantizationSettings:
    """How ``load_in_4bit`` quantises the frozen base (bitsandbytes, CUDA only). The defaults are
    QLoRA's (NF4, double quantisation, compute in the run's dtype, peft's
    ``prepare_model_for_kbit_training``); the HH scripts restate the original's (NF4, no double
    quantisation, fp16 compute, no preparation). Also the flags of every script that loads in 4-bit."""

    quant_type: str = setting("nf4", "4-bit data type of the quantised base (bnb_4bit_quant_type)",
                              choices=QUANT_TYPES)
    double_quant: bool = setting(True, "quantise the quantisation constants too (bnb_4bit_use_double_quant)")
    compute_dtype: str = setting("auto", "dtype the 4-bit layers compute in (bnb_4bit_compute_dtype); auto: the "
                                 "run's dtype, bf16 for fp32", choices=COMPUTE_DTYPES,
                                 aliases=["--bnb_4bit_compute_dtype"])
    prepare_kbit_training: bool = setting(True, "peft's prepare_model_for_kbit_training on a trainable 4-bit model "
                                                "(casts the base's non-quantised weights, e.g. norms, to fp32)",
                                          aliases=["--prepare_model_for_kbit_training"])

    @classmethod
    def of(cls, settings) -> QuantizationSettings:
        """The quantisation fields of ``settings`` (a script's arguments, which inherit these flags)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    def check(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(f"--quant_type must be one of {', '.join(QUANT_TYPES)}, got '{self.quant_type}'")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"--compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got '{self.compute_dtype}'")


def bnb_4bit_kwargs(quantization: QuantizationSettings, dtype: str) -> dict:
    """The keyword arguments of transformers' ``BitsAndBytesConfig`` for ``quantization`` in a run of ``dtype``."""
    compute = quantization.compute_dtype
    if compute == "auto":
        compute = "bf16" if dtype == "fp32" else dtype
    return {"load_in_4bit": True, "bnb_4bit_quant_type": quantization.quant_type,
            "bnb_4bit_use_double_quant": quantization.double_quant, "bnb_4bit_compute_dtype": DTYPES[compute]}


def quantization_kwargs(dtype: str, quantization: QuantizationSettings, device_index: int = 0) -> dict:
    """``from_pretrained``'s arguments for a 4-bit base (bitsandbytes, CUDA only)."""
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(**bnb_4bit_kwargs(quantization, dtype)),
            "device_map": {"": device_index}}


def can_load_in_4bit() -> bool:
    """Whether ``load_in_4bit`` quantises here (bitsandbytes needs CUDA); else the plain model loads."""
    return torch.cuda.is_available()


def base_load_dtype(dtype: str, lora: LoraSettings | None, adapter_path: str | None, load_in_4bit: bool) -> str:
    """The dtype the base model loads in: the run's for a frozen base (LoRA, an adapter, 4-bit), else fp32
    (full fine-tuning keeps fp32 master weights and runs under autocast, as transformers' Trainer)."""
    frozen_base = (lora is not None and lora.enabled) or adapter_path is not None or load_in_4bit
    return dtype if frozen_base else "fp32"


def load_model(name: str, dtype: str = "fp32", lora: LoraSettings | None = None,
               adapter_path: str | None = None, trainable: bool = True, load_in_4bit: bool = False,
               device_index: int = 0, quantization: QuantizationSettings | None = None):
    """Load a causal or seq2seq LM; wrap it with a new LoRA adapter or an existing one if asked.
    ``load_in_4bit`` quantises the frozen base as ``quantization`` says (default QLoRA's NF4) on
    CUDA; without CUDA it says so and loads the plain model."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    quantization = quantization or QuantizationSettings()
    quantization.check()
    name, adapter_path = split_adapter(name, adapter_path)
    config = load_config(name)
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    kwargs = {"dtype": DTYPES[dtype]}
    four_bit = load_in_4bit and can_load_in_4bit()
    if four_bit:
        kwargs.update(quantization_kwargs(dtype, quantization, device_index))
    elif load_in_4bit:
        logger.warning("no CUDA device: 4-bit quantisation is off, '%s' loads in %s (plain LoRA)", name, dtype)
    try:
        model = cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model from '{name}': {str(exc).splitlines()[0]}") from None
    if four_bit and trainable and quantization.prepare_kbit_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if adapter_path:
        from peft import PeftModel

        _check_local_or_hub(adapter_path)
        try:
            model = PeftModel.from_pretrained(model, adapter_path, is_trainable=trainable)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the adapter from '{adapter_path}': {str(exc).splitlines()[0]}") from None
    elif lora is not None and lora.enabled:
        model = add_lora(model, lora)
    return model


def numerics_key(config, kernel: str | None = None, packing: str | bool | None = None,
                 max_resp_length: int | None = None) -> dict:
    """Everything that changes the starting model's numbers, for the keys of the caches of its outputs
    (reference log-probs, prompt states, generations). ``config``: a run's settings with ``model_name,
    adapter_path, tokenizer_name, max_prompt_length, dtype, lora, load_in_4bit, quantization``;
    ``kernel`` and ``packing``: the log-prob kernel and batch layout a scoring pass uses (None for
    generation, which uses neither). Keyed on the numerics actually used: 4-bit and its settings only
    where the base is quantised (on a machine without CUDA ``load_in_4bit`` loads the plain model).
    Not keyed, as they leave the numbers unchanged: a new LoRA adapter (B = 0; its effect on the
    base's load dtype is keyed), dropout (these passes run in eval mode), gradient checkpointing
    (active only when gradients are taken). ``tokenization``: the version of the rules that turn records
    into ids (:data:`lolrl.engine.collation.TOKENIZATION`)."""
    four_bit = config.load_in_4bit and can_load_in_4bit()
    key = {"model": model_identity(config.model_name),
           "adapter": config.adapter_path and model_identity(config.adapter_path),
           "tokenizer": config.tokenizer_name and model_identity(config.tokenizer_name),
           "max_prompt_length": config.max_prompt_length, "max_resp_length": max_resp_length,
           "dtype": config.dtype, "tokenization": TOKENIZATION,
           "base_dtype": base_load_dtype(config.dtype, config.lora, config.adapter_path, config.load_in_4bit),
           "4bit": four_bit and {k: str(v) for k, v in bnb_4bit_kwargs(config.quantization, config.dtype).items()},
           "kbit_prepared": four_bit and config.quantization.prepare_kbit_training}
    if kernel is not None:
        key["logprob_kernel"] = kernel
    if packing is not None:
        key["packing"] = packing
    return key


def add_lora(model, lora: LoraSettings):
    from peft import LoraConfig, TaskType, get_peft_model

    task = TaskType.SEQ_2_SEQ_LM if model.config.is_encoder_decoder else TaskType.CAUSAL_LM
    targets = [t.strip() for t in lora.target_modules.split(",")] if lora.target_modules else None
    if targets is None and model.config.model_type == "gpt2":
        targets = ["c_attn", "c_proj"]  # peft has no default for some small test configs
    config = LoraConfig(task_type=task, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=targets)
    return get_peft_model(model, config)


def set_dropout(model: torch.nn.Module, p: float | None) -> None:
    """Set every dropout probability to ``p`` (``None`` leaves them): the ``nn.Dropout`` modules (LoRA's
    included) and the attention dropout that Llama-style attention reads from a float attribute."""
    if p is None:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        elif isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p



def model_is_encoder_decoder(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def _model_inputs(batch: dict) -> dict:
    """The keys the model takes; a packed batch has position ids and no attention mask, and for a
    varlen kernel the row boundaries (``max_length_q/k`` as Python ints, as flash attention takes them)."""
    keys = ("input_ids", "attention_mask", "position_ids", "decoder_input_ids", "decoder_attention_mask",
            "cu_seq_lens_q", "cu_seq_lens_k")
    inputs = {k: batch[k] for k in keys if k in batch}
    inputs.update({k: int(batch[k]) for k in ("max_length_q", "max_length_k") if k in batch})
    return inputs


# ------------------------------------------------------------------ log-probs without full logits
LOGPROB_CHUNK_TOKENS = 1024  # scored tokens per pass of the output layer: one [chunk, vocab] block at a time


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward applies to ``lm_head``'s output: ``logits * scale / divide``, then
    ``tanh(logits / softcap) * softcap`` (each None when the model has none)."""
    scale: float | None = None
    divide: float | None = None
    softcap: float | None = None

    @property
    def factor(self) -> float | None:
        """The linear part, ``scale / divide`` (None: 1)."""
        if not (self.scale or self.divide):
            return None
        return (self.scale or 1.0) / (self.divide or 1.0)

    def __call__(self, logits):
        if self.factor is not None:
            logits = logits * self.factor
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_transform(config) -> LogitTransform | None:
    """What the model's forward applies to ``lm_head``'s output before returning logits (Gemma's
    soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``); None when nothing."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None) if config.model_type.startswith("cohere") else None
    divide = getattr(config, "logits_scaling", None) if config.model_type.startswith("granite") else None
    if not (softcap or scale or divide):
        return None
    return LogitTransform(scale=scale or None, divide=divide or None, softcap=softcap or None)


LOGPROB_KERNELS = ("auto", "liger", "chunked")
LOGPROB_KERNEL_HELP = ("the output layer's log-probs: auto = Liger's fused linear cross-entropy when liger-kernel is "
                       "installed and the run is on CUDA, else the output layer in chunks; liger insists (refused, "
                       "saying why, when it cannot); chunked")


def check_logprob_kernel(mode: str) -> None:
    if mode not in LOGPROB_KERNELS:
        raise ConfigError(f"--logprob_kernel must be one of {', '.join(LOGPROB_KERNELS)}, got '{mode}'")


def choose_logprob_kernel(model, mode: str, device, sharded: bool = False) -> tuple[str, str]:
    """``(kernel, why)`` for the output layer's log-probs: ``liger`` (Liger's fused linear cross-entropy,
    :mod:`lolrl.engine.liger`) or ``chunked`` (:func:`head_logprobs`). ``auto`` takes Liger when it is
    installed, the run is on CUDA and the output layer is a plain, unsharded Linear; ``liger`` insists
    (refused, naming why, when it cannot; on the CPU only under ``TRITON_INTERPRET=1``)."""
    check_logprob_kernel(mode)
    if mode == "chunked":
        return "chunked", "as asked"
    inner = unwrap(model)
    reason = liger.refusal(inner.get_output_embeddings(), logit_transform(inner.config), torch.device(device),
                           sharded=sharded, interpreter=mode == "liger")
    if reason is None:
        return "liger", "Liger's fused linear cross-entropy"
    if mode == "liger":
        raise ConfigError(f"--logprob_kernel liger: {reason}")
    return "chunked", f"Liger not used: {reason}"


def enable_activation_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward (transformers' non-reentrant checkpointing),
    with inputs that require gradients so a frozen base (LoRA) still passes them to the adapters."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # transformers 5 names it activation_checkpointing_enable; the older name warns there
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def unwrap(model):
    """The transformers model inside a DDP / torch.compile wrapper (whose forward the caller still uses)."""
    while not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


class _OutputLayerInput:
    """Context manager: the model's output layer (``lm_head``) sees a zero-length sequence, so the
    forward computes no [tokens, vocab] logits; the hidden states it would have seen (after the final
    norm, and T5's rescaling) are kept in ``hidden``. The output layer itself stays in place (LoRA on
    it, quantised weights, DDP hooks all keep working) and is applied later, chunk by chunk."""

    def __init__(self, model):
        self.layer = unwrap(model).get_output_embeddings()
        if self.layer is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
        self.hidden = None

    def _hook(self, module, args):
        self.hidden = args[0]
        return (args[0][..., :0, :],) + tuple(args[1:])

    def __enter__(self):
        self._handle = self.layer.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def _chunk_statistics(layer, transform, hidden, targets, with_entropy: bool):
    logits = layer(hidden)
    if transform is not None:
        logits = transform(logits)
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logprobs, None
    return logprobs, lse - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def head_logprobs(layer, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = LOGPROB_CHUNK_TOKENS,
                  transform=None, with_entropy: bool = False, kernel: str = "chunked"):
    """log-softmax(layer(hidden))[targets] for ``hidden`` [N, H], ``chunk_size`` rows at a time.

    With gradients, each chunk runs under activation checkpointing: the forward keeps only the
    chunk's input, the backward recomputes that chunk's logits, so no [tokens, vocab] tensor larger
    than one chunk lives at once in either pass. Returns ``(logprobs [N], entropy [N] or None)``.
    ``kernel="liger"`` computes the log-probs with Liger's fused kernel instead (no entropy there)."""
    if kernel not in ("chunked", "liger"):
        raise ValueError(f"kernel must be chunked or liger (choose_logprob_kernel resolves auto), got '{kernel}'")
    if kernel == "liger":
        if with_entropy:
            raise ValueError("Liger's fused kernel gives log-probs only, not the entropy")
        reason = liger.refusal(layer, transform, hidden.device, interpreter=True)
        if reason is not None:
            raise ConfigError(f"--logprob_kernel liger: {reason}")
        return liger.logprobs(layer, hidden, targets, transform), None
    if chunk_size <= 0:
        chunk_size = max(1, hidden.shape[0])
    checkpointed = torch.is_grad_enabled() and (hidden.requires_grad or any(
        p.requires_grad for p in layer.parameters()))
    logprobs, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (layer, transform, hidden[start:start + chunk_size], targets[start:start + chunk_size], with_entropy)
        if checkpointed:
            from torch.utils.checkpoint import checkpoint

            lp, ent = checkpoint(_chunk_statistics, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_statistics(*args)
        logprobs.append(lp)
        entropies.append(ent)
    if not logprobs:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    return torch.cat(logprobs), (torch.cat(entropies) if with_entropy else None)


@dataclass
class ResponseOutputs:
    """Per-row outputs of :func:`response_outputs`, each ``[rows, longest response]`` (0 past a row's end)."""
    logprobs: torch.Tensor
    mask: torch.Tensor
    prompt_states: list[torch.Tensor] | None = None  # each row's [prompt length, hidden]
    entropy: torch.Tensor | None = None  # of the policy's distribution at each response token
    scored_hidden: torch.Tensor | None = None  # last-layer states predicting each response token


def pad_rows(flat: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Split a flat per-token tensor into rows of ``lengths`` and right-pad them with 0."""
    return torch.nn.utils.rnn.pad_sequence(list(torch.split(flat, lengths)), batch_first=True)


def response_outputs(model, batch: dict, prompt_states: bool = False, entropy: bool = False,
                     scored_hidden: bool = False, chunk_size: int = LOGPROB_CHUNK_TOKENS,
                     kernel: str = "chunked") -> ResponseOutputs:
    """log pi(y_t | x, y_<t) of every response token, per row, whatever the batch layout.

    ``batch`` comes from :class:`lolrl.engine.collation.Collator`: padded rows or one packed sequence.
    The output layer runs only on the scored positions (each response token's predecessor), in
    chunks of ``chunk_size`` tokens (:func:`head_logprobs`); ``chunk_size=0`` is the plain path that
    computes the model's full [batch, length, vocab] logits (kept as the reference in the tests).
    ``prompt_states`` adds each row's last-layer prompt states (decoder-only: the prompt positions;
    seq2seq: the encoder output); ``scored_hidden`` the last-layer states at the scored positions.
    ``kernel``: ``chunked`` or ``liger`` (:func:`choose_logprob_kernel`) for the output layer."""
    encoder_decoder = "decoder_input_ids" in batch
    target_mask = batch["target_mask"].bool()
    target = batch["target_ids"][target_mask]
    lengths = batch["response_lengths"].tolist()
    if chunk_size > 0:
        with _OutputLayerInput(model) as captured:
            out = model(**_model_inputs(batch), use_cache=False)
        hidden = captured.hidden if encoder_decoder else captured.hidden[:, :-1]  # t predicts t+1
        transform = logit_transform(unwrap(model).config)
        flat, flat_entropy = head_logprobs(captured.layer, hidden[target_mask], target, chunk_size, transform, entropy,
                                           kernel)
        last = captured.hidden
    else:
        out = model(**_model_inputs(batch), use_cache=False, output_hidden_states=True)
        logits = out.logits if encoder_decoder else out.logits[:, :-1]
        selected = logits[target_mask].float()
        lse = torch.logsumexp(selected, dim=-1)
        flat = selected.gather(-1, target[:, None]).squeeze(-1) - lse
        flat_entropy = lse - (torch.softmax(selected, dim=-1) * selected).sum(dim=-1) if entropy else None
        last = out.decoder_hidden_states[-1] if encoder_decoder else out.hidden_states[-1]
    logprobs = pad_rows(flat, lengths)
    mask = (torch.arange(logprobs.shape[1], device=flat.device)[None, :] < batch["response_lengths"][:, None])
    result = ResponseOutputs(logprobs, mask.to(logprobs.dtype))
    if entropy:
        result.entropy = pad_rows(flat_entropy, lengths)
    if scored_hidden:
        result.scored_hidden = (last if encoder_decoder else last[:, :-1])[target_mask]
    if prompt_states:
        if encoder_decoder:
            states, state_mask = out.encoder_last_hidden_state, batch["attention_mask"]
        else:
            states, state_mask = last, batch["prompt_mask"]
        result.prompt_states = list(torch.split(states[state_mask.bool()], batch["prompt_lengths"].tolist()))
    return result


def response_logprobs(model, batch: dict, return_prompt_states: bool = False,
                      chunk_size: int = LOGPROB_CHUNK_TOKENS, kernel: str = "chunked"):
    """``(logprobs, mask, prompt states or None)`` of :func:`response_outputs`: the training loss's view.
    Memory is O(chunk x vocab) for the output layer, never O(batch x length x vocab)."""
    out = response_outputs(model, batch, prompt_states=return_prompt_states, chunk_size=chunk_size, kernel=kernel)
    return out.logprobs, out.mask, out.prompt_states


@torch.no_grad()
def last_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The last-layer states ([B, L, H]) of a decoder-only model or of a seq2seq model's encoder,
    without the output layer (no logits are computed)."""
    if getattr(unwrap(model).config, "is_encoder_decoder", False):
        return unwrap(model).get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    with _OutputLayerInput(model) as captured:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return captured.hidden


@torch.no_grad()
def packing_is_exact(model, rows, pad_token_id: int, tolerance: float = 1e-4, layout: str = "positions") -> bool:
    """Whether this model honours packed sequences (``layout``: ``positions``, position ids restarting
    per row and no mask; ``varlen``, plus ``cu_seq_lens_q/k`` and ``max_length_q/k``): the log-probs of
    ``rows`` packed must equal their padded log-probs. Checked on the real model, so a model whose
    attention ignores the packing silently gets padded batches instead."""
    if getattr(model.config, "is_encoder_decoder", False) or len(rows) < 2:
        return False
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        batches = [{k: v.to(device) for k, v in Collator(pad_token_id, False, pack=pack)(rows).items()}
                   for pack in (False, layout)]
        (padded, mask, _), (packed, _, _) = (response_logprobs(model, b) for b in batches)
        exact = bool(((padded - packed).abs() * mask).max() <= tolerance)
    except (RuntimeError, ValueError, TypeError):  # a model that rejects position_ids without a mask
        exact = False
    finally:
        model.train(was_training)
    return exact


VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4", "kernels-community/flash-attn",
                    "kernels-community/flash-attn2", "kernels-community/flash-attn3",
                    "kernels-community/vllm-flash-attn3", "kernels-community/flash-attn4")


def has_varlen_attention(model) -> bool:
    """Whether the model's attention is a variable-length kernel (flash attention 2/3/4, or one of
    transformers' kernels integration): it takes ``cu_seq_lens_q/k`` and never sees a pad."""
    impl = getattr(model.config, "_attn_implementation", None) or ""
    return impl in VARLEN_ATTENTION or "flash" in impl.split("|")[-1]  # "paged|flash_attention_2", hub kernels


def choose_packing(model, probe_rows, pad_token_id: int, mode: str = "auto",
                   tolerance: float = 1e-4) -> str | bool:
    """Pack a batch's rows into one sequence, or pad them (grouped by length)? Returns the
    :class:`~lolrl.engine.collation.Collator` layout: ``"varlen"``, ``"positions"`` or ``False``.

    Packing removes every pad token, but the attention then costs O(total tokens^2) unless the
    kernel handles variable-length rows (flash attention); with eager/SDPA attention a packed
    batch is slower than a length-grouped one (measured: bench/throughput.py). ``auto`` packs only
    with such a kernel (``varlen``: the rows' boundaries passed as ``cu_seq_lens``), and only when
    packed log-probs provably equal padded ones on this model; ``on`` packs whenever they are
    equal; ``off`` never packs."""
    if mode == "off" or getattr(model.config, "is_encoder_decoder", False):
        return False
    varlen = has_varlen_attention(model)
    if mode == "auto" and not varlen:
        return False
    layout = "varlen" if varlen else "positions"
    return layout if packing_is_exact(model, probe_rows, pad_token_id, tolerance, layout) else False


__all__ = ["LoraSettings", "QuantizationSettings", "bnb_4bit_kwargs", "numerics_key", "ModelLoadError", "load_model",
           "load_tokenizer", "load_config", "is_encoder_decoder",
           "response_logprobs", "response_outputs", "ResponseOutputs", "head_logprobs", "last_hidden_states",
           "pad_rows", "LOGPROB_CHUNK_TOKENS", "packing_is_exact", "choose_packing", "has_varlen_attention",
           "set_dropout", "add_lora", "DTYPES"]

"""The chunked output layer: the same log-probs and gradients as full logits, in bounded memory."""
import pytest
import torch
from logprob_cases import CHUNK
from logprob_cases import logprobs_and_grads as _logprobs_and_grads
from logprob_cases import setup as _setup
from torch.utils._python_dispatch import TorchDispatchMode

from lolrl.engine.modeling import head_logprobs, last_hidden_states, response_outputs


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("kind", ["causal", "llama", "seq2seq"])
def test_chunked_logprobs_and_gradients_equal_full_logits(tiny_models, kind, lora):
    model, batch = _setup(tiny_models, kind, lora)
    full, full_grads = _logprobs_and_grads(model, batch, chunk_size=0)
    chunked, chunked_grads = _logprobs_and_grads(model, batch, chunk_size=CHUNK)
    assert int(batch["target_mask"].sum()) > 3 * CHUNK  # several chunks
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)
    assert full_grads and full_grads.keys() == chunked_grads.keys()
    assert all("lora" in n for n in full_grads) == lora
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["causal", "llama"])
def test_entropy_states_and_scored_hidden_equal_full_logits(tiny_models, kind):
    model, batch = _setup(tiny_models, kind, False)
    with torch.no_grad():
        full = response_outputs(model, batch, True, True, True, chunk_size=0)
        chunked = response_outputs(model, batch, True, True, True, chunk_size=CHUNK)
        states = last_hidden_states(model, batch["input_ids"], batch["attention_mask"])
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(chunked.entropy, full.entropy, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.scored_hidden, full.scored_hidden, atol=1e-6, rtol=0)
    for a, b in zip(chunked.prompt_states, full.prompt_states):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(states, reference, atol=1e-6, rtol=0)


def test_head_logprobs_matches_log_softmax():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 50)
    hidden, targets = torch.randn(11, 8), torch.randint(0, 50, (11,))
    expected = layer(hidden).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    logprobs, _ = head_logprobs(layer, hidden, targets, chunk_size=3)
    torch.testing.assert_close(logprobs, expected, atol=1e-6, rtol=0)


class _VocabTensors(TorchDispatchMode):
    """Records the largest tensor with a vocabulary-sized dimension that any op creates."""

    def __init__(self, vocab, exclude):
        super().__init__()
        self.vocab, self.exclude, self.largest = vocab, exclude, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and self.vocab in t.shape and tuple(t.shape) not in self.exclude:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_no_tensor_larger_than_one_chunk_of_logits(tiny_models, kind):
    """Forward and backward: the chunked path never creates a [tokens, vocab] tensor above one chunk;
    the full-logits path does (so the probe can fail)."""
    model, batch = _setup(tiny_models, kind, False)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    weight_shapes = {(vocab, hidden), (hidden, vocab)}  # the embedding / output weight and their gradients
    sizes = {}
    for chunk_size in (0, CHUNK):
        model.zero_grad(set_to_none=True)
        with _VocabTensors(vocab, weight_shapes) as probe:
            out = response_outputs(model, batch, chunk_size=chunk_size)
            (out.logprobs * out.mask).sum().backward()
        sizes[chunk_size] = probe.largest
    assert 0 < sizes[CHUNK] <= CHUNK * vocab
    assert sizes[0] >= batch["input_ids"].shape[0] * 8 * vocab  # full logits: batch x length x vocab


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_checkpointing_gives_the_same_gradients(tiny_models, lora):
    """--gradient_checkpointing recomputes activations in the backward; with a frozen base (LoRA) the
    adapters must still get their gradients, equal to those without checkpointing."""
    from lolrl.engine.modeling import enable_activation_checkpointing

    model, batch = _setup(tiny_models, "llama", lora)
    model.train()  # checkpointing is active in train mode only; the tiny Llama has no dropout
    plain_lp, plain = _logprobs_and_grads(model, batch, chunk_size=CHUNK)
    enable_activation_checkpointing(model)
    assert model.is_activation_checkpointing
    again_lp, again = _logprobs_and_grads(model, batch, chunk_size=CHUNK)
    torch.testing.assert_close(again_lp, plain_lp, atol=1e-6, rtol=0)
    assert plain and plain.keys() == again.keys() and all("lora" in n for n in plain) == lora
    for name, grad in plain.items():
        torch.testing.assert_close(again[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_the_training_loss_holds_at_most_one_small_chunk_of_logits(tmp_path, tiny_models, toy_dir):
    """The training step's output layer runs TRAIN_LOGPROB_CHUNK_TOKENS scored tokens at a time (its backward
    holds a chunk's logits, softmax and gradient at once; 1024 tokens put the training step's peak memory
    above TRL's padding-free SFT on the GPT-2 benchmark): no [tokens, vocab] tensor above one such chunk in the
    forward or the backward, and the loss of the passes without gradient's chunking."""
    from lolrl.engine.collation import TokenizedRow
    from lolrl.engine.config import OfflineRLConfig
    from lolrl.engine.data import load_task_dir
    from lolrl.engine.trainer import TRAIN_LOGPROB_CHUNK_TOKENS, OfflineRLTrainer

    config = OfflineRLConfig(model_name=tiny_models["causal"], output_dir=str(tmp_path / "run"), algorithm="nll",
                             packing="off")
    trainer = OfflineRLTrainer(args=config, data=load_task_dir(toy_dir))
    model = trainer.model
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    rows = [TokenizedRow(i, torch.randint(5, vocab, (7,), generator=g).tolist(),
                         torch.randint(5, vocab, (100,), generator=g).tolist()) for i in range(4)]
    batch = trainer.collator(rows)
    assert int(batch["target_mask"].sum()) > 1.5 * TRAIN_LOGPROB_CHUNK_TOKENS
    with _VocabTensors(vocab, {(vocab, hidden), (hidden, vocab)}) as probe:
        loss = trainer.compute_loss(model, batch)
        loss.backward()
    assert 0 < probe.largest <= TRAIN_LOGPROB_CHUNK_TOKENS * vocab
    with torch.no_grad():
        out = response_outputs(model, batch, chunk_size=1024)
    expected = -(out.logprobs * out.mask).sum(-1).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)

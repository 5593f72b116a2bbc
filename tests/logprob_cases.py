"""Shared by tests/engine/test_logprobs.py and tests/engine/test_liger.py: three records of very different
lengths, a tiny model (full or LoRA) with their batch, and log-probs with every parameter's gradient."""
import torch

from lolrl.engine.collation import Collator, Tokenizer
from lolrl.engine.data import Record
from lolrl.engine.modeling import LoraSettings, load_model, load_tokenizer, response_outputs

RECORDS = [
    Record("a", "user: tell me about cats\nbot:", "sure i am glad to help with cats", 1.0),
    Record("b", "user: tell me about a very long and winding river of stars and trains\nbot:", "no", 0.0),
    Record("c", "hi", "please enjoy music you are welcome kind regards and thanks", 0.5),
]
CHUNK = 4


def setup(tiny_models, kind, lora):
    tokenizer = load_tokenizer(tiny_models[kind])
    settings = LoraSettings(r=4, dropout=0.0, target_modules="q,v" if kind == "seq2seq" else None) if lora else None
    if lora and kind == "llama":
        settings.target_modules = "q_proj,v_proj"
    model = load_model(tiny_models[kind], lora=settings).eval()  # eval: no dropout, gradients still on
    if lora:  # a non-zero adapter, so its gradients are not trivially equal
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
    encdec = kind == "seq2seq"
    rows = Tokenizer(tokenizer, encdec, 64, 32)(RECORDS)
    collator = Collator(tokenizer.pad_token_id, encdec, model.config.decoder_start_token_id if encdec else None)
    return model, collator(rows)


def logprobs_and_grads(model, batch, chunk_size, kernel="chunked", lowest_weight=0.5):
    """Log-probs, and every parameter's gradient of their sum weighted from ``lowest_weight`` to 1.5."""
    model.zero_grad(set_to_none=True)
    out = response_outputs(model, batch, chunk_size=chunk_size, kernel=kernel)
    weights = torch.linspace(lowest_weight, 1.5, out.logprobs.numel()).view_as(out.logprobs)
    (out.logprobs * out.mask * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logprobs.detach(), grads

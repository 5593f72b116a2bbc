"""Convert the Keras COMET critic (Symbolic Knowledge Distillation) to a RoBERTa folder + head in safetensors.

The Keras model is ``input ids -> TFRobertaMainLayer (pooler_output) -> Dropout -> Dense(512, gelu)
-> Dropout -> Dense(1, sigmoid)``. Its weights carry TF-RoBERTa names, e.g.
``roberta/encoder/layer_._0/attention/self/query/kernel:0``, and the head's are
``dense/kernel:0`` (1024 x 512), ``dense/bias:0``, ``dense_1/kernel:0`` (512 x 1), ``dense_1/bias:0``.

Name mapping (each TF name -> PyTorch ``RobertaModel`` name): the scopes before ``embeddings`` /
``encoder`` / ``pooler`` are dropped, ``_._`` becomes ``.``, ``/`` becomes ``.``, and the last part
``kernel`` -> ``weight`` (transposed: TF stores Dense kernels as in x out), ``gamma`` -> ``weight``,
``beta`` -> ``bias``, ``embeddings`` -> ``weight``; ``weight`` / ``bias`` stay. The head's kernels are
transposed too and saved as ``dense.*`` / ``out_proj.*`` (:class:`lolrl.tasks.paper.rewards.CometCriticHead`).
Every parameter of the PyTorch model must be filled exactly once with the right shape, or the
conversion stops with the names that do not fit.

Weights are read from a ``.npz`` file (name -> array), a Keras ``.h5`` file (needs h5py) or a
Keras SavedModel folder (needs TensorFlow, an optional extra used only here; ``--dump_npz`` writes
the ``.npz`` so the conversion itself can run where TensorFlow is not installed).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lolrl.utils.cli import DataclassParser, setting
from lolrl.utils.errors import UserError, report_user_error
from lolrl.utils.io import atomic_write_json

ANCHORS = ("embeddings", "encoder", "pooler")
HEAD_LAYERS = {"dense": "dense", "dense_1": "out_proj"}
LAST_PART = {"kernel": ("weight", True), "gamma": ("weight", False), "beta": ("bias", False),
             "embeddings": ("weight", False), "weight": ("weight", False), "bias": ("bias", False)}
ORIGINAL_KERAS_DIR = ("data/symbolic_knowledge_distillation/original_from_paper/"
                      "model~model=roberta-large-mnli~lr=5e-06~bs=128~dropout=0.10~original_from_paper")


class ConversionError(UserError):
    """The weights do not fit the PyTorch model; the message names the weights."""


def tf_to_pt_name(tf_name: str) -> tuple[str, str, bool]:
    """TF weight name -> (``"encoder"`` or ``"head"``, PyTorch name, transpose?)."""
    parts = [p for p in tf_name.split(":")[0].split("/") if p]
    if len(parts) < 2 or parts[-1] not in LAST_PART:
        raise ConversionError(f"cannot map weight {tf_name!r} (expected .../kernel, bias, gamma, beta, "
                              "embeddings or weight)")
    last, transpose = LAST_PART[parts[-1]]
    anchor = next((i for i, p in enumerate(parts) if p in ANCHORS), None)
    if anchor is None:
        if parts[-2] not in HEAD_LAYERS:
            raise ConversionError(f"weight {tf_name!r} is neither RoBERTa's (no embeddings/encoder/pooler scope) "
                                  "nor the head's (dense, dense_1)")
        return "head", f"{HEAD_LAYERS[parts[-2]]}.{last}", transpose
    scopes = [p.replace("_._", ".") for p in parts[anchor:-1]]
    return "encoder", ".".join(scopes + [last]), transpose


def convert_weights(named: list[tuple[str, np.ndarray]], encoder_shapes: dict[str, tuple[int, ...]]
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[dict]]:
    """Map and transpose every weight; check the encoder against ``encoder_shapes`` (name -> shape of
    every parameter of the PyTorch model). Returns (encoder state, head state, mapping report)."""
    encoder, head, report = {}, {}, []
    for tf_name, value in named:
        part, pt_name, transpose = tf_to_pt_name(tf_name)
        array = np.asarray(value)
        if transpose:
            array = array.T
        target = encoder if part == "encoder" else head
        if pt_name in target:
            raise ConversionError(f"two weights map to {pt_name!r} (the second is {tf_name!r})")
        target[pt_name] = np.ascontiguousarray(array)
        report.append({"keras": tf_name, "pytorch": f"{part}:{pt_name}", "transposed": transpose,
                       "shape": list(array.shape)})
    missing = sorted(set(encoder_shapes) - set(encoder))
    extra = sorted(set(encoder) - set(encoder_shapes))
    if missing or extra:
        raise ConversionError(f"weights do not match the RoBERTa model: missing {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                              f"{' ...' if len(extra) > 5 else ''}")
    for name, shape in encoder_shapes.items():
        if tuple(encoder[name].shape) != tuple(shape):
            raise ConversionError(f"{name}: converted shape {tuple(encoder[name].shape)} != model shape {tuple(shape)}")
    needed = {"dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"}
    if set(head) != needed:
        raise ConversionError(f"head weights {sorted(head)} != {sorted(needed)}")
    if head["dense.weight"].ndim != 2 or head["out_proj.weight"].shape[0] != 1 \
            or head["out_proj.weight"].shape[1] != head["dense.weight"].shape[0]:
        raise ConversionError(f"head shapes do not chain: dense {head['dense.weight'].shape}, "
                              f"out_proj {head['out_proj.weight'].shape}")
    return encoder, head, report


def load_keras_weights(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """(name, array) pairs from a .npz, a Keras .h5 (h5py) or a SavedModel folder (TensorFlow)."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            return [(name, data[name]) for name in data.files]
    if path.suffix in (".h5", ".hdf5", ".keras"):
        try:
            import h5py
        except ImportError:
            raise ConversionError("reading a .h5 file needs h5py (pip install h5py)") from None
        named = []
        with h5py.File(path, "r") as handle:
            root = handle.get("model_weights", handle)
            root.visititems(lambda name, obj: named.append((name, obj[()])) if isinstance(obj, h5py.Dataset) else None)
        return named
    if not path.exists():
        raise ConversionError(f"{str(path)!r} does not exist")
    try:
        import tensorflow as tf
    except ImportError:
        raise ConversionError("reading a Keras SavedModel folder needs TensorFlow (an optional extra: pip install "
                              "tensorflow), or export it once with --dump_npz where TensorFlow is installed") from None
    loaded = tf.saved_model.load(str(path))
    variables = getattr(loaded, "variables", None) or getattr(loaded, "trainable_variables", [])
    return [(v.name, v.numpy()) for v in variables]


def convert(keras_weights: str | Path, output_dir: str | Path, config_name: str, tokenizer_name: str | None) -> dict:
    """Write ``output_dir`` = RoBERTa (config + model.safetensors + tokenizer) and the head's safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, RobertaModel

    from lolrl.tasks.paper.rewards import COMET_HEAD_FILE

    config = AutoConfig.from_pretrained(config_name)
    config.num_labels = 1
    model = RobertaModel(config, add_pooling_layer=True)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    encoder, head, report = convert_weights(load_keras_weights(keras_weights), shapes)
    # convert_weights matched every parameter by name and shape; buffers keep the model's own values
    model.load_state_dict({**model.state_dict(), **{k: torch.from_numpy(v.astype(np.float32))
                                                     for k, v in encoder.items()}})
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir), safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_name or config_name).save_pretrained(str(output_dir))
    save_file({k: torch.from_numpy(v.astype(np.float32)) for k, v in head.items()}, str(output_dir / COMET_HEAD_FILE))
    summary = {"keras_weights": str(keras_weights), "config": config_name, "encoder_tensors": len(encoder),
               "transposed": sum(r["transposed"] for r in report), "mapping": report}
    atomic_write_json(output_dir / "conversion_report.json", summary)
    return summary


@dataclass
class ConvertArguments:
    """convert_keras_roberta_to_huggingface.py (the original hard-coded these paths; lolrl's flags)."""

    keras_model: str = setting(ORIGINAL_KERAS_DIR, "Keras SavedModel folder (TensorFlow), .h5 (h5py) or .npz of "
                                                   "name -> array", aliases=["-i"])
    output_dir: str = setting("saved_models/comet_critic_keras_to_pytorch", "the RoBERTa folder and head written",
                              aliases=["-o"])
    roberta_config: str = setting("roberta-large-mnli", "RoBERTa config: hub id or folder")
    tokenizer: str | None = setting(None, "tokenizer saved beside the model (default: --roberta_config)")
    dump_npz: str | None = setting(None, "only export the Keras weights to this .npz and stop")


def build_parser():
    return DataclassParser(ConvertArguments, description="Convert the Keras COMET critic to a Hugging Face "
                           "RoBERTa folder plus its head (custom_roberta_classification_head.safetensors)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_one(argv)
    try:
        if args.dump_npz:
            named = load_keras_weights(args.keras_model)
            np.savez(args.dump_npz, **dict(named))
            print(f"wrote {len(named)} weights to {args.dump_npz}")
            return 0
        summary = convert(args.keras_model, args.output_dir, args.roberta_config, args.tokenizer)
    except UserError as exc:
        return report_user_error(exc)
    print(json.dumps({k: v for k, v in summary.items() if k != "mapping"}))
    print(f"saved the critic to {Path(args.output_dir).resolve()}")
    return 0

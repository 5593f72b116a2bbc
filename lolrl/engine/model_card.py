"""The saved model's card (``README.md``) and its upload to the Hugging Face Hub, as TRL's trainers do.

A trainer calls :func:`write_card` when it saves a best model (what is known then: the best
validation measure and its step, read from ``best.json``) and again at the end of the run (with the
final validation and test metrics), and :func:`push_folder` at the end of a successful run with
``--push_to_hub``. The card is YAML front matter (``base_model``, ``library_name``, ``tags``, as
``huggingface_hub.ModelCard`` reads it) and Markdown: the base model, the algorithm and the settings
that decide it, the data (task, rows per split, the training data's digest; never a path of the
user's machine), the metrics, the command line, the library versions and the A-LoL paper's citation.
The card is text beside the weights: nothing verifies or loads it (checkpoints carry their own
manifests, in their own folders).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
from dataclasses import dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from lolrl.engine.reports import format_markdown_table
from lolrl.utils.cli import setting
from lolrl.utils.errors import ConfigError, UserError
from lolrl.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

CARD = "README.md"
TOKEN_SHOWN = "<HUB_TOKEN>"  # what the card, args.json and the trackers show for --hub_token (as TrainingArguments)
PAPER = "Leftover Lunch: Advantage-based Offline Reinforcement Learning for Language Models"
CITATION = """@inproceedings{baheti2024leftover,
  title     = {Leftover Lunch: Advantage-based Offline Reinforcement Learning for Language Models},
  author    = {Baheti, Ashutosh and Lu, Ximing and Brahman, Faeze and Le Bras, Ronan and Sap, Maarten and Riedl, Mark},
  booktitle = {The Twelfth International Conference on Learning Representations (ICLR)},
  year      = {2024}
}"""


def hub_offline() -> bool:
    """Whether the hub is switched off for this process (huggingface_hub's own rule)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE")


@dataclass(kw_only=True)  # a mixin of the scripts' settings, whose own fields may have no default
class HubSettings:
    """Upload of the saved model to the Hugging Face Hub (TrainingArguments' names)."""

    push_to_hub: bool = setting(False, "at the end of a successful training run, upload the save folder (model or "
                                       "adapter, tokenizer, README.md model card) to the Hugging Face Hub; refused "
                                       "when HF_HUB_OFFLINE is set")
    hub_model_id: str | None = setting(None, "the hub repository: 'user/name', 'org/name' or 'name' (in the token's "
                                             "namespace); none: the output folder's name")
    hub_token: str | None = setting(None, "hub token (none: HF_TOKEN or the one `hf auth login` stored); never "
                                          "written to args.json, the card or the trackers")
    hub_private_repo: bool | None = setting(None, "create the repository private (none: the hub's default for the "
                                                  "account)")

    @classmethod
    def of(cls, settings) -> HubSettings:
        """The hub fields of ``settings`` (a script's arguments, which inherit these flags)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    def check(self) -> None:
        """Up front, before anything trains: an upload that cannot happen is refused."""
        if self.push_to_hub and hub_offline():
            raise ConfigError("--push_to_hub uploads to the Hugging Face Hub, but HF_HUB_OFFLINE is set: unset it, "
                              "or leave --push_to_hub out (and upload the save folder later)")

    def shown(self) -> dict:
        """The settings as args.json and the trackers record them: the token hidden."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if values["hub_token"] is not None:
            values["hub_token"] = TOKEN_SHOWN
        return values


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran (``sys.argv``), shell-quoted, its script by name and any hub token hidden."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        argv[0] = Path(argv[0]).name
    shown = []
    for i, word in enumerate(argv):
        if i and argv[i - 1] == "--hub_token":
            word = TOKEN_SHOWN
        elif word.startswith("--hub_token="):
            word = f"--hub_token={TOKEN_SHOWN}"
        shown.append(word)
    return shlex.join(shown)


def package_versions(*names: str) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def is_local(name: str | None) -> bool:
    return name is not None and (os.path.exists(os.path.expanduser(name)) or name.startswith((".", "/", "~")))


def model_label(name: str) -> str:
    """A hub id as is; a local folder by its name only (no path of the user's machine)."""
    return f"a local model (folder `{Path(name).name}`)" if is_local(name) else f"[{name}](https://huggingface.co/{name})"


@dataclass
class CardContents:
    """What one saved model's card says (every trainer fills one: the offline trainer, PPO)."""

    base_model: str  # the starting model (an adapter's base): hub id or local path
    algorithm: str
    trainer: str  # e.g. "lolrl's OfflineRLTrainer"
    settings: dict[str, Any]  # the settings that decide the result, in the card's order
    adapter: bool = False  # the folder holds a LoRA adapter, not full weights
    start_adapter: str | None = None  # the adapter training started from (and pi_ref's), if any
    task: str | None = None
    rows: dict[str, int] = field(default_factory=dict)  # split -> rows
    data_digest: str | None = None  # of the training rows as parsed (lolrl.utils.cache.records_digest)
    best: dict | None = None  # best.json: step, epoch, metric, measure
    results: dict[str, dict] | None = None  # eval_results: {"val/generated": {...}, "test/generated": {...}, ...}
    command: str = field(default_factory=command_line)
    tags: list[str] = field(default_factory=list)

    def front_matter(self) -> dict:
        meta: dict[str, Any] = {}
        if not is_local(self.base_model):
            meta["base_model"] = self.base_model
        meta["library_name"] = "peft" if self.adapter else "transformers"
        meta["tags"] = ["lolrl", "a-lol", "offline-rl", self.algorithm.replace("_", "-"), "trl-style",
                        *(["lora"] if self.adapter else []), *self.tags]
        return meta


def _yaml(meta: dict) -> str:
    import yaml

    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "none" if value is None else str(value)


def render_card(card: CardContents, folder_name: str) -> str:
    """The card's text (YAML front matter, then Markdown)."""
    what = "a LoRA adapter" if card.adapter else "a model"
    lines = ["---", _yaml(card.front_matter()), "---", "", f"# {folder_name}", "",
             f"This is {what} trained from {model_label(card.base_model)} with **{card.algorithm}**"
             + (f" on the task `{card.task}`" if card.task else "")
             + f" by lolrl's {card.trainer}: offline reinforcement learning "
             f"for language models, A-LoL and its baselines ({PAPER}).", ""]
    if card.start_adapter:
        lines += [f"Training started from the adapter {model_label(card.start_adapter)} on that base "
                  "(also the reference policy).", ""]
    lines += ["## Quick start", "", "```python"]
    if card.adapter:
        lines += ["from peft import AutoPeftModelForCausalLM  # AutoPeftModelForSeq2SeqLM for an encoder-decoder",
                  "", 'model = AutoPeftModelForCausalLM.from_pretrained("<this folder or hub id>")']
    else:
        lines += ["from transformers import pipeline", "",
                  'generator = pipeline("text-generation", model="<this folder or hub id>")']
    lines += ["```", "", "## Training procedure", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {_value(value)} |" for name, value in card.settings.items()]
    lines += ["", "## Data", ""]
    if card.task:
        lines.append(f"- task: `{card.task}`")
    lines += [f"- {split} rows: {n}" for split, n in card.rows.items()]
    if card.data_digest:
        lines.append(f"- training data digest (SHA-256 of the rows as parsed): `{card.data_digest}`")
    lines += ["", "## Results", ""]
    if card.best:
        lines.append(f"Best validation {card.best.get('metric')}: {_value(card.best.get('measure'))} at optimizer step "
                     f"{card.best.get('step')} (the weights in this folder).")
    if card.results:
        lines += ["", "Final evaluation of these weights (generated responses; gold: the data's own responses):", "",
                  format_markdown_table(card.results).strip()]
    elif not card.best:
        lines.append("No validation yet.")
    lines += ["", "## Command", "", "```bash", card.command, "```", "", "## Framework versions", ""]
    lines += [f"- {name}: {v}" for name, v in package_versions("lolrl", "transformers", "torch", "peft", "accelerate",
                                                                "trl").items()
              if name != "peft" or card.adapter]
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def write_card(folder: str | os.PathLike, card: CardContents) -> Path:
    """``folder/README.md`` from ``card``, with ``best`` read from ``folder/best.json`` when not given
    (call it on the main process, after the weights are saved: it replaces peft's own README)."""
    folder = Path(folder)
    if card.best is None and (folder / "best.json").is_file():
        try:
            card.best = json.loads((folder / "best.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            card.best = None
    path = folder / CARD
    atomic_write_text(path, render_card(card, folder.resolve().name))
    return path


def push_folder(folder: str | os.PathLike, hub: HubSettings, default_name: str, message: str) -> str:
    """Upload ``folder`` (hidden files such as the run's lock left out) to the hub repository
    ``hub.hub_model_id`` (default ``default_name``), created if needed; returns the repository id.
    A refusal by the hub (no token, no permission, no network) is one error line."""
    from huggingface_hub import HfApi

    if not (Path(folder) / CARD).is_file():
        raise UserError(f"{folder}: no {CARD} model card to upload with the model")
    wanted = hub.hub_model_id or default_name
    api = HfApi(token=hub.hub_token)
    try:
        repo = api.create_repo(repo_id=wanted, private=hub.hub_private_repo, exist_ok=True, repo_type="model")
        repo_id = getattr(repo, "repo_id", None) or wanted
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message, repo_type="model",
                          ignore_patterns=[".*", "**/.*"])
    except (OSError, ValueError) as exc:  # huggingface_hub's HTTP errors are OSErrors (requests') or ValueErrors
        raise UserError(f"--push_to_hub: uploading {folder} to '{wanted}' failed: {str(exc).splitlines()[0]}") from None
    logger.info("pushed %s to https://huggingface.co/%s", folder, repo_id)
    return repo_id


def push_best(folder: str | os.PathLike, hub: HubSettings, default_name: str, label: str, metric: str,
              best: float, what: str = "model") -> str:
    """--push_to_hub at the end of a run: :func:`push_folder` of the best ``what`` saved in ``folder``,
    refused in one line when no validation gave a finite ``metric`` (then nothing was saved)."""
    if not math.isfinite(best):
        raise UserError(f"--push_to_hub: no validation gave a finite {metric}, so no best {what} was saved in "
                        f"{folder}: nothing to upload")
    return push_folder(folder, hub, default_name, f"lolrl {label}: best validation {metric} {best:.4g}")


def offline_settings(config) -> dict[str, Any]:
    """The settings of an offline run (an ``OfflineRLConfig``) that decide what was learned, as the card lists them."""
    spec = config.spec
    out: dict[str, Any] = {"algorithm": config.algorithm}
    if spec.clip:
        out["importance weight clip (ppo_clip)"] = config.effective_clip
    if spec.kl:
        out["kl_beta"], out["kl_estimator"] = config.kl_beta, config.kl_estimator
    if config.algorithm == "r_gold":
        out["gold_floor"] = config.gold_floor
    if spec.grouped:
        out["group_size"], out["sft_weight"] = config.group_size, config.sft_weight
    out["sampling_strategy"] = config.sampling_strategy
    if config.uses_advantage:
        out.update({"value_source": config.value_source, "value_head": config.value_head,
                    "value_samples": config.value_samples, "value_epochs": config.value_epochs})
    out.update({"learning_rate": config.learning_rate, "optim": str(config.optim),
                "lr_scheduler_type": str(config.lr_scheduler_type), "warmup_steps": config.warmup_steps,
                "num_train_epochs": config.num_train_epochs, "max_steps": config.max_steps,
                "per_device_train_batch_size": config.per_device_train_batch_size,
                "gradient_accumulation_steps": config.gradient_accumulation_steps, "precision (dtype)": config.dtype})
    lora = config.lora
    if lora.enabled:
        out["LoRA"] = (f"r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, "
                       f"target_modules={lora.target_modules or 'default'}")
    elif config.adapter_path is None:
        out["LoRA"] = "none (all weights trained)"
    if config.load_in_4bit:
        out["4-bit base (QLoRA)"] = config.quantization.quant_type
    out.update({"max_prompt_length": config.max_prompt_length, "max_resp_length": config.max_resp_length,
                "validation decoding": (f"num_beams={config.generation.num_beams}, "
                                        f"do_sample={config.generation.do_sample}"),
                "seed": config.seed})
    return out


def offline_card(config, rows: dict[str, int], data_digest: str | None, results: dict[str, dict] | None = None
                 ) -> CardContents:
    """The card of an offline run's save folder (``config``: an ``OfflineRLConfig``; ``rows``: rows per split as
    trained, validated and tested; ``data_digest``: the training rows' digest)."""
    from lolrl.engine.modeling import split_adapter

    base, start_adapter = split_adapter(config.model_name, config.adapter_path)
    adapter = config.lora.enabled or start_adapter is not None
    return CardContents(base_model=base, algorithm=config.algorithm, trainer="OfflineRLTrainer",
                        settings=offline_settings(config), adapter=adapter, start_adapter=start_adapter,
                        task=config.task_name, rows=rows, data_digest=data_digest, results=results)

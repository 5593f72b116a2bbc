"""Command line of ``train_generation_task_with_off_policy_PG.py``: the original's flags, plus new ones.

Everything is parsed and checked (flags, data files, reward spec) before any model loads; a
problem prints one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
from pathlib import Path

from lolrl.engine.config import ConfigError, OfflineRLConfig
from lolrl.engine.data import load_task_dir
from lolrl.engine.generation import GenerationSettings
from lolrl.engine.losses import ALGORITHMS, KL_ESTIMATORS
from lolrl.engine.modeling import LoraSettings
from lolrl.engine.rewards import RewardSpecError, load_reward
from lolrl.engine.sampling import STRATEGIES, canonical_strategy
from lolrl.tasks.paper.tasks import is_paper_task, task_info
from lolrl.utils.errors import UserError, report_user_error

logger = logging.getLogger("lolrl")


class OneLineErrorParser(argparse.ArgumentParser):
    """Flag errors as one line and status 2, like every other input error of the script."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        description="Offline policy-gradient training (A-LoL and baselines) of a language model on "
                    "(prompt, response, reward) data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and task")
    g.add_argument("-i", "--input_dir", required=True, help="folder with train.jsonl, val.jsonl, test.jsonl")
    g.add_argument("-tn", "--task_name", required=True,
                   help="task name; a paper task (reddit_pos, reddit_neg, wow, faithdial, faithdial_wow, COMET; "
                        "any case), scored by its built-in reward recipe unless --reward is given, or any name "
                        "together with --reward")
    g.add_argument("--reward", default=None,
                   help="reward spec scoring generations: 'module:function', 'file.py:function', "
                        "'hf:MODEL#softmax[1]', a weighted sum 'a=...+0.5*b=...', a .json file, or 'none' "
                        "(then checkpoints are selected by the gold NLL)")
    g.add_argument("--use_datasets", action="store_true", help="read the JSON Lines files through `datasets`")
    g.add_argument("--max_val_examples", type=int, default=None, help="validate on the first N val rows only")
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model_name", required=True, help="pi_ref: hub id or path (an NLL-trained model)")
    g.add_argument("-mt", "--model_tokenizer", default=None, help="tokenizer, when not the model's")
    g.add_argument("-s", "--save_dir", default=None, help="where the best model is saved (default OUTPUT/model)")
    g.add_argument("-o", "--output_dir", required=True, help="logs, statistics, results and plots")
    g.add_argument("-cd", "--cache_dir", default=None, help="reference/value/advantage caches (default OUTPUT/cache)")
    g.add_argument("--no_cache", action="store_true", help="recompute every cached stage")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    g.add_argument("--bf16", dest="dtype", action="store_const", const="bf16", help="same as --dtype bf16")
    g.add_argument("--fp16", dest="dtype", action="store_const", const="fp16", help="same as --dtype fp16")
    g.add_argument("--lora_r", type=int, default=0, help="LoRA rank; 0 trains all weights")
    g.add_argument("--lora_alpha", type=int, default=16)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--lora_target_modules", default=None, help="comma-separated module names")
    g.add_argument("--adapter_path", default=None, help="start from (and train) this peft adapter")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--load_in_4bit", action="store_true",
                   help="QLoRA: quantise the frozen base to 4-bit NF4 (CUDA + bitsandbytes; plain LoRA otherwise)")
    g.add_argument("-ml", "--max_resp_length", type=int, default=128, help="response tokens (train and generation)")
    g.add_argument("--max_prompt_length", type=int, default=512, help="prompt tokens kept (the last ones)")
    g = p.add_argument_group("algorithm")
    g.add_argument("-algo", "--learning_algorithm", choices=ALGORITHMS, default="nll")
    g.add_argument("-c", "--ppo_clip", type=_optional_float, default=argparse.SUPPRESS,
                   help="clip importance weights to [1-c, 1+c]; default 0.9 (the paper's); 0 gives weight 1, "
                        "'none' leaves them unclipped")
    g.add_argument("-b", "--kl_beta", type=float, default=None, help="beta of a_lol_kl (default 0.1)")
    g.add_argument("--kl_estimator", choices=KL_ESTIMATORS, default="k1",
                   help="KL estimate of a_lol_kl; k1 is the paper's beta*(L_ref - L_theta), k3 Schulman's")
    g.add_argument("--gold_floor", type=float, default=0.1, help="R-GOLD lower bound on token probabilities")
    g.add_argument("-ts", "--train_sampling", action="store_true",
                   help="priority sampling (default on for A-LoL; turns it on for wbc/r_gold/r_lol)")
    g.add_argument("--sampling_strategy", type=canonical_strategy, choices=STRATEGIES, default=None,
                   help="default: good_priority for a_lol*, uniform otherwise (the original's None, also accepted)")
    g.add_argument("-a2c_n", "--a2c_n_value_head_epochs", type=int, default=20, help="value-head epochs")
    g.add_argument("--value_learning_rate", type=float, default=1e-3)
    g.add_argument("--value_heldout_fraction", type=float, default=0.2,
                   help="share of validation prompts held out to select the value head")
    g.add_argument("--value_source", choices=("generations", "data"), default="generations",
                   help="V(x) fits rewards of pi_ref's generations on val (the paper) or the val data's stored rewards")
    g.add_argument("-r", "--reward_function", default=None, help=argparse.SUPPRESS)  # unused by the original
    g.add_argument("-but", "--baseline_update_threshold", type=float, default=None, help=argparse.SUPPRESS)
    g = p.add_argument_group("training")
    g.add_argument("-t", "--train", action="store_true", help="train; without it only evaluate the model at -s/-m")
    g.add_argument("-e", "--n_epochs", type=int, default=4)
    g.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps")
    g.add_argument("-bs", "--batch_size", type=int, default=16, help="per-process batch size")
    g.add_argument("-as", "--accumulation_steps", type=int, default=1)
    g.add_argument("-lr", "--learning_rate", type=float, default=2e-5)
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--warmup_ratio", type=float, default=0.0)
    g.add_argument("--lr_scheduler", default="linear")
    dropout = g.add_mutually_exclusive_group()
    dropout.add_argument("--disable_dropout", dest="disable_dropout", action="store_true", default=None)
    dropout.add_argument("--keep_dropout", dest="disable_dropout", action="store_false",
                         help="default: dropout off for the importance-weighted algorithms, on otherwise")
    g.add_argument("--no_length_grouping", action="store_true", help="do not group training rows by length")
    g.add_argument("--packing", choices=["auto", "on", "off"], default="auto",
                   help="pack a batch's rows into one sequence without padding; auto: only with a flash-attention "
                        "kernel (else rows are padded, grouped by length), and only if exact on this model")
    g.add_argument("-seed", "--seed", type=int, default=901)
    g.add_argument("--save_steps", type=int, default=0,
                   help="checkpoint (model/adapter, optimizer, scheduler, sampler, RNG) every N optimizer steps; "
                        "0: at every validation; -1: never")
    g.add_argument("--keep_checkpoints", type=int, default=2, help="how many checkpoints to keep")
    resume = g.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_const", const="must", default="auto",
                        help="continue from the latest checkpoint in OUTPUT/checkpoints (default: whenever one exists)")
    resume.add_argument("--no_resume", dest="resume", action="store_const", const="never",
                        help="start over even if a checkpoint exists")
    g.add_argument("--stop_after_steps", type=int, default=-1,
                   help="stop, checkpointed, after this many optimizer steps (e.g. to fit a batch job's time limit); "
                        "the same command then resumes")
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--report_to", default="none", help="trackers for accelerate: tensorboard, wandb, ... or none")
    g = p.add_argument_group("validation and generation")
    g.add_argument("-ev_b", "--eval_in_beginning", action="store_true",
                   help="validate the starting model first; a checkpoint must then beat it")
    g.add_argument("-v_bs", "--val_batch_size", type=int, default=64)
    g.add_argument("-vf", "--val_log_frequency", type=int, default=2, help="validations per epoch")
    g.add_argument("--num_beams", type=int, default=2)
    g.add_argument("--repetition_penalty", type=float, default=2.5)
    g.add_argument("--do_sample", action="store_true")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--no_test", action="store_true", help="skip the final test-set evaluation")
    g = p.add_argument_group("paper reward models: the paper tasks' built-in reward recipes (used when --reward "
                             "is not given) read their classifiers from these hub ids or folders")
    from lolrl.tasks.paper.rewards import DEFAULT_MODELS

    for short, long, key in (("-cm", "--cola_classifier_model", "cola"), ("-esm", "--embedding_similarity_model", None),
                             ("-scm", "--sentiment_classification_model", None), ("-dnlim", "--doc_nli_model", None),
                             ("-ccm", "--comet_critic_model", "comet_critic"),
                             ("-fcm", "--faithdial_critic_model", "faithcritic"),
                             ("-dcm", "--depth_dialogRPT_model", "depth"), ("-ucm", "--updown_dialogRPT_model", "updown"),
                             ("-om", "--offensive_model_dir", "offensive")):
        g.add_argument(short, long, default=None,
                       help=f"default {DEFAULT_MODELS[key]}" if key else "unused by these tasks (accepted)")
    return p


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "null") else float(text)


def config_from_args(args: argparse.Namespace) -> OfflineRLConfig:
    if args.baseline_update_threshold is not None:
        raise ConfigError("--baseline_update_threshold is not supported: the reference policy stays fixed, "
                          "as in the paper's objective")
    sampling = args.sampling_strategy
    if sampling is None and args.train_sampling:
        sampling = "good_priority"
    generation = GenerationSettings(max_new_tokens=args.max_resp_length, num_beams=args.num_beams,
                                    repetition_penalty=args.repetition_penalty, do_sample=args.do_sample,
                                    temperature=args.temperature, top_p=args.top_p)
    lora = LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                        target_modules=args.lora_target_modules)
    clip_given = hasattr(args, "ppo_clip")  # absent unless given (default SUPPRESS)
    model_name = args.model_name
    if not args.train and args.save_dir and Path(args.save_dir).is_dir():
        model_name = args.save_dir  # the original evaluates the saved model when -t is absent
    return OfflineRLConfig(
        model_name=model_name, output_dir=args.output_dir, algorithm=args.learning_algorithm,
        tokenizer_name=args.model_tokenizer, save_dir=args.save_dir, cache_dir=args.cache_dir,
        use_cache=not args.no_cache, task_name=task_info(args.task_name).name,
        reward=None if args.reward in (None, "none") else args.reward,
        max_prompt_length=args.max_prompt_length, max_resp_length=args.max_resp_length, n_epochs=args.n_epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, accumulation_steps=args.accumulation_steps,
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        warmup_ratio=args.warmup_ratio, lr_scheduler=args.lr_scheduler, dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing, disable_dropout=args.disable_dropout, seed=args.seed,
        ppo_clip=args.ppo_clip if clip_given else 0.9, ppo_clip_given=clip_given, kl_beta=args.kl_beta,
        kl_estimator=args.kl_estimator, gold_floor=args.gold_floor, sampling_strategy=sampling,
        value_epochs=args.a2c_n_value_head_epochs, value_learning_rate=args.value_learning_rate,
        value_heldout_fraction=args.value_heldout_fraction, value_source=args.value_source, val_batch_size=args.val_batch_size,
        val_log_frequency=args.val_log_frequency, eval_in_beginning=args.eval_in_beginning,
        max_val_examples=args.max_val_examples, generation=generation, do_train=args.train,
        do_test=not args.no_test, lora=lora, adapter_path=args.adapter_path, logging_steps=args.logging_steps,
        report_to=args.report_to, length_grouping=not args.no_length_grouping, packing=args.packing,
        save_steps=args.save_steps, keep_checkpoints=args.keep_checkpoints, resume=args.resume,
        stop_after_steps=args.stop_after_steps, load_in_4bit=args.load_in_4bit)


def _setup_logging(output_dir: str, is_main: bool) -> None:
    """Log the library to stderr and OUTPUT/train_output.log; calling it again replaces both handlers."""
    library = logging.getLogger("lolrl")
    for handler in [h for h in library.handlers if getattr(h, "_lolrl", False)]:
        library.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if is_main:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / "train_output.log"))
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in handlers:
        handler._lolrl = True
        handler.setFormatter(formatter)
        library.addHandler(handler)
    library.setLevel(logging.INFO if is_main else logging.WARNING)


def _check_reward_given(args: argparse.Namespace) -> None:
    if args.reward is not None or is_paper_task(args.task_name):
        return  # a paper task without --reward uses its built-in recipe
    raise ConfigError(f"task '{args.task_name}' is not a paper task: pass --reward SPEC "
                      "(or --reward none to select checkpoints by gold NLL)")


def _paper_task_reward(args: argparse.Namespace, config: OfflineRLConfig):
    """The paper task's recipe (lolrl.tasks.paper.rewards), classifiers from -cm -ucm -dcm -om -fcm -ccm and the
    TF-IDF weights from the input folder; ``config.reward`` records its components."""
    from lolrl.tasks.paper.rewards import TFIDF_FILE, PaperRewardModels, build_task_reward

    task = task_info(args.task_name)
    models = PaperRewardModels.from_args(args, batch_size=config.val_batch_size)
    try:
        reward = build_task_reward(task.name, models, Path(args.input_dir) / TFIDF_FILE
                                   if task.name != "comet" else None)
    except RewardSpecError as exc:
        raise RewardSpecError(f"task '{task.name}': built-in reward recipe: {exc} (or pass --reward SPEC)") from None
    config.reward = " + ".join(f"{c.name}={c.source}" for c in reward.components)
    return reward


def _apply_task_settings(args: argparse.Namespace, config: OfflineRLConfig, data) -> None:
    """COMET, as the original: validate on a seeded sample of 10,000 val rows; stop generating at '.'."""
    task = task_info(args.task_name)
    if task.val_sample and args.max_val_examples is None and len(data.val) > task.val_sample:
        data.val = random.Random(config.seed).sample(data.val, task.val_sample)
        logger.info("task %s: validating on a random sample of %d val rows", task.name, task.val_sample)
    if task.stop_texts and not config.generation.stop_token_ids:
        from lolrl.engine.modeling import load_tokenizer

        tokenizer = load_tokenizer(config.model_name, config.tokenizer_name)
        for text in task.stop_texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                config.generation.stop_token_ids.append(ids[0])


def run(args: argparse.Namespace) -> tuple[dict, OfflineRLConfig, bool]:
    """Check everything cheap first (flags, reward spec, every data row), then load models and run."""
    config = config_from_args(args)
    _check_reward_given(args)
    if args.reward_function is not None:
        logger.warning("-r/--reward_function is ignored (the original code ignored it too)")
    data = load_task_dir(args.input_dir, task_info(args.task_name).split_files,
                         require_train_reward=config.do_train and config.algorithm != "nll",
                         need_test=config.do_test, use_datasets=args.use_datasets)
    if args.reward is None and is_paper_task(args.task_name):
        reward = _paper_task_reward(args, config)
    else:
        reward = load_reward(config.reward) if config.reward else None
    _apply_task_settings(args, config, data)
    from lolrl.engine.trainer import OfflineRLTrainer

    _setup_logging(config.output_dir, is_main=int(os.environ.get("RANK", "0")) == 0)  # before models load
    trainer = OfflineRLTrainer(config, data, reward, task=task_info(args.task_name))
    return trainer.run(), config, trainer.is_main


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results, config, is_main = run(args)
    except UserError as exc:  # one line, status 2; anything else is a bug and keeps its traceback
        return report_user_error(exc)
    if is_main and results:
        from lolrl.engine.evaluation import format_markdown_table

        print(format_markdown_table(results))
        print(f"outputs in {Path(config.output_dir).resolve()}; best model in {Path(config.save_dir).resolve()}")
    return 0

#!/usr/bin/env python
"""Throughput benchmark: lolrl's training steps against the original code's and TRL's, side by side.

    python bench/throughput.py                             # GPT-2 6x512 from a config, batch 8, HH-length rows
    python bench/throughput.py --model smollm2 --lora_r 8  # SmolLM2-135M-Instruct with a LoRA adapter
    python bench/throughput.py --quick                     # tiny model, 2 rounds: a smoke run
    python bench/throughput.py --model_path DIR            # any saved causal LM (e.g. a ~1B Llama on a GPU)

Methods (each in its own process, so its peak memory is its own), on the same model, rows and batch:
* ``nll``, ``a_lol`` (``a_lol_seq`` on request): this library's ``OfflineRLTrainer`` (a
  ``transformers.Trainer``) as a user runs it, timed through its ``training_step`` as TRL's are; the
  reference log-probs and advantages come from the stages made once before: the reference pass is
  timed, and so is the value stage (the head's fit on a quarter as many validation rows, to their
  stored rewards as a reward gives them to pi_ref's generation, on the prompt states of that
  generation's prefill; and, timed afterwards, the same with the states by a forward of their own,
  as ``--value_source data`` runs it);
* ``original_style``: the original code's step, built here for comparison only: prompts padded on
  the left, responses on the right, a reference forward (all hidden states) and the value head in
  every step, full-vocabulary logits;
* ``trl_sft`` / ``trl_sft_padding_free``: TRL's SFTTrainer on prompt-completion rows (loss on the
  completion only), length-grouped sampling / padding-free batches; ``trl_dpo``: TRL's DPOTrainer
  with precomputed reference log-probs (chosen = the row's response, rejected = another one).
  They run when TRL is installed.

Timing: each worker loads, warms up one step and waits; then the methods run ``--steps`` steps
each in turn, round after round (A B C A B C ...), so machine drift hits all of them alike. Per
method: min / median / max of real (non-pad) tokens per second over the rounds; per pair of
methods: the median over rounds of the ratio within a round. TRL's steps are timed through
``training_step`` (one call per optimizer step: no gradient accumulation).

Data: the real HH files under ../shared/data/hh when present, else synthetic rows with HH's length
distribution (prompt median ~110 tokens, p90 ~290; response median ~31, p90 ~95). The last lines
printed are the ``ratio``, ``padding`` and ``peak_memory`` figures, then ``value_stage/reference_pass``.
Peak memory: CUDA's max allocated bytes; on a CPU the peak of the bytes malloc has handed out and not taken back
(``bench/live_bytes.c``, built with ``$CC`` or ``cc`` and preloaded into every worker, Arrow's buffers routed
through malloc too), the counterpart of CUDA's figure; each method's peak RSS is printed beside it. The RSS
is not the measure: glibc keeps freed memory in its per-thread arenas, so it records how a process's frees
fragmented them (measured: 450-970 MB kept free against 410 MB in use between steps; see live_bytes.c). Without a
C compiler the peak RSS is the measure, and the first line says so. On CUDA everything runs in bf16.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HH = ROOT.parent / "shared" / "data" / "hh"
OURS = ("nll", "a_lol", "a_lol_seq", "original_style")
PEERS = ("trl_sft", "trl_sft_padding_free", "trl_dpo")
DEFAULT_METHODS = ("nll", "a_lol", "original_style") + PEERS
QUICK_METHODS = ("nll", "a_lol", "original_style")  # TRL's start-up alone takes minutes on 2 shared cores
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
MESSAGE = "@@bench "  # prefix of the protocol lines on a worker's stdout (libraries print too)
RATIOS = (("a_lol", "nll"), ("a_lol", "original_style"), ("nll", "trl_sft_padding_free"), ("a_lol", "trl_dpo"),
          ("nll", "trl_sft"))
MAX_PROMPT, MAX_RESPONSE = 512, 128


# ------------------------------------------------------------------------------------------ data
def hh_rows(limit: int) -> list[tuple[str, str, str]]:
    """(prompt, response, another response) from the PRO-format HH files; turns as Human/Assistant lines."""
    rows = []
    for path in sorted(HH.glob("hh_*/*.json")):
        if "bad_test" in path.name:
            continue
        for line in path.read_text().splitlines():
            record = json.loads(line)
            turns = [t.replace("<|prompter|>", "Human: ").replace("<|assistant|>", "Assistant: ")
                     for t in record["prefix"][0]]
            best = record.get("sft_index", 0)
            other = next((s for i, s in enumerate(record["suffix"]) if i != best), record["suffix"][best])
            rows.append(("\n".join(turns), record["suffix"][best], other))
    random.Random(0).shuffle(rows)
    return rows[:limit]


def synthetic_rows(limit: int) -> list[tuple[str, str, str]]:
    """Lognormal word counts fitted to HH's token medians/p90s (about 1.3 tokens per word)."""
    rng = random.Random(0)
    words = "the a to of and you i it is that for in can be what how with this not are your do".split()

    def lognormal(median: float, p90: float) -> str:
        sigma = math.log(p90 / median) / 1.2816
        n = max(2, int(median * math.exp(sigma * rng.gauss(0, 1)) / 1.3))
        return " ".join(rng.choice(words) for _ in range(n))

    return [("Human: " + lognormal(110, 290) + "\nAssistant:", lognormal(31, 95), lognormal(31, 95))
            for _ in range(limit)]


# ------------------------------------------------------------------------------------------ setup
def prepare(workdir: Path, args, n_rows: int) -> dict:
    """Rows and the model folder (a GPT-2 built from a config with a tokenizer trained on the rows, or SmolLM2)."""
    source = "HH (../shared/data/hh)" if HH.is_dir() else "synthetic, HH-like lengths"
    rows = hh_rows(n_rows) if HH.is_dir() else synthetic_rows(n_rows)
    (workdir / "rows.json").write_text(json.dumps(rows))
    if args.model_path:
        model_dir, name = args.model_path, f"{Path(args.model_path).name} (a saved causal LM)"
    elif args.model == "smollm2":
        from lolrl.demo.smollm2 import materialise

        model_dir = materialise(workdir.parent / "smollm2")
        name = "SmolLM2-135M-Instruct"
    else:
        from lolrl.demo.tiny import build_causal_lm, train_tokenizer

        model_dir = workdir / "model"
        tokenizer = train_tokenizer([p + " " + r for p, r, _ in rows], model_dir, vocab_size=8000, with_pad=False)
        layers, width = (2, 128) if args.quick else (6, 512)
        build_causal_lm(tokenizer, model_dir, n_layer=layers, n_embd=width, n_head=8, n_positions=1024)
        name = f"GPT-2 {layers}x{width} from a config"
    lora = f", LoRA r={args.lora_r}" if args.lora_r else ""
    return {"source": source, "model": name + lora, "model_dir": str(model_dir), "rows": len(rows)}


# ----------------------------------------------------------------------------------------- worker
LIVE_BYTES_SOURCE = Path(__file__).resolve().parent / "live_bytes.c"


def build_live_bytes_counter(workdir: Path) -> tuple[str | None, str]:
    """Compile bench/live_bytes.c into ``workdir``: (the library's path, how peak memory is measured)."""
    if not sys.platform.startswith("linux"):
        return None, "peak RSS (the live-heap counter preloads into glibc: Linux only)"
    out = workdir / "live_bytes.so"
    compiler = os.environ.get("CC", "cc")
    try:
        built = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(out), str(LIVE_BYTES_SOURCE)],
                               capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"peak RSS (the live-heap counter was not built: {compiler}: {error})"
    if built.returncode:
        error = (built.stderr.strip().splitlines() or [f"exit status {built.returncode}"])[-1]
        return None, f"peak RSS (the live-heap counter was not built: {compiler}: {error})"
    return str(out), "live heap bytes (bench/live_bytes.c)"


def live_heap_peak_mb(reset: bool = False) -> float | None:
    """The peak of malloc's bytes in use (since the last ``reset``), when bench/live_bytes.c is preloaded into this
    process; ``reset``: then start a new peak from what is in use now."""
    import ctypes

    try:
        library = ctypes.CDLL(None)
        peak, restart = library.live_bytes_peak, library.live_bytes_reset_peak
    except AttributeError:
        return None
    peak.restype = ctypes.c_longlong
    value = peak() / 2 ** 20
    if reset:
        restart()
    return value


def step_memory(device, start: bool) -> float | None:
    """The peak memory so far in :func:`memory_figures`' measure (None for the RSS); ``start``: then start a new
    peak (the timed steps')."""
    import torch

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
        if start:
            torch.cuda.reset_peak_memory_stats()
        return peak
    return live_heap_peak_mb(reset=start)


def memory_figures(device, rounds: Rounds) -> dict:
    """The process's ``peak_memory_mb``, the measure it is (CUDA's max allocated, else the live heap when counted,
    else the RSS), the timed steps' peak in that measure (``steps_peak_mb``, not for the RSS), ``peak_rss_mb``."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    now = step_memory(device, start=False)
    if now is None:
        return {"peak_memory_mb": rss, "memory_measure": "peak RSS", "peak_rss_mb": rss}
    return {"peak_memory_mb": max(now, rounds.earlier_peak_mb or 0.0), "steps_peak_mb": rounds.steps_peak_mb,
            "memory_measure": "CUDA max allocated" if device.type == "cuda" else "live heap", "peak_rss_mb": rss}


def say(payload: dict) -> None:
    print(MESSAGE + json.dumps(payload), flush=True)


def cpu_usage() -> tuple[float, int]:
    """This process's CPU seconds (user + system, every thread) and minor page faults so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_minflt


class Rounds:
    """Drives a worker's steps: step 0 warms up; then ``rounds`` rounds of ``steps`` timed steps, each
    started by a ``go`` line on stdin; ``before_step`` is called before every step with its token counts.
    A final untimed step closes the last round (TRL's loop cannot be stopped between steps otherwise); it
    and the end of the run (a Trainer's last validation, saving) wait for a ``finish`` line, sent once every
    method has run its last round: they used to run alongside the next method's last round, which then ran
    at about half speed (every run's last a_lol/nll ratio was 0.50-0.57)."""

    def __init__(self, steps: int, rounds: int, cuda: bool):
        self.steps, self.rounds, self.cuda = steps, rounds, cuda
        self.calls = self.done = 0
        # the peak memory before the timed steps and theirs (step_memory; None when only the RSS is measured)
        self.earlier_peak_mb: float | None = None
        self.steps_peak_mb: float | None = None
        self.started = None
        self.real = self.fed = 0

    @property
    def total_steps(self) -> int:
        return 2 + self.rounds * self.steps

    def _device(self):
        import torch

        return torch.device("cuda" if self.cuda else "cpu")

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def before_step(self, real: int, fed: int) -> None:
        index, self.calls = self.calls, self.calls + 1
        if index >= 1 and (index - 1) % self.steps == 0:
            if self.started is not None:
                self._sync()
                cpu, faults = cpu_usage()
                say({"seconds": time.perf_counter() - self.started, "real_tokens": self.real, "fed_tokens": self.fed,
                     "steps": self.steps, "cpu_seconds": cpu - self.cpu_started[0],
                     "minor_faults": faults - self.cpu_started[1]})
                self.started, self.done = None, self.done + 1
                if self.done == self.rounds:
                    self.steps_peak_mb = step_memory(self._device(), start=False)
            if self.done < self.rounds:
                if index == 1:
                    say({"ready": True})
                if sys.stdin.readline().strip() != "go":
                    raise SystemExit("worker: expected 'go'")
                if index == 1:
                    self.earlier_peak_mb = step_memory(self._device(), start=True)
                self._sync()
                self.real = self.fed = 0
                self.cpu_started = cpu_usage()
                self.started = time.perf_counter()
            elif sys.stdin.readline().strip() != "finish":  # the rest of the run waits for every method's last round
                raise SystemExit("worker: expected 'finish'")
        if self.started is not None:
            self.real, self.fed = self.real + real, self.fed + fed

    @contextlib.contextmanager
    def paused(self):
        """Time spent in here is not counted: the Trainer's validation, checkpoint and logging between two timed
        steps (none falls inside the default rounds; a validation at an epoch's end would, and TRL's workers
        neither validate nor save)."""
        stopped = time.perf_counter()
        try:
            yield
        finally:
            if self.started is not None:
                self.started += time.perf_counter() - stopped


def paused_between_steps(trainer_class, rounds: Rounds):
    """``trainer_class`` whose validation, checkpoint and logging between steps are not timed (:meth:`Rounds.paused`),
    for lolrl's and TRL's workers alike."""
    class Paused(trainer_class):
        def _maybe_log_save_evaluate(self, *args, **kwargs):
            with rounds.paused():
                return super()._maybe_log_save_evaluate(*args, **kwargs)

    return Paused


def load_policy(args, device):
    from lolrl.engine.modeling import LoraSettings, enable_activation_checkpointing, load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model_dir)
    lora = LoraSettings(r=args.lora_r, dropout=0.0) if args.lora_r else None
    model = load_model(args.model_dir, lora=lora).to(device)
    model.config.use_cache = False
    if checkpointing(args, ours=True):
        enable_activation_checkpointing(model)
    return tokenizer, model


def warm_up(args, device, prompts: list[str]) -> None:
    """One forward of a throwaway copy of the policy on a batch of prompts, before the trainer: the process's first
    forward is slower (its heap grows: 0 to 0.8 s more for the benchmark's 28 validation prompts, measured by
    timing the same prompt states three times in one process), and in a worker that cost fell on whichever stage
    ran first, the value stage's prompt states (in a run whose V(x) targets are generated, the default, pi_ref's
    generation runs first)."""
    import torch

    tokenizer, model = load_policy(args, device)
    batch = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=MAX_PROMPT)
    with torch.no_grad():
        model(**{k: v.to(device) for k, v in batch.items()})
    del model


def checkpointing(args, ours: bool) -> bool:
    """Whether a method recomputes activations in its backward: ``peers_default``: TRL's trainers do
    (their default), lolrl's steps do not (theirs); ``on`` / ``off``: every method alike."""
    return {"on": True, "off": False}.get(args.gradient_checkpointing, not ours)


def token_rows(tokenizer, pairs):
    from lolrl.engine.collation import Tokenizer
    from lolrl.engine.data import Record

    records = [Record(str(i), p, r, 1.0) for i, (p, r, _) in enumerate(pairs)]
    return Tokenizer(tokenizer, False, max_prompt_length=MAX_PROMPT, max_resp_length=MAX_RESPONSE)(records)


def original_batch(rows, pad_id: int):
    """The original collation: prompts left-padded, responses right-padded, concatenated."""
    import torch

    lq = max(len(r.prompt_ids) for r in rows)
    lr = max(len(r.response_ids) for r in rows)
    ids = [[pad_id] * (lq - len(r.prompt_ids)) + r.prompt_ids + r.response_ids + [pad_id] * (lr - len(r.response_ids))
           for r in rows]
    mask = [[0] * (lq - len(r.prompt_ids)) + [1] * (len(r.prompt_ids) + len(r.response_ids))
            + [0] * (lr - len(r.response_ids)) for r in rows]
    resp = [r.response_ids + [pad_id] * (lr - len(r.response_ids)) for r in rows]
    resp_mask = [[1] * len(r.response_ids) + [0] * (lr - len(r.response_ids)) for r in rows]
    return (torch.tensor(ids), torch.tensor(mask), torch.tensor(resp), torch.tensor(resp_mask).float(), lq)


def value_stage_of_its_own(trainer, targets: list[float]) -> dict:
    """The value stage as the trainer runs it where no generation of pi_ref's precedes it (``--value_source data``):
    the validation prompts' states by a forward of their own, then the head's fit (the same targets)."""
    from lolrl.engine.value import fit_value_head

    started = time.perf_counter()
    states = trainer.forward_prompt_states(trainer.val_rows)
    states_s = time.perf_counter() - started
    _, report = fit_value_head(states, targets, trainer.value_fit_settings(), device=trainer.accelerator.device)
    return {"prompt_states_s": states_s, "value_fit_s": report.fit_seconds,
            "value_stage_s": states_s + report.fit_seconds}


def run_original_style(method: str, args, rounds: Rounds) -> dict:
    """The original code's step, built here for comparison only (see the module's docstring)."""
    import torch

    from lolrl.engine.collation import group_by_length
    from lolrl.engine.losses import compute_loss
    from lolrl.engine.modeling import load_model
    from lolrl.engine.value import ValueHead

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer, model = load_policy(args, device)
    rows = token_rows(tokenizer, json.loads((Path(args.workdir) / "rows.json").read_text()))
    n = rounds.total_steps * args.batch_size
    pool = list(range(len(rows)))
    random.Random(1).shuffle(pool)
    lengths = [r.length for r in rows]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    result = {"method": method}
    # As in training: a window of (up to) 50 batches is grouped by length and shuffled by batch; the rows
    # are the first of the shuffled pool, the same rows the TRL workers get.
    order = group_by_length(pool[:n], lengths, args.batch_size, window=50, seed=0)
    batches = [[rows[i] for i in order[s:s + args.batch_size]] for s in range(0, n, args.batch_size)]

    reference = load_model(args.model_dir).to(device).eval()
    head = ValueHead(model.config.hidden_size).to(device)
    result["layout"] = "left/right padded"

    def step(batch_rows):
        ids, mask, resp, resp_mask, lq = (t.to(device) if hasattr(t, "to") else t
                                          for t in original_batch(batch_rows, tokenizer.pad_token_id))
        rounds.before_step(int(mask.sum()), int(ids.numel()))
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, lq - 1:-1].float()
            logprobs = logits.log_softmax(-1).gather(-1, resp[..., None]).squeeze(-1) * resp_mask
            with torch.no_grad():
                out = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                ref = out.logits[:, lq - 1:-1].float().log_softmax(-1).gather(-1, resp[..., None]).squeeze(-1)
                value = head(out.hidden_states[-1][:, :lq].float(), torch.ones_like(mask[:, :lq]))
            loss, _ = compute_loss("a_lol", logprobs, resp_mask, advantages=(1.0 - value).abs(),
                                   ref_logprobs=ref * resp_mask, clip=0.9)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    if checkpointing(args, ours=True):
        result["layout"] += ", gradient checkpointing"
    for batch_rows in batches:
        step(batch_rows)
    result.update(params=sum(p.numel() for p in model.parameters()), **memory_figures(device, rounds),
                  device=torch.cuda.get_device_name() if cuda else "cpu")
    return result


def run_trainer(method: str, args, rounds: Rounds) -> dict:
    """lolrl's ``OfflineRLTrainer`` (a ``transformers.Trainer``) as a user runs it, timed through its
    ``training_step`` as TRL's trainers are: the stages first (the reference pass; for A-LoL, as by default, pi_ref's
    generation on a quarter as many validation prompts (one new token), scored by a reward that gives each prompt
    its stored reward, and the value stage: V(x) fit to those rewards on the prompt states of the generation's
    prefill), then one epoch over the same rows as TRL's workers, uniformly sampled, length-grouped. Afterwards
    the value stage as ``--value_source data`` runs it (:func:`value_stage_of_its_own`), timed too."""
    import numpy as np
    import torch

    from lolrl import OfflineRLConfig, OfflineRLTrainer
    from lolrl.engine.collation import padding_ratio
    from lolrl.engine.data import Record, TaskData
    from lolrl.engine.generation import GenerationSettings
    from lolrl.engine.modeling import LoraSettings

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    pairs = json.loads((Path(args.workdir) / "rows.json").read_text())
    pool = list(range(len(pairs)))
    random.Random(1).shuffle(pool)
    n = rounds.total_steps * args.batch_size
    rewards = (torch.rand(len(pairs), generator=torch.Generator().manual_seed(0)) + 0.1).tolist()
    train = [Record(str(i), pairs[i][0], pairs[i][1], rewards[i]) for i in pool[:n]]
    val = [Record(f"v{i}", pairs[i][0], pairs[i][1], rewards[i]) for i in pool[n:n + max(n // 4, 16)]]
    out = Path(args.workdir) / f"trainer_{method}"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    config = OfflineRLConfig(
        model_name=args.model_dir, output_dir=str(out), algorithm=method, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=16, max_steps=rounds.total_steps, num_train_epochs=1, learning_rate=1e-5,
        lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0, logging_steps=10_000,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=0, bf16=cuda, do_predict=False,
        activation_checkpointing=checkpointing(args, ours=True), lora=LoraSettings(r=args.lora_r, dropout=0.0),
        max_prompt_length=MAX_PROMPT, max_resp_length=MAX_RESPONSE, stage_cache=False,
        sampling_strategy="uniform", val_log_frequency=1, generation=GenerationSettings(max_new_tokens=1, num_beams=1))
    padding = []

    class Timed(paused_between_steps(OfflineRLTrainer, rounds)):
        def training_step(self, model, inputs, *rest, **kwargs):
            real = int((inputs["prompt_lengths"] + inputs["response_lengths"]).sum())
            rounds.before_step(real, int(inputs["input_ids"].numel()))
            padding.append(padding_ratio(inputs))
            return super().training_step(model, inputs, *rest, **kwargs)

    stored = {r.prompt: r.reward for r in train + val}

    def stored_reward(prompts, completions, **columns):  # each prompt's stored reward, whatever was generated
        return [stored[p] for p in prompts]

    warm_up(args, device, [pairs[i][0] for i in pool[:args.batch_size]])
    trainer = Timed(args=config, data=TaskData(train=train, val=val, test=None),
                    reward_funcs=[stored_reward] if method != "nll" else None)
    trainer.model.config.use_cache = False
    started = time.perf_counter()
    trainer.run()
    result = {"method": method, "train_s": time.perf_counter() - started,
              "layout": "packed" if trainer.collator.pack else "length-grouped",
              "padding_grouped": float(np.mean(padding)) if padding else 0.0}
    if "reference_pass" in trainer.stage_seconds:
        result["reference_pass_s"] = trainer.stage_seconds["reference_pass"]
        result["reference_rows"] = len(train)
    fit_path = out / "value_fit.json"
    if fit_path.exists():
        fit = json.loads(fit_path.read_text())
        result.update(prompt_states_s=fit["prompt_states_seconds"], prompt_states_from=fit["prompt_states"],
                      value_fit_s=fit["fit_seconds"], value_stage_s=fit["prompt_states_seconds"] + fit["fit_seconds"],
                      reference_generations_s=trainer.stage_seconds.get("reference_generations"))
    if checkpointing(args, ours=True):
        result["layout"] += ", gradient checkpointing"
    result.update(params=sum(p.numel() for p in trainer.model.parameters()), **memory_figures(device, rounds),
                  device=torch.cuda.get_device_name() if cuda else "cpu")
    if "value_stage_s" in result:  # after the memory figures: the run's peak is the trainer's alone
        result["of_its_own"] = value_stage_of_its_own(trainer, [r.reward for r in val])
    return result


def truncated(tokenizer, pairs):
    """The rows as lolrl truncates them (prompt: last 512 tokens; responses: first 128), back in text, so
    TRL's trainers see the same tokens (TRL's max_length cuts the whole sequence instead)."""
    def cut(text, keep_last):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[-MAX_PROMPT:] if keep_last else ids[:MAX_RESPONSE - 1])

    return [(cut(p, True), cut(r, False), cut(o, False)) for p, r, o in pairs]


def run_trl(method: str, args, rounds: Rounds) -> dict:
    """TRL's trainer on the same model, rows (the same shuffled pool) and batch size."""
    import torch
    from datasets import Dataset

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tokenizer, model = load_policy(args, device)
    model.gradient_checkpointing_disable()  # the TRL config below decides
    pairs = json.loads((Path(args.workdir) / "rows.json").read_text())
    pool = list(range(len(pairs)))
    random.Random(1).shuffle(pool)
    pool = pool[: rounds.total_steps * args.batch_size]  # the rows lolrl's workers train on
    pairs = truncated(tokenizer, pairs)
    common = dict(output_dir=str(Path(args.workdir) / method), per_device_train_batch_size=args.batch_size,
                  max_steps=rounds.total_steps, learning_rate=1e-5, lr_scheduler_type="constant",
                  logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                  dataloader_num_workers=0, use_cpu=not cuda, bf16=cuda, max_length=None,
                  gradient_checkpointing=checkpointing(args, ours=False))

    def count(inputs) -> tuple[int, int]:
        ids = inputs["input_ids"]
        real = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.numel()
        return real, ids.numel()

    if method == "trl_dpo":
        from trl import DPOConfig, DPOTrainer

        base, config = DPOTrainer, DPOConfig(precompute_ref_log_probs=True, **common)
        data = Dataset.from_list([{"prompt": pairs[i][0], "chosen": " " + pairs[i][1], "rejected": " " + pairs[i][2]}
                                  for i in pool])
    else:
        from trl import SFTConfig, SFTTrainer

        padding_free = method == "trl_sft_padding_free"
        base = SFTTrainer
        config = SFTConfig(completion_only_loss=True, padding_free=padding_free,
                           train_sampling_strategy="random" if padding_free else "group_by_length", **common)
        data = Dataset.from_list([{"prompt": pairs[i][0], "completion": " " + pairs[i][1]} for i in pool])

    class Timed(paused_between_steps(base, rounds)):
        def training_step(self, model, inputs, *rest, **kwargs):
            rounds.before_step(*count(inputs))
            return super().training_step(model, inputs, *rest, **kwargs)

    trainer = Timed(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    started = time.perf_counter()
    trainer.train()
    layout = "padding-free" if method == "trl_sft_padding_free" else "padded"
    if config.gradient_checkpointing:
        layout += ", gradient checkpointing"
    result = {"method": method, "layout": layout,
              "train_s": time.perf_counter() - started, "params": sum(p.numel() for p in model.parameters()),
              **memory_figures(device, rounds), "device": torch.cuda.get_device_name() if cuda else "cpu"}
    return result


def worker(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = Rounds(args.steps, args.rounds, torch.cuda.is_available())
    run = run_trl if args.worker in PEERS else run_original_style if args.worker == "original_style" else run_trainer
    result = run(args.worker, args, rounds)
    if rounds.done != args.rounds:
        raise SystemExit(f"worker {args.worker}: {rounds.done} of {args.rounds} rounds ran")
    say({"final": result})
    return 0


# ------------------------------------------------------------------------------------------- main
class Worker:
    def __init__(self, method: str, args, workdir: Path):
        cmd = [sys.executable, __file__, "--worker", method, "--workdir", str(workdir), "--model_dir", args.model_dir,
               "--steps", str(args.steps), "--rounds", str(args.rounds), "--batch_size", str(args.batch_size),
               "--lora_r", str(args.lora_r), "--threads", str(args.threads),
               "--gradient_checkpointing", args.gradient_checkpointing]
        self.method, self.log = method, workdir / f"{method}.log"
        # idle workers wait on stdin: their OpenMP threads must sleep, not spin, while another method runs
        env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE"}
        if args.live_bytes:  # every worker's allocations counted (Arrow's buffers through malloc too)
            env |= {"LD_PRELOAD": " ".join(filter(None, (args.live_bytes, env.get("LD_PRELOAD")))),
                    "ARROW_DEFAULT_MEMORY_POOL": "system"}
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=open(self.log, "w"), text=True, env=env)

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(MESSAGE):
                return json.loads(line[len(MESSAGE):])
        raise RuntimeError(f"worker {self.method} stopped (exit {self.process.wait()}); see {self.log}")

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def go(self) -> dict:
        self.send("go")
        return self.read()


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def summary(values: list[float]) -> str:
    return f"min {min(values):9.1f}  median {statistics.median(values):9.1f}  max {max(values):9.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny GPT-2, 2 rounds of 2 steps: a smoke run")
    parser.add_argument("--model", choices=("gpt2", "smollm2"), default="gpt2")
    parser.add_argument("--model_path", default=None, help="a saved causal LM folder with its tokenizer, e.g. the "
                        "~1.1B Llama of bench/gpu_check.py (instead of --model)")
    parser.add_argument("--lora_r", type=int, default=0, help="train a LoRA adapter of this rank (0: full model)")
    parser.add_argument("--workdir", default="runs/bench_throughput")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method per round")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--methods", default=None, help=f"comma-separated, of {', '.join(OURS + PEERS)} (default: "
                        f"{', '.join(DEFAULT_METHODS)}; with --quick: {', '.join(QUICK_METHODS)})")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--gradient_checkpointing", choices=("peers_default", "on", "off"), default="peers_default",
                        help="recompute activations in the backward: peers_default (TRL's trainers yes, as their "
                             "default; lolrl no, as its default), or on / off for every method (like for like)")
    parser.add_argument("--worker", choices=OURS + PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.steps = args.steps or (2 if args.quick else 3)
    args.rounds = args.rounds or (2 if args.quick else 5)
    if args.worker:
        return worker(args)
    chosen = args.methods or ",".join(QUICK_METHODS if args.quick else DEFAULT_METHODS)
    methods = [m.strip() for m in chosen.split(",") if m.strip()]
    if unknown := [m for m in methods if m not in OURS + PEERS]:
        parser.error(f"unknown methods: {', '.join(unknown)}")
    if not trl_available():
        print("TRL is not installed: its trainers are left out")
        methods = [m for m in methods if m not in PEERS]
    model_tag = Path(args.model_path).name if args.model_path else args.model
    workdir = Path(args.workdir) / (model_tag + (f"_lora{args.lora_r}" if args.lora_r else ""))
    workdir.mkdir(parents=True, exist_ok=True)
    info = prepare(workdir, args, n_rows=max(20 if args.quick else 50, 2 + args.rounds * args.steps) * args.batch_size)
    args.model_dir = info["model_dir"]
    args.live_bytes, measure = build_live_bytes_counter(workdir)
    print(f"data: {info['rows']} rows, {info['source']}; model: {info['model']}; batch {args.batch_size}; "
          f"{args.rounds} rounds of {args.steps} timed steps per method, methods in turn (the order alternating): "
          f"{', '.join(methods)}; peak memory on a CPU: {measure}",
          flush=True)
    workers = {}
    for method in methods:  # one at a time, so the one-time passes are timed on a quiet machine
        workers[method] = Worker(method, args, workdir)
        workers[method].read()
        print(f"{method}: ready", flush=True)
    per_round: dict[str, list[dict]] = {m: [] for m in methods}
    for number in range(1, args.rounds + 1):
        for method in methods if number % 2 else methods[::-1]:  # the order alternates from round to round
            per_round[method].append(workers[method].go())
        print(f"round {number}: " + ", ".join(f"{m} {r[-1]['real_tokens'] / r[-1]['seconds']:.0f}"
                                               for m, r in per_round.items()) + " real tokens/s", flush=True)
    finals = {}
    for method in methods:  # one at a time: a worker's end of run (and its memory) does not overlap another's
        workers[method].send("finish")
        finals[method] = workers[method].read()["final"]
        workers[method].process.wait()
    return report(methods, per_round, finals)


def steps_peak(final: dict) -> str:
    return f"the timed steps {final['steps_peak_mb']:.0f} MB; " if final.get("steps_peak_mb") else ""


def report(methods, per_round, finals) -> int:
    speed = {m: [r["real_tokens"] / r["seconds"] for r in per_round[m]] for m in methods}
    padding = {m: sum(r["fed_tokens"] for r in per_round[m]) / sum(r["real_tokens"] for r in per_round[m])
               for m in methods}
    first = finals[methods[0]]
    print(f"device: {first['device']}; {first['params'] / 1e6:.1f} M parameters")
    peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in first["device"]), None)
    for m in methods:
        f = finals[m]
        extra = ""
        if first["device"] != "cpu":  # model FLOPs utilisation: 6 x parameters per real token, attention left out
            extra = (f"; MFU {statistics.median(speed[m]) * 6 * f['params'] / (peak_tflops * 1e12):.1%}" if peak_tflops
                     else "; MFU n/a (this GPU's bf16 peak is not in PEAK_BF16_TFLOPS)")
        if "reference_pass_s" in f:
            extra += (f"; one-time reference pass {f['reference_pass_s']:.1f} s ({f['reference_rows']} rows), "
                      f"value stage {f['value_stage_s']:.1f} s (prompt states {f['prompt_states_s']:.1f} s "
                      f"+ fit {f['value_fit_s']:.1f} s)")
            if f.get("reference_generations_s") is not None:
                own = f["of_its_own"]
                extra += (f"; the prompt states from pi_ref's validation generation ({f['prompt_states_from']}; "
                          f"it took {f['reference_generations_s']:.1f} s, scored), by a forward of their own (as "
                          f"--value_source data, after the training) {own['prompt_states_s']:.1f} s + fit "
                          f"{own['value_fit_s']:.1f} s")
        rounds = per_round[m]
        print(f"{m:21s} real tokens/s {summary(speed[m])}  padding {padding[m]:.2f} ({f['layout']})  "
              f"CPU {sum(r['cpu_seconds'] for r in rounds) / sum(r['seconds'] for r in rounds):.2f}x wall, "
              f"{sum(r['minor_faults'] for r in rounds) / sum(r['steps'] for r in rounds) / 1000:.0f}K page "
              "faults a step  "
              f"peak memory {f['peak_memory_mb']:.0f} MB ({f['memory_measure']}; {steps_peak(f)}peak RSS "
              f"{f['peak_rss_mb']:.0f} MB){extra}")
    if "padding_grouped" in finals.get("a_lol", {}):
        print(f"padding if only length-grouped (no packing): {finals['a_lol']['padding_grouped']:.2f}")
    for a, b in RATIOS:
        if a in methods and b in methods:
            ratios = [x / y for x, y in zip(speed[a], speed[b])]
            print(f"ratio {a}/{b} = {statistics.median(ratios):.3f}  (per round: "
                  f"{', '.join(f'{r:.2f}' for r in ratios)})")
    if "a_lol" in methods:
        print(f"padding = {padding['a_lol']:.3f}")
    for other in ("nll", "trl_sft_padding_free"):
        if "a_lol" in methods and other in methods:
            ours, theirs = finals["a_lol"], finals[other]
            steps = (f"the timed steps {ours['steps_peak_mb'] / theirs['steps_peak_mb']:.3f}; "
                     if ours.get("steps_peak_mb") and theirs.get("steps_peak_mb") else "")
            print(f"peak_memory a_lol/{other} = {ours['peak_memory_mb'] / theirs['peak_memory_mb']:.3f}  "
                  f"({ours['memory_measure']}; {steps}peak RSS {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.3f})")
    if "a_lol" in finals:
        f = finals["a_lol"]
        print(f"value_stage/reference_pass = {f['value_stage_s'] / f['reference_pass_s']:.3f}  "
              f"(value stage on {f['reference_rows'] // 4} rows, reference pass on {f['reference_rows']}; the prompt "
              f"states from pi_ref's validation generation's prefill)")
        if "of_its_own" in f:
            print(f"value_stage/reference_pass (--value_source data) = "
                  f"{f['of_its_own']['value_stage_s'] / f['reference_pass_s']:.3f}  (the prompt states by a forward "
                  "of their own; timed after the training, in a warm process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

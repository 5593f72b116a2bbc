#!/usr/bin/env python
"""Throughput benchmark: real (non-pad) tokens per second and peak memory of training steps.

    python bench/throughput.py            # full: GPT-2 6x512 from a config, batch 8, HH-length rows
    python bench/throughput.py --quick    # smaller model and fewer steps, within a minute on 2 cores

Methods, each timed in its own process (so peak memory is its own) on the same rows:
* ``nll``, ``a_lol``, ``a_lol_seq``: this library's step — policy forward/backward only, reference
  log-probs and advantages read from a cache made once before (that one-time pass is timed too and
  printed), rows batched without padding (packed when the model honours it, else length-grouped);
* ``original_style``: the original code's step, built here for comparison only — prompts padded on
  the left and responses on the right, and a reference-model forward (all hidden states) plus the
  value head inside every step.

Data: the real HH dev/test files under ../shared/data/hh when present, else synthetic rows with
HH's length distribution (prompt median ~110 tokens, p90 ~290; response median ~31, p90 ~95).
The last lines printed are ``ratio a_lol/nll``, ``ratio a_lol/original_style``, ``padding`` and
``peak_memory a_lol/nll``. On CUDA it runs in bf16 and also reports model FLOPs utilisation.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HH = ROOT.parent / "shared" / "data" / "hh"
METHODS = ("nll", "a_lol", "a_lol_seq", "original_style")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


# ------------------------------------------------------------------------------------------ data
def hh_rows(limit: int) -> list[tuple[str, str]]:
    """(prompt, response) from the PRO-format HH files: turns rendered as Human/Assistant lines."""
    rows = []
    for path in sorted(HH.glob("hh_*/*.json")):
        if "bad_test" in path.name:
            continue
        for line in path.read_text().splitlines():
            record = json.loads(line)
            turns = [t.replace("<|prompter|>", "Human: ").replace("<|assistant|>", "Assistant: ")
                     for t in record["prefix"][0]]
            rows.append(("\n".join(turns), record["suffix"][record.get("sft_index", 0)]))
    random.Random(0).shuffle(rows)
    return rows[:limit]


def synthetic_rows(limit: int) -> list[tuple[str, str]]:
    """Lognormal word counts fitted to HH's token medians/p90s (about 1.3 tokens per word)."""
    rng = random.Random(0)
    words = "the a to of and you i it is that for in can be what how with this not are your do".split()

    import math

    def lognormal(median: float, p90: float) -> str:
        sigma = math.log(p90 / median) / 1.2816
        n = max(2, int(median * math.exp(sigma * rng.gauss(0, 1)) / 1.3))
        return " ".join(rng.choice(words) for _ in range(n))

    return [("Human: " + lognormal(110, 290) + "\nAssistant:", lognormal(31, 95)) for _ in range(limit)]


# ------------------------------------------------------------------------------------------ setup
def prepare(workdir: Path, quick: bool, n_rows: int) -> dict:
    """Rows, a tokenizer trained on them and a GPT-2 built from a config, written to ``workdir``."""
    from lolrl.demo.tiny import build_causal_lm, train_tokenizer

    source = "HH (../shared/data/hh)" if HH.is_dir() else "synthetic, HH-like lengths"
    rows = hh_rows(n_rows) if HH.is_dir() else synthetic_rows(n_rows)
    tokenizer = train_tokenizer([p + " " + r for p, r in rows], workdir / "model", vocab_size=8000, with_pad=False)
    layers, width = (2, 256) if quick else (6, 512)
    build_causal_lm(tokenizer, workdir / "model", n_layer=layers, n_embd=width, n_head=8, n_positions=1024)
    (workdir / "rows.json").write_text(json.dumps(rows))
    return {"source": source, "layers": layers, "width": width, "rows": len(rows)}


# ----------------------------------------------------------------------------------------- worker
def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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


def run_worker(method: str, workdir: Path, steps: int, batch_size: int) -> dict:
    import numpy as np
    import torch

    from lolrl.engine.collation import Collator, Tokenizer, group_by_length, padding_ratio
    from lolrl.engine.data import Record
    from lolrl.engine.losses import compute_loss
    from lolrl.engine.modeling import choose_packing, load_model, load_tokenizer, response_logprobs
    from lolrl.engine.reference import reference_pass
    from lolrl.engine.value import ValueHead

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = load_tokenizer(str(workdir / "model"))
    model = load_model(str(workdir / "model")).to(device)
    model.config.use_cache = False
    pairs = json.loads((workdir / "rows.json").read_text())
    records = [Record(str(i), p, r, 1.0) for i, (p, r) in enumerate(pairs)]
    rows = Tokenizer(tokenizer, False, max_prompt_length=512, max_resp_length=128)(records)
    # As in training: one window of 50 batches is drawn, grouped by length and shuffled by batch;
    # the timed steps are the first of those batches.
    n = steps * batch_size
    pool = list(range(len(rows)))
    random.Random(1).shuffle(pool)
    pool = pool[:50 * batch_size]
    order = pool[:n]
    lengths = [r.length for r in rows]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    advantages = torch.rand(len(rows), generator=torch.Generator().manual_seed(0)) + 0.1
    result = {"method": method}

    if method == "original_style":
        reference = load_model(str(workdir / "model")).to(device).eval()
        head = ValueHead(model.config.hidden_size).to(device)
        batches = [[rows[i] for i in order[s:s + batch_size]] for s in range(0, n, batch_size)]

        def step(batch_rows):
            ids, mask, resp, resp_mask, lq = (t.to(device) if hasattr(t, "to") else t
                                              for t in original_batch(batch_rows, tokenizer.pad_token_id))
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
            return int(mask.sum()), int(ids.numel())
    else:
        probe = [rows[i] for i in order[:4]]
        pack = choose_packing(model, probe, tokenizer.pad_token_id, os.environ.get("LOLRL_PACKING", "auto"))
        collator = Collator(tokenizer.pad_token_id, False, pack=pack)
        result["layout"] = "packed" if pack else "length-grouped"
        grouped = group_by_length(pool, lengths, batch_size, window=50, seed=0)[:n]
        order = grouped
        batches = [[rows[i] for i in grouped[s:s + batch_size]] for s in range(0, n, batch_size)]
        grouped_ratio = [padding_ratio(Collator(tokenizer.pad_token_id, False)(b)) for b in batches]
        result["padding_grouped"] = float(np.mean(grouped_ratio))
        cache = None
        if method != "nll":
            started = time.perf_counter()
            cache = reference_pass(model, [rows[i] for i in order], collator, 16).logprobs
            cache = {i: lp for i, lp in zip(order, cache)}
            result["reference_pass_s"] = time.perf_counter() - started
        model.train()

        def step(batch_rows):
            batch = {k: v.to(device) for k, v in collator(batch_rows).items()}
            idx = batch["index"].tolist()
            with torch.autocast(device.type, dtype=dtype, enabled=cuda):
                logprobs, mask, _ = response_logprobs(model, batch)
                kwargs = {}
                if cache is not None:
                    kwargs = {"advantages": advantages[idx].to(device), "clip": 0.9,
                              "ref_logprobs": torch.nn.utils.rnn.pad_sequence([cache[i] for i in idx],
                                                                              batch_first=True).to(device)}
                loss, _ = compute_loss(method, logprobs, mask, **kwargs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            real = int((batch["prompt_lengths"] + batch["response_lengths"]).sum())
            return real, int(batch["input_ids"].numel())

    step(batches[0])  # warm-up, not timed
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    real = fed = 0
    started = time.perf_counter()
    for batch_rows in batches[1:]:
        r, f = step(batch_rows)
        real, fed = real + r, fed + f
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    result.update(real_tokens=real, fed_tokens=fed, seconds=seconds, tokens_per_s=real / seconds,
                  padding=fed / real, peak_memory_mb=peak_memory_mb(device), params=params,
                  device=torch.cuda.get_device_name() if cuda else "cpu")
    # training FLOPs ~ 6 N per real token; the original's reference forward adds 2 N per fed token
    flops = 6 * params * real + (2 * params * fed if method == "original_style" else 0)
    result["achieved_tflops"] = flops / seconds / 1e12
    return result


# ------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default="runs/bench_throughput")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(args.workdir)
    steps = args.steps or (4 if args.quick else 12)
    if args.worker:
        print(json.dumps(run_worker(args.worker, workdir, steps, args.batch_size)))
        return 0
    workdir.mkdir(parents=True, exist_ok=True)
    info = prepare(workdir, args.quick, n_rows=50 * args.batch_size)
    print(f"data: {info['rows']} rows, {info['source']}; model: GPT-2 {info['layers']}x{info['width']} "
          f"from a config; batch {args.batch_size}, {steps - 1} timed steps per method")
    results = {}
    for method in METHODS:
        cmd = [sys.executable, __file__, "--worker", method, "--workdir", str(workdir), "--steps", str(steps),
               "--batch_size", str(args.batch_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    cuda = results["nll"]["device"] != "cpu"
    print(f"device: {results['nll']['device']}; {results['nll']['params'] / 1e6:.1f} M parameters")
    for method, r in results.items():
        extra = f", one-time reference pass {r['reference_pass_s']:.1f} s" if "reference_pass_s" in r else ""
        layout = r.get("layout", "left/right padded")
        line = (f"{method:15s} {r['tokens_per_s']:9.1f} real tokens/s  padding {r['padding']:.2f} ({layout})  "
                f"peak memory {r['peak_memory_mb']:.0f} MB{extra}")
        if cuda:
            name = next((k for k in PEAK_BF16_TFLOPS if k in r["device"]), None)
            mfu = f"{100 * r['achieved_tflops'] / PEAK_BF16_TFLOPS[name]:.1f}%" if name else "n/a"
            line += f"  {r['achieved_tflops']:.1f} TFLOP/s, MFU {mfu}"
        print(line)
    print(f"padding if only length-grouped (no packing): {results['a_lol']['padding_grouped']:.2f}")
    print(f"ratio a_lol/nll = {results['a_lol']['tokens_per_s'] / results['nll']['tokens_per_s']:.3f}")
    print(f"ratio a_lol/original_style = "
          f"{results['a_lol']['tokens_per_s'] / results['original_style']['tokens_per_s']:.3f}")
    print(f"padding = {results['a_lol']['padding']:.3f}")
    print(f"peak_memory a_lol/nll = {results['a_lol']['peak_memory_mb'] / results['nll']['peak_memory_mb']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

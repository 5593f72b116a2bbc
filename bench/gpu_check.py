"""The driver of bench/gpu_check.sh: the GPU path's checks, one line each, then a summary.

    python bench/gpu_check.py            # on the GPU machine (bench/gpu_check.sh installs the wheels first)
    python bench/gpu_check.py --cpu      # the same checks on a tiny model on the CPU (CI), GPU-only ones skipped

Lines: ``CHECK <name> PASS|FAIL|SKIP <details>``, then ``SUMMARY <n> passed, <n> failed, <n> skipped``.
The exit status is 1 when a check failed. Checks:

* ``throughput``: bench/throughput.py (its own command line) in bf16 on CUDA: real tokens/s,
  peak memory (max_memory_allocated) and MFU of nll, a_lol and original_style;
* ``qlora_paged``: 4-bit NF4 base (bitsandbytes) + LoRA, a few A-LoL steps with bitsandbytes'
  paged AdamW; the loss is finite and the adapter moves;
* ``resume_fsdp`` / ``resume_zero3`` (one process, ``accelerate launch``): a run stopped after 2
  steps and resumed from its sharded checkpoint ends equal to an uninterrupted run (on the CPU:
  ``resume_plain``, the same through the safetensors checkpoint);
* ``packing_varlen``: flash-attention 2 (or a hub kernel), packed with ``cu_seq_lens`` vs padded
  log-probs, max difference <= 1e-3 in bf16.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS: list[tuple[str, str, str]] = []


def report(name: str, status: str, details: str) -> None:
    RESULTS.append((name, status, details))
    print(f"CHECK {name} {status} {details}", flush=True)


def guarded(name: str, check, *args, **kwargs) -> None:
    """A check that raises is a FAIL line naming the error, and the next check still runs."""
    try:
        check(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line of the report
        report(name, "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run(cmd: list[str], timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def last_error(proc: subprocess.CompletedProcess) -> str:
    lines = [l for l in (proc.stderr or proc.stdout).strip().splitlines() if l.strip()]
    return lines[-1][:300] if lines else f"exit {proc.returncode}"


# ------------------------------------------------------------------------------------------- models
def build_models(root: Path, cuda: bool) -> dict[str, str]:
    """A tokenizer and Llama models from configs (no hub): ``big`` ~1.1B (TinyLlama's shape) on
    CUDA, ``small`` for the resume runs; on the CPU both are tiny."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lolrl.demo import task as demo_task
    from lolrl.demo.tiny import train_tokenizer

    tokenizer = train_tokenizer(demo_task.corpus(), root / "tokenizer", with_pad=False)
    shapes = {"big": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                          num_key_value_heads=4, vocab_size=32000),
              "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=8, vocab_size=len(tokenizer))}
    if not cuda:
        shapes = {name: dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=2, vocab_size=len(tokenizer)) for name in shapes}
    paths = {}
    for name, shape in shapes.items():
        torch.manual_seed(0)
        config = LlamaConfig(**shape, max_position_embeddings=1024, tie_word_embeddings=False,
                             bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = LlamaForCausalLM(config).to(torch.bfloat16 if name == "big" and cuda else torch.float32)
        model.save_pretrained(str(root / name))
        tokenizer.save_pretrained(str(root / name))
        paths[name] = str(root / name)
        del model
    return paths


# ------------------------------------------------------------------------------------------- checks
def check_throughput(quick: bool, timeout: int, model_path: str | None = None) -> None:
    """``model_path``: the ~1.1B Llama on CUDA (the default GPT-2 6x512 is too small to load a GPU)."""
    cmd = [sys.executable, "bench/throughput.py"] + (["--quick", "--steps", "2", "--batch_size", "2"] if quick else [])
    if model_path:
        cmd += ["--model_path", model_path]
    try:
        proc = run(cmd, timeout)
    except subprocess.TimeoutExpired:
        return report("throughput", "FAIL", f"over {timeout} s")
    if proc.returncode:
        return report("throughput", "FAIL", last_error(proc))
    model = next((l for l in proc.stdout.splitlines() if l.startswith(("data:", "device:"))), "")
    found = throughput_figures(proc.stdout)
    missing = {"nll", "a_lol", "original_style"} - found.keys()
    if missing:
        return report("throughput", "FAIL", f"no figures for {sorted(missing)} in bench/throughput.py's output")
    figures = "; ".join(f"{k} {f['tokens_s']} tok/s, MFU {f['mfu'] or 'n/a (cpu)'}, peak {f['peak_mb']} MB"
                        for k, f in found.items())
    report("throughput", "PASS", f"{figures} [{model.strip()}]")


THROUGHPUT_ROW = re.compile(r"^(nll|a_lol|original_style)\s+real tokens/s min\s+[\d.]+\s+median\s+([\d.]+)\s.*?"
                            r"peak memory (\d+) MB(?:.*MFU ([\d.]+%|n/a))?")


def throughput_figures(stdout: str) -> dict[str, dict]:
    """Per method of bench/throughput.py's table: median real tokens/s, peak memory (MB), MFU (None on a CPU)."""
    return {m[1]: {"tokens_s": m[2], "peak_mb": m[3], "mfu": m[4]}
            for m in map(THROUGHPUT_ROW.match, stdout.splitlines()) if m}


def check_qlora_paged(models: dict, cuda: bool, steps: int = 4) -> None:
    if not cuda:
        return report("qlora_paged", "SKIP", "needs CUDA (bitsandbytes 4-bit)")
    if not have("bitsandbytes"):
        return report("qlora_paged", "SKIP", "no bitsandbytes wheel in the wheel folder")
    import bitsandbytes as bnb
    import torch

    from lolrl.engine.collation import Collator, Tokenizer
    from lolrl.engine.data import Record
    from lolrl.engine.losses import compute_loss
    from lolrl.engine.modeling import LoraSettings, load_model, load_tokenizer, response_logprobs

    started = time.time()
    tokenizer = load_tokenizer(models["big"])
    model = load_model(models["big"], dtype="bf16", lora=LoraSettings(r=16), load_in_4bit=True)
    if not getattr(getattr(model, "base_model", model), "is_loaded_in_4bit", False):
        return report("qlora_paged", "FAIL", "the base did not load in 4 bits")
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = bnb.optim.PagedAdamW(params, lr=1e-3)
    rows = Tokenizer(tokenizer, False, 256, 64)([Record(id=str(i), prompt="hello " * (20 + 7 * i),
                                                        response="a kind answer " * (3 + i)) for i in range(8)])
    batch = {k: v.cuda() for k, v in Collator(tokenizer.pad_token_id, False)(rows).items()}
    ref, _, _ = response_logprobs(model, batch)
    advantages = torch.linspace(-0.5, 1.0, len(rows), device="cuda")
    losses = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logprobs, mask, _ = response_logprobs(model, batch)
            loss, _ = compute_loss("a_lol", logprobs, mask, advantages=advantages, ref_logprobs=ref.detach(), clip=0.9)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    moved = max(float((p - b).abs().max()) for p, b in zip(params, before))
    ok = all(map(lambda x: x == x and abs(x) != float("inf"), losses)) and moved > 0
    report("qlora_paged", "PASS" if ok else "FAIL",
           f"{steps} A-LoL steps, PagedAdamW, losses {[round(x, 4) for x in losses]}, adapter moved {moved:.2e}, "
           f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MB, {time.time() - started:.0f} s")


def _train_cmd(launch: list[str], model: str, task: Path, out: Path, *extra: str) -> list[str]:
    from lolrl.demo import task as demo_task

    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--dynamo_backend", "no", *launch, str(ROOT / "train_generation_task_with_off_policy_PG.py"),
            "-i", str(task), "-tn", "toy", "--reward", demo_task.REWARD_SPEC, "-m", model, "-o", str(out),
            "-algo", "a_lol", "-t", "-e", "1", "-bs", "4", "-v_bs", "8", "-ml", "8", "--num_beams", "1", "-vf", "1",
            "--max_steps", "4", "--save_steps", "1", "-lr", "1e-4", "--no_test", *extra]


def check_resume(name: str, launch: list[str], models: dict, task: Path, work: Path, timeout: int,
                 engine: str | None) -> None:
    """Uninterrupted 4 steps vs 2 steps, stop, resume to 4: the trainable parameters must be equal."""
    from safetensors.torch import load_file

    from lolrl.utils.checkpoint import latest_hf_checkpoint

    whole, split = work / f"{name}_whole", work / f"{name}_split"
    started = time.time()
    for out, extra in ((whole, ()), (split, ("--stop_after_steps", "2")), (split, ())):
        try:
            proc = run(_train_cmd(launch, models["small"], task, out, *extra), timeout)
        except subprocess.TimeoutExpired:
            return report(name, "FAIL", f"a run took over {timeout} s")
        if proc.returncode:
            return report(name, "FAIL", last_error(proc))
    if "resuming from" not in proc.stderr + proc.stdout:
        return report(name, "FAIL", "the second run of the stopped one did not resume from its checkpoint")
    final = latest_hf_checkpoint(split / "checkpoints")
    names = {p.name for p in final.iterdir()}
    written_by = ("fsdp" if any(n.startswith("pytorch_model_fsdp") for n in names) else
                  "deepspeed" if any(n.startswith("global_step") for n in names) else None)
    if written_by != engine:
        return report(name, "FAIL",
                      f"the Trainer's checkpoint is in the {written_by or 'plain'} format, expected {engine}")
    # the best models (gathered by every engine into a plain folder): equal when the resume was exact
    a = load_file(str(whole / "model" / "model.safetensors"))
    b = load_file(str(split / "model" / "model.safetensors"))
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if a.keys() == b.keys() else float("inf")
    report(name, "PASS" if diff <= 1e-6 else "FAIL",
           f"stopped at 2, resumed to 4 vs uninterrupted: max |diff| {diff:.2e} over {len(a)} tensors "
           f"(checkpoint format: {engine or 'safetensors'}), {time.time() - started:.0f} s")


def check_packing_varlen(models: dict, cuda: bool, tolerance: float = 1e-3) -> None:
    if not cuda:
        return report("packing_varlen", "SKIP", "needs CUDA (flash-attention kernels)")
    implementation = "flash_attention_2" if have("flash_attn") else "kernels-community/flash-attn2" if have(
        "kernels") else None
    if implementation is None:
        return report("packing_varlen", "SKIP", "no flash_attn (or kernels) wheel in the wheel folder")
    import torch
    from transformers import AutoModelForCausalLM

    from lolrl.engine.collation import Collator, Tokenizer
    from lolrl.engine.data import Record
    from lolrl.engine.modeling import choose_packing, load_tokenizer, response_logprobs

    tokenizer = load_tokenizer(models["big"])
    model = AutoModelForCausalLM.from_pretrained(models["big"], dtype=torch.bfloat16,
                                                 attn_implementation=implementation).cuda().eval()
    rows = Tokenizer(tokenizer, False, 512, 128)([Record(id=str(i), prompt="tell me " * (10 + 37 * i),
                                                         response="sure " * (5 + 11 * i)) for i in range(8)])
    layout = choose_packing(model, rows, tokenizer.pad_token_id, "auto", tolerance=tolerance)
    with torch.no_grad():
        padded, mask, _ = response_logprobs(model, {k: v.cuda() for k, v in Collator(
            tokenizer.pad_token_id, False)(rows).items()})
        packed, _, _ = response_logprobs(model, {k: v.cuda() for k, v in Collator(
            tokenizer.pad_token_id, False, pack="varlen")(rows).items()})
    diff = float(((padded.float() - packed.float()).abs() * mask).max())
    ok = layout == "varlen" and diff <= tolerance
    report("packing_varlen", "PASS" if ok else "FAIL",
           f"{implementation}: choose_packing(auto) = {layout}; packed (cu_seq_lens) vs padded log-probs "
           f"max |diff| {diff:.2e} (<= {tolerance:g}, bf16) over {int(mask.sum())} tokens")


def check_liger(models: dict, cuda: bool, tolerance: float = 2e-3) -> None:
    """Liger's fused kernel against the chunked output layer on CUDA: log-probs and gradients of a
    weighted sum (fp32 model; Triton's dots may run in TF32), soft-capping included, and the step's
    time and peak memory on the ~1.1B Llama in bf16. The CPU side is tests/engine/test_liger.py."""
    if not cuda:
        return report("liger", "SKIP", "needs CUDA (tests/engine/test_liger.py runs the kernels under Triton's "
                      "interpreter)")
    if not have("liger_kernel"):
        return report("liger", "SKIP", "no liger_kernel wheel in the wheel folder")
    import torch

    from lolrl.engine.collation import Collator, Tokenizer
    from lolrl.engine.data import Record
    from lolrl.engine.modeling import (
        LogitTransform,
        choose_logprob_kernel,
        head_logprobs,
        load_model,
        load_tokenizer,
        response_outputs,
    )

    def step(model, batch, kernel):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=next(model.parameters()).dtype != torch.float32):
            out = response_outputs(model, batch, kernel=kernel)
            weights = torch.linspace(-1.0, 1.5, out.logprobs.numel(), device="cuda").view_as(out.logprobs)
            (out.logprobs * out.mask * weights).sum().backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        return out.logprobs.detach().float(), grads, time.perf_counter() - started, torch.cuda.max_memory_allocated()

    tokenizer = load_tokenizer(models["small"])
    rows = Tokenizer(tokenizer, False, 512, 128)([Record(id=str(i), prompt="tell me " * (10 + 37 * i),
                                                         response="sure " * (5 + 11 * i)) for i in range(8)])
    batch = {k: v.cuda() for k, v in Collator(tokenizer.pad_token_id, False)(rows).items()}
    small = load_model(models["small"]).cuda().eval()
    chosen = choose_logprob_kernel(small, "auto", "cuda")
    chunked, chunked_grads, _, _ = step(small, batch, "chunked")
    fused, fused_grads, _, _ = step(small, batch, "liger")
    lp_diff = float((fused - chunked).abs().max())
    grad_diff = max(float((fused_grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12))
                    for n, g in chunked_grads.items())
    layer = torch.nn.Linear(64, 1000, bias=False).cuda()
    hidden, targets = torch.randn(300, 64, device="cuda"), torch.randint(0, 1000, (300,), device="cuda")
    cap = LogitTransform(softcap=5.0)
    with torch.no_grad():
        softcap_diff = float((head_logprobs(layer, hidden, targets, transform=cap, kernel="liger")[0]
                              - head_logprobs(layer, hidden, targets, transform=cap)[0]).abs().max())
    del small
    big = load_model(models["big"], dtype="bf16").cuda().eval()
    timings = {k: step(big, batch, k)[2:] for k in ("chunked", "liger", "chunked", "liger")}  # second of each kept
    ok = chosen[0] == "liger" and max(lp_diff, softcap_diff) <= tolerance and grad_diff <= tolerance
    report("liger", "PASS" if ok else "FAIL",
           f"auto chose {chosen[0]}; fp32 Llama: log-prob max |diff| {lp_diff:.2e}, gradient max relative diff "
           f"{grad_diff:.2e}, soft-capped log-probs {softcap_diff:.2e} (<= {tolerance:g}); ~1.1B bf16 step: "
           + ", ".join(f"{k} {t * 1e3:.0f} ms peak {m / 2**20:.0f} MB" for k, (t, m) in timings.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny models on the CPU; GPU-only checks skipped")
    parser.add_argument("--only", default=None, help="comma-separated check names (default: all)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    wanted = set(args.only.split(",")) if args.only else None
    selected = lambda name: wanted is None or name in wanted  # noqa: E731
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"gpu_check: {'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU mode'}; torch {torch.__version__}; "
          f"workdir {work}", flush=True)
    from lolrl.demo import task as demo_task

    models = build_models(work / "models", cuda)
    task = demo_task.write_task(work / "task", n_train=48, n_val=8, n_test=4)
    limit = 150 if cuda else 120
    if selected("throughput"):
        guarded("throughput", check_throughput, quick=not cuda, timeout=240 if cuda else 180,
                model_path=models["big"] if cuda else None)
    if selected("qlora_paged"):
        guarded("qlora_paged", check_qlora_paged, models, cuda)
    if not cuda and selected("resume_plain"):
        guarded("resume_plain", check_resume, "resume_plain", ["--cpu", "--mixed_precision", "no"], models, task,
                work, limit, None)
    if selected("resume_fsdp"):
        if not cuda:
            report("resume_fsdp", "SKIP", "Accelerate runs FSDP only on GPUs (on the CPU it falls back to DDP)")
        else:
            fsdp = ["--use_fsdp", "--fsdp_version", "2", "--mixed_precision", "bf16",
                    "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]
            guarded("resume_fsdp", check_resume, "resume_fsdp", fsdp, models, task, work, limit, "fsdp")
    if selected("resume_zero3"):
        if not cuda:
            report("resume_zero3", "SKIP", "DeepSpeed ZeRO-3 needs CUDA")
        elif not have("deepspeed"):
            report("resume_zero3", "SKIP", "no deepspeed wheel in the wheel folder")
        else:
            zero3 = ["--use_deepspeed", "--zero_stage", "3", "--mixed_precision", "bf16",
                     "--zero3_save_16bit_model", "true"]
            guarded("resume_zero3", check_resume, "resume_zero3", zero3, models, task, work, limit, "deepspeed")
    if selected("packing_varlen"):
        guarded("packing_varlen", check_packing_varlen, models, cuda)
    if selected("liger"):
        guarded("liger", check_liger, models, cuda)
    counts = {s: sum(r[1] == s for r in RESULTS) for s in ("PASS", "FAIL", "SKIP")}
    print(f"SUMMARY {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"in {time.time() - started:.0f} s", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())

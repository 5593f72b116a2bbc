"""Liger's fused linear cross-entropy as the log-prob kernel: the same log-probs and gradients as the
chunked output layer, chosen only where it applies, refused loudly where asked and impossible.

Liger's kernels are Triton; without CUDA they run here under Triton's interpreter (conftest.py sets
``TRITON_INTERPRET=1`` before anything imports triton), which executes the very kernels on the CPU."""
import json
from pathlib import Path

import pytest
import torch
from conftest import status_of
from logprob_cases import CHUNK, logprobs_and_grads
from logprob_cases import setup as _setup

from lolrl.engine import liger
from lolrl.engine.modeling import (
    LogitTransform,
    LoraSettings,
    choose_logprob_kernel,
    head_logprobs,
    load_model,
    response_outputs,
)
from lolrl.utils.errors import ConfigError

pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (pip install -e .[liger])")
pytestmark = pytest.mark.skipif(liger.installed_version() < liger.LIGER_MIN_VERSION,
                                reason="liger-kernel older than 0.8.5")


def _logprobs_and_grads(model, batch, kernel):
    return logprobs_and_grads(model, batch, CHUNK, kernel, lowest_weight=-1.0)  # A-LoL-like signed weights


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("kind", ["causal", "llama", "seq2seq"])
def test_liger_logprobs_and_gradients_equal_chunked(tiny_models, kind, lora):
    model, batch = _setup(tiny_models, kind, lora)
    assert choose_logprob_kernel(model, "liger", "cpu")[0] == "liger"
    chunked, chunked_grads = _logprobs_and_grads(model, batch, "chunked")
    fused, fused_grads = _logprobs_and_grads(model, batch, "liger")
    torch.testing.assert_close(fused, chunked, atol=1e-5, rtol=0)
    assert chunked_grads and chunked_grads.keys() == fused_grads.keys()
    assert all("lora" in n for n in chunked_grads) == lora
    for name, grad in chunked_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    with torch.no_grad():  # the reference pass: no gradients
        torch.testing.assert_close(response_outputs(model, batch, kernel="liger").logprobs, chunked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("transform", [LogitTransform(scale=0.5, divide=1.25), LogitTransform(scale=3.0)],
                         ids=["granite_and_cohere", "cohere"])
def test_liger_applies_the_models_logit_scale(transform):
    """Cohere's ``logit_scale`` and Granite's ``logits_scaling``, folded into the hidden states."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 50, bias=False)
    hidden, targets = torch.randn(13, 8, requires_grad=True), torch.randint(0, 50, (13,))
    expected = transform(layer(hidden)).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    weights = torch.randn(13)
    (expected * weights).sum().backward()
    want = hidden.grad.clone(), layer.weight.grad.clone()
    hidden.grad = layer.weight.grad = None
    fused, _ = head_logprobs(layer, hidden, targets, transform=transform, kernel="liger")
    (fused * weights).sum().backward()
    torch.testing.assert_close(fused, expected.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.grad, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.weight.grad, want[1], atol=1e-5, rtol=1e-5)


def test_liger_softcapping_is_refused_off_cuda():
    """Gemma's soft-capping is Liger's own, but Triton's interpreter cannot run it (a scalar argument
    arrives as a Python float): refused here, checked on CUDA by bench/gpu_check.py (liger)."""
    layer = torch.nn.Linear(8, 50, bias=False)
    with pytest.raises(ConfigError, match="soft-capping runs on CUDA only"):
        head_logprobs(layer, torch.randn(3, 8), torch.zeros(3, dtype=torch.long),
                      transform=LogitTransform(softcap=30.0), kernel="liger")


def test_auto_takes_liger_only_on_cuda(tiny_models, monkeypatch):
    model, _ = _setup(tiny_models, "llama", False)
    kernel, why = choose_logprob_kernel(model, "auto", "cpu")
    assert kernel == "chunked" and "CUDA" in why  # auto never runs the interpreter
    assert choose_logprob_kernel(model, "chunked", "cpu")[0] == "chunked"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="--logprob_kernel liger: its Triton kernels run on CUDA"):
        choose_logprob_kernel(model, "liger", "cpu")


@pytest.mark.parametrize("case, message", [
    ("lora_on_output_layer", "not a plain Linear"),
    ("sharded", "sharded"),
    ("not_installed", "not installed"),
    ("too_old", "older than 0.8.5"),
])
def test_liger_refused_where_it_cannot_apply(tiny_models, monkeypatch, case, message):
    lora = LoraSettings(r=4, dropout=0.0, target_modules="q_proj,lm_head") if case == "lora_on_output_layer" else None
    model = load_model(tiny_models["llama"], lora=lora)
    if case == "not_installed":
        monkeypatch.setattr(liger, "installed_version", lambda: None)
    if case == "too_old":
        monkeypatch.setattr(liger, "installed_version", lambda: (0, 6, 4))
    with pytest.raises(ConfigError, match=message):
        choose_logprob_kernel(model, "liger", "cpu", sharded=case == "sharded")
    kernel, why = choose_logprob_kernel(model, "auto", "cpu", sharded=case == "sharded")
    assert kernel == "chunked"


@pytest.mark.slow
def test_training_with_liger_equals_chunked(tmp_path, tiny_models, toy_dir, toy_reward_spec, caplog):
    """The paper script, a_lol for 3 steps: the reference pass, the loss and validation through Liger give
    the run the chunked kernel gives."""
    from script_args import args_for

    from lolrl.tasks.paper.cli import main

    logs = {}
    for kernel in ("liger", "chunked"):
        out = tmp_path / kernel
        caplog.clear()
        with caplog.at_level("INFO"):
            assert main(args_for(toy_dir, tiny_models["llama"], out, "a_lol", toy_reward_spec, "--logprob_kernel",
                                 kernel, "--logging_steps", "1")) == 0
        assert f"log-probs: {kernel}" in caplog.text
        logs[kernel] = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(logs["liger"]) == 3
    for fused, chunked in zip(logs["liger"], logs["chunked"]):
        for key in ("loss", "nll", "importance_weight"):
            assert fused[key] == pytest.approx(chunked[key], rel=1e-4, abs=1e-5), key


def test_script_refuses_liger_where_it_cannot_run(tmp_path, tiny_models, toy_dir, toy_reward_spec, monkeypatch,
                                                  capsys):
    from script_args import args_for

    from lolrl.tasks.paper.cli import main

    monkeypatch.delenv("TRITON_INTERPRET")
    argv = args_for(toy_dir, tiny_models["causal"], tmp_path / "out", "a_lol", toy_reward_spec,
                    "--logprob_kernel", "liger")
    assert status_of(main, argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # after the model's loading log
    assert len(errors) == 1 and errors[0].startswith("error: --logprob_kernel liger: its Triton kernels run on CUDA")
    assert "Traceback" not in err


@pytest.mark.slow
def test_ppo_reference_logprobs_through_liger(hh_fixture, caplog):
    """PPO's reference log-probs through Liger, the policy's chunked: at the first rollout the policy is
    the reference (the starting adapter twice), so the KL between the two kernels' log-probs is 0."""
    import sys

    ROOT = Path(__file__).resolve().parents[2]

    sys.path.insert(0, str(ROOT))
    from ppo_qlora_llama_hh import main as ppo_main

    tmp_path, args = hh_fixture
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        assert ppo_main(args + ["--output_dir", str(out), "--total_steps", "1", "--eval_steps", "1",
                                "--logprob_kernel", "liger"]) == 0
    assert "reference log-probs: liger" in caplog.text
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["kl"] == pytest.approx(0.0, abs=1e-5)


def test_trl_trainers_refuse_the_liger_setting(hh_fixture, capsys):
    import sys

    ROOT = Path(__file__).resolve().parents[2]

    sys.path.insert(0, str(ROOT))
    from ppo_qlora_llama_hh import main as ppo_main

    tmp_path, args = hh_fixture
    assert ppo_main(args + ["--output_dir", str(tmp_path / "out"), "--trainer", "grpo", "--total_steps", "1",
                            "--logprob_kernel", "liger"]) == 2
    assert "error: --logprob_kernel liger is lolrl's PPO trainer's (--trainer ppo)" in capsys.readouterr().err

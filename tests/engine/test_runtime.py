"""The run's Accelerate set-up (lolrl/engine/runtime.py)."""
from types import SimpleNamespace

from lolrl.engine.runtime import make_accelerator


def test_runs_of_other_precisions_follow_each_other_in_one_process(tmp_path):
    """Accelerate's state is process-wide: a bf16 run after an fp32 one (a notebook, a sweep) gets bf16,
    not 'AcceleratorState has already been initialized and cannot be changed'."""
    def settings(dtype):
        return SimpleNamespace(dtype=dtype, report_to="none", output_dir=str(tmp_path), seed=0)

    assert make_accelerator(settings("fp32")).mixed_precision == "no"
    assert make_accelerator(settings("bf16"), accumulation_steps=2).mixed_precision == "bf16"
    again = make_accelerator(settings("fp32"))
    assert again.mixed_precision == "no" and again.gradient_accumulation_steps == 1

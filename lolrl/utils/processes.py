"""Decisions every process must take alike.

With several processes (DDP, FSDP, DeepSpeed) a branch that one process takes and another does not
leaves their collectives out of step, and the run hangs. Whatever each process decides on its own
(a cache entry found, a step's numbers finite) goes through one of these before it steers a branch.
``accelerator`` is an ``accelerate.Accelerator`` (or None: one process).
"""
from __future__ import annotations

import torch

from lolrl.utils.errors import UserError


def _count(accelerator, flag: bool) -> int:
    return int(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum"))


def on_every_process(accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is true on every process, else False on every process."""
    if accelerator is None or accelerator.num_processes == 1:
        return flag
    return _count(accelerator, flag) == accelerator.num_processes


def on_any_process(accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is true on at least one."""
    if accelerator is None or accelerator.num_processes == 1:
        return flag
    return _count(accelerator, flag) > 0


def wait_for_everyone(accelerator) -> None:
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def decided_on_main(accelerator, decide):
    """``decide()`` run on the main process, its result (or the user error it raised) the same on
    every process, which wait for it: for choices read from files another process may see
    half-written (which checkpoint to resume), and for writes on the main process whose refusal
    (non-finite weights) must stop every process."""
    if accelerator is None or accelerator.num_processes == 1:
        return decide()
    outcome = [None]
    if accelerator.is_main_process:
        try:
            outcome = [("value", decide())]
        except UserError as exc:
            outcome = [("error", exc)]
    from accelerate.utils import broadcast_object_list

    broadcast_object_list(outcome)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def launched_as_main() -> bool:
    """Before any Accelerator exists: whether the launcher (torchrun, accelerate launch) made this the
    main process (``RANK`` 0, or no launcher)."""
    import os

    return os.environ.get("RANK", "0") == "0"

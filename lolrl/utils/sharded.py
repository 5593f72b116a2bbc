"""Checkpoints of sharded runs (FSDP, DeepSpeed): each process writes and reads its own shard.

Under FSDP and DeepSpeed ZeRO no process holds the whole optimizer state (nor, under FSDP or
ZeRO-3, the whole model), so one process cannot save it and it cannot be loaded into every
process. For these engines the checkpoint folder gets a ``shards/`` subfolder written the way
Accelerate's ``save_state`` writes it for that engine:

* FSDP (1 or 2): ``torch.distributed.checkpoint`` folders ``shards/pytorch_model_fsdp_0/`` and
  ``shards/optimizer_0/`` (``SHARDED_STATE_DICT``: each process writes its ``__<rank>_0.distcp``);
* DeepSpeed: the engine's own ``save_checkpoint`` under ``shards/model/`` (each process its
  ``*_optim_states.pt`` partition, plus the model states).

Everything else (scheduler, step, sampler position, best model, RNG states of every process)
stays in the safetensors/JSON files of :mod:`lolrl.utils.checkpoint`, as in single-process and
DDP runs. Every function here is a collective: every process calls it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from lolrl.utils.errors import ConfigError
from lolrl.utils.manifest import IntegrityError
from lolrl.utils.processes import decided_on_main
from lolrl.utils.trainable import load_trainable

SHARDS = "shards"  # the subfolder of a checkpoint that holds the engine's shards
DEEPSPEED_TAG = "model"  # the tag Accelerate's save_state gives the first DeepSpeed engine


def sharding_engine(accelerator) -> str | None:
    """``"fsdp"`` or ``"deepspeed"`` when optimizer state is split across processes, else None."""
    from accelerate.utils import DistributedType

    return {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}.get(accelerator.distributed_type)


def shards_parameters(accelerator) -> bool:
    """Whether the parameters themselves are split across processes (FSDP, DeepSpeed ZeRO-3)."""
    engine = sharding_engine(accelerator)
    if engine == "deepspeed":
        return getattr(accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3
    return engine == "fsdp"


@contextlib.contextmanager
def _sharded_state_dicts(plugin):
    """FSDP state dicts as shards (each process its own), whatever the run's setting for final saves."""
    from torch.distributed.fsdp import ShardedOptimStateDictConfig, ShardedStateDictConfig, StateDictType

    before = (plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config)
    plugin.state_dict_type = StateDictType.SHARDED_STATE_DICT
    plugin.state_dict_config = ShardedStateDictConfig(offload_to_cpu=True)
    plugin.optim_state_dict_config = ShardedOptimStateDictConfig(offload_to_cpu=True)
    try:
        yield
    finally:
        plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config = before


def save_shards(accelerator, model, optimizer, folder: Path) -> None:
    """Write this process's shard of the (prepared) model and optimizer under ``folder``."""
    engine = sharding_engine(accelerator)
    if engine == "deepspeed":
        model.save_checkpoint(str(folder), DEEPSPEED_TAG)
    elif engine == "fsdp":
        from accelerate.utils import save_fsdp_model, save_fsdp_optimizer

        plugin = accelerator.state.fsdp_plugin
        with _sharded_state_dicts(plugin):
            save_fsdp_model(plugin, accelerator, model, str(folder))
            save_fsdp_optimizer(plugin, accelerator, optimizer, model, str(folder))
    else:
        raise ValueError("save_shards is for FSDP and DeepSpeed runs")
    accelerator.wait_for_everyone()


def load_shards(accelerator, model, optimizer, folder: Path, engine: str) -> None:
    """Read this process's shard of the model and optimizer written by :func:`save_shards`."""
    if sharding_engine(accelerator) != engine:
        raise ConfigError(f"the checkpoint {folder.parent} holds {engine} shards: resume it under {engine} "
                          f"(this run uses {sharding_engine(accelerator) or 'no sharding'})")
    if engine == "deepspeed":
        model.load_checkpoint(str(folder), DEEPSPEED_TAG, load_module_strict=True)
    else:
        from accelerate.utils import load_fsdp_model, load_fsdp_optimizer

        plugin = accelerator.state.fsdp_plugin
        with _sharded_state_dicts(plugin):
            load_fsdp_model(plugin, accelerator, model, str(folder))
            load_fsdp_optimizer(plugin, accelerator, optimizer, model, str(folder))
    accelerator.wait_for_everyone()


def trainable_state(accelerator, model, full_state: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The trainable parameters, whole, on the CPU (gathered from shards under FSDP / ZeRO-3: a
    collective unless ``full_state``, the gathered ``accelerator.get_state_dict(model)``, is given)."""
    names = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    full_state = accelerator.get_state_dict(model) if full_state is None else full_state
    return {k: v.detach().cpu().clone() for k, v in full_state.items() if k in names}


def restore_trainable(accelerator, model, state: dict[str, torch.Tensor]) -> bool:
    """Put whole trainable parameters (as :func:`trainable_state` gave them; under FSDP only the main
    process's copy is full) back into the prepared model, strictly: exactly the trainable parameters'
    names (and, unsharded, shapes and dtypes). Returns False where that is not done (FSDP1,
    DeepSpeed): the caller says so."""
    engine = sharding_engine(accelerator)
    if engine == "fsdp" and getattr(accelerator, "is_fsdp2", False):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        names = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}

        def check_names() -> None:  # only the main process holds the whole state (broadcast_from_rank0)
            if set(state) != names:
                raise IntegrityError(f"the best model's parameters are not this model's trainable ones "
                                     f"({len(set(state) ^ names)} names differ)")

        decided_on_main(accelerator, check_names)  # a refusal stops every process, not the main one alone
        # only the trainable subset is given (the frozen weights are the starting model's), names checked above
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                     strict=False))
        return True
    if engine is not None:
        return False
    load_trainable(accelerator.unwrap_model(model), state, "the best model's parameters")
    return True

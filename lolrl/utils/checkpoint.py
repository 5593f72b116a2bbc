"""Training checkpoints that survive a crash: verified before they are resumed.

The offline trainer (a ``transformers.Trainer``) writes the Trainer's checkpoints
``OUTPUT/checkpoints/checkpoint-N``, sealed by :class:`lolrl.engine.callbacks.CheckpointSeal`
(:data:`SEAL`, ``best.safetensors``, the manifest last; see the end of this module). PPO, which
keeps its own loop, writes its own: a checkpoint folder ``OUTPUT/checkpoints/step_000120`` holds

* ``trainable.safetensors``: the trainable parameters (all weights, or only the LoRA adapter);
* ``optimizer.safetensors`` + ``state.json``: the optimizer's tensors and everything else as JSON
  (optimizer hyper-parameters, scheduler state, the step, the sampler position, the best
  validation measure, Python/NumPy RNG states);
* ``rng.safetensors``: the torch (and CUDA, where there is one) RNG state of every process (dropout);
* ``best.safetensors``: the trainable parameters of the best validation so far, if any.

* ``manifest.json``: the size, SHA-256 and tensor layout of every other file (written last).

Under FSDP and DeepSpeed the optimizer (and model) state is sharded across processes: there
``optimizer.safetensors`` is replaced by ``shards/``, each process writing and reading its own
shard (see :mod:`lolrl.utils.sharded`), and ``state.json`` says which engine wrote them.
``trainable.safetensors`` is then the gathered copy, for reading, not what a resume loads.

Nothing is pickled. The folder is written under a temporary name and renamed when complete, so
a run killed while saving leaves the previous checkpoint as the latest one. On resume every file
is verified against the manifest and the parameters are loaded strictly (the same names, shapes
and dtypes as the model's trainable parameters); a damaged checkpoint is skipped with a message
for the previous complete one, and with none intact the run refuses to start.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lolrl.utils.cache import hash_json, model_identity
from lolrl.utils.errors import ConfigError
from lolrl.utils.finite import check_finite_state
from lolrl.utils.io import atomic_write_json, read_jsonl, write_jsonl
from lolrl.utils.manifest import (
    MANIFEST,
    IntegrityError,
    verify_manifest,
    write_manifest,
)
from lolrl.utils.processes import decided_on_main
from lolrl.utils.sharded import SHARDS, load_shards, save_shards, sharding_engine
from lolrl.utils.trainable import load_trainable

logger = logging.getLogger(__name__)

PREFIX = "step_"
FAULT_ENV = "LOLRL_FAULT"  # test hook: kill the process at a named point (see inject_fault)


_FAULT_COUNTS: dict[str, int] = {}


def inject_fault(point: str) -> None:
    """Kill this process (SIGKILL, as a cluster scheduler or the OOM killer does) when the environment
    variable ``LOLRL_FAULT`` is ``point`` (the first time it is reached) or ``point:N`` (the N-th time);
    for the fault-injection tests. Points: before_manifest, before_checkpoint_rename, after_checkpoint_save
    (PPO's checkpoints); mid_checkpoint_save (the offline trainer's: the model written, the optimizer not yet)."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted or wanted.split(":")[0] != point:
        return
    _FAULT_COUNTS[point] = _FAULT_COUNTS.get(point, 0) + 1
    if _FAULT_COUNTS[point] == int(wanted.split(":")[1] if ":" in wanted else 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def temporary_folder(directory: Path, step: int, fresh: bool = True) -> Path:
    """Where ``step_{step}`` is written before it is renamed complete (``fresh``: emptied first)."""
    tmp = directory / f".tmp_{PREFIX}{step:06d}"
    if fresh:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(directory: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    progress: dict, best: dict[str, torch.Tensor] | None, keep: int = 2,
                    rng_states: list[dict[str, torch.Tensor]] | None = None, sharded_by: str | None = None) -> Path:
    """Write ``directory/step_{step}`` atomically and keep only the ``keep`` newest checkpoints.
    ``rng_states``: one per process (each process's dropout stream), default this process's.
    ``sharded_by`` (fsdp, deepspeed): the optimizer's shards are already in the temporary folder
    (:func:`lolrl.utils.sharded.save_shards`), so ``optimizer`` is not written here."""
    check_finite_state(trainable, f"checkpoint step {step}")
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{step:06d}"
    tmp = temporary_folder(directory, step, fresh=sharded_by is None)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    optimizer_meta = None
    if sharded_by is None:
        tensors, optimizer_meta = _optimizer_tensors(optimizer)
        save_file(tensors or {"__empty__": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
    states = rng_states or [rng_state()]
    save_file({f"{kind}_{i}": state for i, process in enumerate(states) for kind, state in process.items()},
              str(tmp / "rng.safetensors"))
    if best is not None:
        save_file({k: v.contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
    numpy_state = np.random.get_state()
    atomic_write_json(tmp / "state.json", {
        "step": step, "progress": progress, "optimizer": optimizer_meta, "sharded_by": sharded_by,
        "scheduler": scheduler.state_dict(), "python_rng": random.getstate(),
        "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    })
    inject_fault("before_manifest")
    write_manifest(tmp)
    inject_fault("before_checkpoint_rename")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    inject_fault("after_checkpoint_save")
    for old in sorted(directory.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(directory: Path) -> list[Path]:
    """Checkpoint folders, oldest first (temporary folders of an interrupted save are ignored)."""
    return [p for p in sorted(directory.glob(f"{PREFIX}*")) if p.is_dir()]


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint with a manifest (it is verified when resumed, see :func:`find_resumable`)."""
    done = [p for p in checkpoints(directory) if (p / MANIFEST).is_file()]
    return done[-1] if done else None


def _read_state(path: Path) -> dict:
    """``state.json``, checked for the fields and types a resume reads (else :class:`IntegrityError`)."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise IntegrityError(f"{path / 'state.json'}: unreadable") from None
    if not isinstance(state, dict):
        raise IntegrityError(f"{path / 'state.json'}: not a JSON object")
    sharded = state.get("sharded_by")  # fsdp / deepspeed: the optimizer lives in shards/, not here
    if sharded not in (None, "fsdp", "deepspeed"):
        raise IntegrityError(f"{path / 'state.json'}: field 'sharded_by' is {sharded!r}")
    expected = {"step": int, "progress": dict, "scheduler": dict, "python_rng": list, "numpy_rng": list,
                **({} if sharded else {"optimizer": dict})}
    for name, kind in expected.items():
        if not isinstance(state.get(name), kind):
            raise IntegrityError(f"{path / 'state.json'}: field '{name}' is missing or not a {kind.__name__}")
    if not sharded and (not isinstance(state["optimizer"].get("param_groups"), list) or
                        not isinstance(state["optimizer"].get("scalars"), dict)):
        raise IntegrityError(f"{path / 'state.json'}: the optimizer state is malformed")
    return state


def load_checkpoint(path: Path, model, optimizer, scheduler, process_index: int = 0
                    ) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Restore parameters, optimizer, scheduler and RNGs; returns (state, best parameters or None).
    The folder is verified against its manifest first; anything that does not fit raises IntegrityError.
    For a sharded checkpoint only scheduler and RNGs: the shards are read by every process
    (:func:`lolrl.utils.sharded.load_shards`, see :func:`resume_training_state`)."""
    verify_manifest(path)
    state = _read_state(path)
    try:
        if state.get("sharded_by") is None:
            load_trainable(model, load_file(str(path / "trainable.safetensors")), str(path / "trainable.safetensors"))
            tensors = {k: v for k, v in load_file(str(path / "optimizer.safetensors")).items() if k != "__empty__"}
            optimizer.load_state_dict(_optimizer_state(tensors, state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{path}: its optimizer or scheduler state does not fit this run ({exc})") from None
    set_rng_state(load_file(str(path / "rng.safetensors")), process_index)
    random.setstate((state["python_rng"][0], tuple(state["python_rng"][1]), state["python_rng"][2]))
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    best_path = path / "best.safetensors"
    return state, (load_file(str(best_path)) if best_path.is_file() else None)


def save_training_state(accelerator, directory: Path, step: int, trainable: dict[str, torch.Tensor], model,
                        optimizer, scheduler, progress: dict, best: dict[str, torch.Tensor] | None, keep: int) -> None:
    """A checkpoint of a running trainer (a collective: every process calls it). ``trainable``:
    the gathered trainable parameters (main process); ``model``/``optimizer``: as prepared."""
    accelerator.wait_for_everyone()
    rng_states = process_rng_states(accelerator)
    engine = sharding_engine(accelerator)
    if engine is not None:
        if accelerator.is_main_process:
            temporary_folder(directory, step)
        accelerator.wait_for_everyone()
        shards = temporary_folder(directory, step, fresh=False) / SHARDS
        save_shards(accelerator, model, optimizer, shards)
    # the main process writes; its refusal (a non-finite parameter) stops every process alike
    decided_on_main(accelerator, lambda: save_checkpoint(directory, step, trainable, optimizer, scheduler, progress,
                                                         best, keep=keep, rng_states=rng_states, sharded_by=engine))


def resume_training_state(accelerator, path: Path, model, optimizer, scheduler
                          ) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Restore a running trainer from ``path`` (a collective); returns (state, best parameters or None)."""
    engine = _read_state(path).get("sharded_by")
    if engine is not None:
        load_shards(accelerator, model, optimizer, path / SHARDS, engine)
    elif sharding_engine(accelerator) is not None:
        raise ConfigError(f"the checkpoint {path} was written without sharding: resume it without FSDP/DeepSpeed")
    return load_checkpoint(path, accelerator.unwrap_model(model), optimizer, scheduler, accelerator.process_index)


# The one list of what a run key leaves out (every trainer's, see :func:`run_key`): settings that only say
# when to stop, what to log, whether to reuse caches, or where the run's own folders are. A run resumed
# with other values, or from its output folder moved or copied elsewhere, is the same run.
NOT_IN_RUN_KEY = ("resume", "stop_after_steps", "save_steps", "keep_checkpoints", "save_total_limit", "report_to",
                  "logging_steps", "use_cache", "stage_cache", "do_test", "do_predict", "max_nonfinite_steps",
                  "output_dir", "save_dir", "cache_dir", "hub",
                  # the offline config's TrainingArguments fields of the same kind (where logs go, how often,
                  # which devices, the hub)
                  "logging_dir", "logging_strategy", "logging_first_step", "log_level", "log_level_replica",
                  "log_on_each_node", "disable_tqdm", "run_name", "project", "trackio_space_id", "trackio_bucket_id",
                  "trackio_static_space_id", "local_rank", "ddp_backend", "ddp_timeout", "dataloader_num_workers",
                  "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
                  "push_to_hub", "hub_token", "hub_model_id", "hub_private_repo", "hub_strategy", "hub_always_push",
                  "hub_revision", "resume_from_checkpoint", "skip_memory_metrics", "save_strategy",
                  "save_on_each_node", "use_cpu", "debug", "include_num_input_tokens_seen")
# Settings that name an input by its path: keyed by its contents (a moved copy is the same input, other
# weights at the same path are not).
INPUT_PATHS = ("model_name", "tokenizer_name", "adapter_path")


def run_key(settings: dict, **data_digests: str) -> str:
    """What a checkpoint must agree with to be resumed: every setting that can change the run's result
    (all but :data:`NOT_IN_RUN_KEY`; the models of :data:`INPUT_PATHS` by content), and the digests of
    its data (e.g. ``train=...``, ``val=...``), never where its folders live."""
    kept = {k: v for k, v in settings.items() if k not in NOT_IN_RUN_KEY}
    for name in INPUT_PATHS:
        if kept.get(name) is not None:
            kept[name] = model_identity(kept[name])
    return hash_json({"settings": kept, "data": data_digests})


def find_resumable(directory: Path, mode: str, key: str, accelerator=None, trainer_layout: bool = False
                   ) -> Path | None:
    """The checkpoint to resume (``mode``: auto, must, never): the newest that verifies against its
    manifest (a damaged one is skipped with a message), refusing one written by another run, and
    refusing to start when checkpoints exist but none is intact. With several processes the main one
    chooses and every process gets its choice (or its refusal). ``trainer_layout``: the offline
    trainer's (``checkpoint-N`` folders of ``transformers.Trainer``, sealed with :data:`SEAL`), else
    PPO's (``step_N`` with ``state.json``)."""
    found = decided_on_main(accelerator, lambda: _newest_intact(Path(directory), mode, key, trainer_layout))
    if found is not None:
        logger.info("resuming from %s (pass --no_resume to start over)", found)
    return found


def _newest_intact(directory: Path, mode: str, key: str, trainer_layout: bool) -> Path | None:
    listed = hf_checkpoints if trainer_layout else checkpoints
    if mode == "never" and trainer_layout:
        for old in listed(directory):  # starting over: the Trainer would rotate them among the new ones
            shutil.rmtree(old, ignore_errors=True)
    candidates = [] if mode == "never" else listed(directory)
    if mode == "must" and not candidates:
        raise ConfigError(f"--resume: no checkpoint in {directory}")
    for found in reversed(candidates):
        try:
            verify_manifest(found)
            written_by = read_seal(found)["run_key"] if trainer_layout else _read_state(found)["progress"].get(
                "run_key")
        except IntegrityError as exc:
            logger.warning("checkpoint %s is damaged (%s): trying the previous one", found.name, exc)
            continue
        if written_by != key:
            raise ConfigError(f"the checkpoint {found} was written by a run with other settings or data: "
                              "resume with the same flags, or pass --no_resume (or another output folder)")
        return found
    if candidates:
        raise IntegrityError(f"no intact checkpoint in {directory} ({len(candidates)} damaged or incomplete): "
                             "pass --no_resume to start over (or another output folder)")
    return None


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG state, and its current CUDA device's where there is one."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(saved: dict[str, torch.Tensor], process_index: int) -> None:
    """Restore this process's states from ``rng.safetensors`` (a process the run did not have
    takes process 0's); a CUDA state is restored only where there is a CUDA device."""
    index = process_index if f"torch_{process_index}" in saved else 0
    torch.set_rng_state(saved[f"torch_{index}"])
    if f"cuda_{index}" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved[f"cuda_{index}"])


def process_rng_states(accelerator) -> list[dict[str, torch.Tensor]]:
    """Every process's RNG states (:func:`rng_state`), gathered (a collective: every process calls it)."""
    states = [rng_state()]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        states = gather_object(states)
    return states


def drop_log_tail(output_dir: Path, step: int, names=("train_log.jsonl", "validation_stats.jsonl")) -> None:
    """Remove the log lines of steps after ``step`` (what a crashed run logged past its checkpoint)."""
    for name in names:
        path = output_dir / name
        if path.exists():
            write_jsonl(path, [e for e in read_jsonl(path) if e.get("step", 0) <= step])


# ---------------------------------------------------------------------- the Trainer's checkpoints
# The offline trainer's checkpoints are transformers.Trainer's (OUTPUT/checkpoint-N: model or adapter,
# optimizer, scheduler, RNG states, trainer_state.json), sealed by lolrl.engine.callbacks.CheckpointSeal
# with SEAL (the run key, the best measure), best.safetensors and, last, the manifest.
SEAL = "lolrl_seal.json"
HF_PREFIX = "checkpoint-"


def hf_checkpoints(directory: Path) -> list[Path]:
    """The Trainer's checkpoint folders in ``directory``, oldest first."""
    found = [p for p in Path(directory).glob(f"{HF_PREFIX}*") if p.is_dir() and p.name[len(HF_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(HF_PREFIX):]))


def latest_hf_checkpoint(directory: Path) -> Path | None:
    """The newest sealed checkpoint (it is verified when resumed, see :func:`find_resumable`)."""
    done = [p for p in hf_checkpoints(directory) if (p / MANIFEST).is_file()]
    return done[-1] if done else None


def read_seal(path: Path) -> dict:
    """A checkpoint's seal, checked for its fields (else :class:`IntegrityError`)."""
    try:
        seal = json.loads((path / SEAL).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise IntegrityError(f"{path / SEAL}: unreadable") from None
    best = seal.get("best_measure") if isinstance(seal, dict) else None
    if not isinstance(seal, dict) or not isinstance(seal.get("run_key"), str) or not (
            best is None or isinstance(best, (int, float))):
        raise IntegrityError(f"{path / SEAL}: malformed")
    return seal

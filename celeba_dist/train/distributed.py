"""Accelerate set-up and the few collectives the engine needs, in one place."""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object

log = logging.getLogger(__name__)


def build_accelerator(*, precision: str = "no", collective_timeout_min: float = 30.0) -> Accelerator:
    """An Accelerator for whatever launched us: one process, accelerate launch, torchrun or SLURM.

    Without CUDA, ``cpu=True`` is what makes a multi-process launch real DDP over gloo; without
    it each process would silently train alone. Gradient accumulation is done by the engine
    (see ``engine.train_one_epoch``), so Accelerate's own counter stays at 1.
    """
    cpu = not torch.cuda.is_available()
    if cpu and precision == "fp16":
        raise ValueError("train.precision=fp16 needs a GPU; use bf16 or no on the CPU")
    # A dead or hung peer turns into an error after this long instead of holding the allocation forever.
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=collective_timeout_min))
    return Accelerator(cpu=cpu, mixed_precision=precision, step_scheduler_with_optimizer=False,
                       kwargs_handlers=[timeout])


def leave_process_group(accelerator: Accelerator) -> None:
    """All ranks meet, then tear the process group down together; call on the normal path only.

    A process that exits with its Gloo/NCCL group still alive can crash or hang in interpreter
    finalization (the group's worker threads race the GIL teardown), which holds a whole job
    after its results are written. Not after an error: a peer may still be inside a collective,
    and a collective teardown would then deadlock (the collective timeout handles that case).
    """
    if accelerator.num_processes == 1:
        return
    accelerator.wait_for_everyone()
    accelerator.end_training()
    # Say what happened, not what was asked: end_training() skips the teardown for fork launches.
    if torch.distributed.is_initialized():
        log.warning("rank %d: the process group is still alive after end_training()", accelerator.process_index)
    else:
        log.info("rank %d left the process group", accelerator.process_index)


def gather_rows(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's (n_i, ...) rows in rank order, without padding or duplicates."""
    if accelerator.num_processes == 1:
        return tensor
    sizes = accelerator.gather(torch.tensor([tensor.shape[0]], device=accelerator.device)).tolist()
    padded = accelerator.pad_across_processes(tensor.to(accelerator.device), dim=0)
    stacked = accelerator.gather(padded).cpu()
    width = padded.shape[0]
    return torch.cat([stacked[r * width: r * width + n] for r, n in enumerate(sizes)])


def gather_list(accelerator: Accelerator, items: list) -> list:
    """Concatenate each rank's Python list in rank order."""
    return items if accelerator.num_processes == 1 else gather_object(items)


def from_main(accelerator: Accelerator, obj: Any) -> Any:
    """Rank 0's ``obj`` (any picklable object) on every rank (one collective)."""
    if accelerator.num_processes == 1:
        return obj
    return broadcast_object_list([obj], from_process=0)[0]


def all_sum(accelerator: Accelerator, values: list[float]) -> list[float]:
    """Sum a few numbers over ranks (one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()

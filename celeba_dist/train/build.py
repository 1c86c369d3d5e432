"""What ``train``, ``eval`` and ``predict`` build alike from a config: the start-up shard check, the model,
an evaluation loader."""
from __future__ import annotations

import logging

import torch
from accelerate import Accelerator

from celeba_dist.config import Config
from celeba_dist.data.streams import ShardCheckError, ShardData, eval_stream, make_loader
from celeba_dist.data.transforms import build_transform
from celeba_dist.models import build_model
from celeba_dist.train.distributed import gather_list, leave_process_group

log = logging.getLogger(__name__)


def check_data(cfg: Config, data: ShardData, accelerator: Accelerator, splits: tuple[str, ...]) -> None:
    """Every shard of ``splits`` exists with the manifest's size (``data.check_shards``), before any model is built.

    ``sha256`` also hashes them, each rank a share, and every rank raises the same error.
    """
    if cfg.data.check_shards == "none":
        return
    problems = data.check_files(splits)
    if not problems and cfg.data.check_shards == "sha256":
        mine = data.check_files(splits, sha256=True, part=(accelerator.process_index, accelerator.num_processes))
        problems = gather_list(accelerator, mine)
    if problems:
        leave_process_group(accelerator)  # every rank is here with the same verdict: leave together
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ShardCheckError(f"{len(problems)} shard(s) of {data.root} ({', '.join(splits)}) do not match its "
                              f"manifest.json:\n  {shown}\nre-copy or re-pack them; `celeba-dist verify {data.root}` "
                              "checks every shard and sample")
    log.info("shards of %s (%s) checked against the manifest (%s)", data.root, ", ".join(splits), cfg.data.check_shards)


def build_model_for(cfg: Config, num_attributes: int) -> torch.nn.Module:
    model = build_model(cfg.model.name, num_attributes=num_attributes, pretrained=cfg.model.pretrained,
                        **cfg.model.options)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def eval_loader(cfg: Config, data: ShardData, split: str, accelerator: Accelerator):
    transform = build_transform(cfg.data.transform, image_size=cfg.data.image_size, train=False)
    stream = eval_stream(data, split, transform, batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
                         rank=accelerator.process_index, world_size=accelerator.num_processes,
                         skip_bad=cfg.data.skip_bad_samples)
    return make_loader(stream, num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available())

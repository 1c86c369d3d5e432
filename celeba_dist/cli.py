"""The ``celeba-dist`` command: one sub-command per workflow, each a module's ``main(argv)``.

Modules are imported lazily so that ``celeba-dist verify`` does not pay for importing torch
models, and a broken optional piece cannot break the others.
"""
from __future__ import annotations

import importlib
import sys

# sub-command -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("celeba_dist.synthetic:main", "make a synthetic CelebA in the official format"),
    "pack": ("celeba_dist.pack.cli:main", "pack a CelebA source into WebDataset shards"),
    "verify": ("celeba_dist.pack.cli:verify_main", "check packed shards against their manifest"),
    "train": ("celeba_dist.train.main:cli_main", "train a recipe on packed shards"),
    "eval": ("celeba_dist.evaluate:main", "evaluate a run or checkpoint on a split"),
    "predict": ("celeba_dist.predict:main", "write per-image predictions to CSV"),
    "export": ("celeba_dist.export.cli:main", "export a run as safetensors + config.json + model card"),
    "demo": ("celeba_dist.demo:main", "synthetic data -> shards -> train -> eval, end to end"),
    "models": ("celeba_dist.models.cli:list_main", "list model names with parameter counts"),
    "recipes": ("celeba_dist.config:recipes_main", "list the shipped recipes"),
    "submit": ("celeba_dist.launch.submit:main", "submit a training run to SLURM (submitit)"),
    "sweep": ("celeba_dist.launch.sweep:main", "submit a sweep as a SLURM job array"),
    "jobs": ("celeba_dist.launch.status:main", "list submitted runs and sweeps"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: celeba-dist COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run 'celeba-dist COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"celeba-dist: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(rest) or 0)
    except KeyboardInterrupt:  # a command that does not handle Ctrl-C itself: one line, not a traceback
        print(f"celeba-dist {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

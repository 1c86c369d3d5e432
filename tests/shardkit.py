"""Real data for tests: the synthetic CelebA, packed by the real packer, cached per session."""
from __future__ import annotations

from pathlib import Path

from celeba_dist.pack.cli import main as pack_main
from celeba_dist.synthetic import make_synthetic_celeba


def synthetic_shards(root: Path, *, num_images: int, samples_per_shard: int, seed: int = 0,
                     extra: tuple[str, ...] = ()) -> Path:
    """Synthetic CelebA of ``num_images`` packed into ``root/shards-...``; reused when present."""
    source = root / f"celeba-{num_images}-{seed}"
    if not (source / "list_attr_celeba.txt").is_file():
        make_synthetic_celeba(source, num_images=num_images, seed=seed, workers=2)
    out = root / f"shards-{num_images}-{seed}-{samples_per_shard}-{'-'.join(e.strip('-') for e in extra)}"
    if not (out / "manifest.json").is_file():
        code = pack_main([str(source), str(out), "--samples-per-shard", str(samples_per_shard), "--workers", "2", *extra])
        assert code == 0, f"packing {source} failed"
    return out

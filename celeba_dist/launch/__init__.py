"""Launchers: put a training run on a cluster and translate the cluster for ``train.main``.

- :mod:`~celeba_dist.launch.cluster_env`: SLURM/submitit task variables → ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (what torch.distributed and Accelerate read).
- :mod:`~celeba_dist.launch.submit`: ``celeba-dist submit``, one run as a SLURM job, with requeue on preemption.
- :mod:`~celeba_dist.launch.sweep`: ``celeba-dist sweep``, a grid, random or recipe sweep as one job array.
- :mod:`~celeba_dist.launch.status`: ``celeba-dist jobs``, the runs' job records, state and progress.

``jobs/train.sbatch`` is the same launch written as a plain sbatch script (``srun`` + ``accelerate launch``).
"""

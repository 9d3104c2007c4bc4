"""Entry points: ``launch/pretrain.py`` (training under torchrun, srun or alone),
``launch/run.py`` (torchrun that passes SIGTERM/SIGUSR1 to the workers and exits 75 after
their save, ``python -m launch.run``) and ``launch/submit.py`` (SLURM batch jobs,
``python -m launch.submit``); ``launch.env`` works out rank, world size and rendezvous
from the launcher's environment."""

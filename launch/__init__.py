"""Entry points: ``launch/pretrain.py`` (training under torchrun, srun or alone) and
``launch/submit.py`` (SLURM batch jobs, ``python -m launch.submit``); ``launch.env`` works out
rank, world size and rendezvous from the launcher's environment."""

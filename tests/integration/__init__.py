"""End-to-end tests: real launchers, real SLURM daemons, real training runs."""

"""SLURM batch templates and the per-node agent (``launch/slurm/node_agent.py``)."""

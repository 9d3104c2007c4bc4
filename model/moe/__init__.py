"""moe: see its modules (config.py holds the model.moe section; spec/layer modules register on import from model/architectures.py)."""

"""bitnet: see its modules (config.py holds the model.bitnet section; spec/layer modules register on import from model/architectures.py)."""

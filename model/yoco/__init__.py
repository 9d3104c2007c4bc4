"""yoco: see its modules (config.py holds the model.yoco section; spec/layer modules register on import from model/architectures.py)."""

"""dha: see its modules (config.py holds the model.dha section; spec/layer modules register on import from model/architectures.py)."""

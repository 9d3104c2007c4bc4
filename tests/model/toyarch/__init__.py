"""``toy``: an architecture defined in the test tree, loaded as ``model.plugins:
[tests.model.toyarch]``. Its folder is everything it needs: a config section
(``model.toy``, config.py), an MLP kind with a tensor-parallel role of its own (layers.py,
tp_styles.py), a Hugging Face adapter on model/hf.py's NameMapAdapter (hf.py) and the spec
(spec.py). Nothing outside this folder and its test names it."""
from tests.model.toyarch import spec  # noqa: F401  (registers the spec, its section and kinds)

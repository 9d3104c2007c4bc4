"""Model configuration: one dataclass for every decoder architecture.

Slots (``attention``, ``mlp``, ``linear``) pick the layer implementations from
registries in :mod:`model.layers`, so a new architecture adds a registry entry
rather than a copy of the block. An architecture's own settings are a *section*
(``model.moe``, ``model.yoco``, ...): the dataclass its spec declares
(``ModelSpec.config``), found through the spec registry, never a field here, so this
module imports no architecture folder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from polytron.model.configlib import ConfigError, bad, doc, from_dict


@dataclass
class RopeScaling:
    """Hugging Face style RoPE scaling (Llama 3 / linear). Off when ``type`` is ``none``."""
    type: Literal["none", "linear", "llama3"] = field(default="none", metadata=doc(
        "RoPE scaling rule: none, linear (divide positions), llama3 (frequency-band scaling)."))
    factor: float = field(default=1.0, metadata=doc("Scaling factor (both rules)."))
    low_freq_factor: float = field(default=1.0, metadata=doc("llama3: low-frequency factor."))
    high_freq_factor: float = field(default=4.0, metadata=doc("llama3: high-frequency factor."))
    original_max_position_embeddings: int = field(default=8192, metadata=doc(
        "llama3: context length the base model was trained with."))


@dataclass
class _ModelFields:
    """Shape and layer choices of a decoder-only transformer."""
    arch: str = field(default="llama", metadata=doc(
        "Architecture: a registered model spec (model/spec.py), e.g. llama."))
    plugins: list[str] = field(default_factory=list, metadata=doc(
        "Python modules imported before the model is built, e.g. [my_lab.my_arch]: an "
        "architecture or layer kind kept outside this repository registers itself on import "
        "(like torchtitan's custom_import); the module must be importable by every rank "
        "(installed, or on PYTHONPATH: the scripts add neither the checkout nor the working "
        "directory to the import path)."))
    vocab_size: int = field(default=4096, metadata=doc(
        "Embedding rows; must be >= the tokenizer's vocabulary."))
    hidden_size: int = field(default=256, metadata=doc("Model width d."))
    num_layers: int = field(default=4, metadata=doc("Number of transformer blocks."))
    num_heads: int = field(default=4, metadata=doc("Query heads per attention layer."))
    num_kv_heads: int = field(default=0, metadata=doc(
        "Key/value heads (GQA); 0 means equal to num_heads (MHA)."))
    head_dim: int = field(default=0, metadata=doc("Per-head width; 0 means hidden_size // num_heads."))
    ffn_hidden_size: int = field(default=0, metadata=doc(
        "MLP inner width; 0 means the Llama rule (8/3 d rounded up to a multiple of 64)."))
    max_seq_len: int = field(default=2048, metadata=doc("Longest sequence the RoPE tables cover."))
    rope_theta: float = field(default=10000.0, metadata=doc("RoPE base."))
    rope_scaling: RopeScaling = field(default_factory=RopeScaling, metadata=doc("RoPE scaling."))
    norm_eps: float = field(default=1e-5, metadata=doc("RMSNorm epsilon."))
    tie_embeddings: bool = field(default=False, metadata=doc(
        "Share the input embedding with the output head."))
    init_std: float = field(default=0.02, metadata=doc(
        "Std of the normal init; output projections use init_std / sqrt(2 * num_layers)."))
    attention: str = field(default="", metadata=doc(
        "Attention slot (model.layers.ATTENTIONS): gqa, or a kind an architecture registers. "
        "Empty: the architecture's default (ModelSpec.slot_defaults), else gqa."))
    mlp: str = field(default="", metadata=doc(
        "MLP slot (model.layers.MLPS): swiglu, or a kind an architecture registers. "
        "Empty: the architecture's default (ModelSpec.slot_defaults), else swiglu."))
    linear: str = field(default="", metadata=doc(
        "Linear slot used by the projections (model.layers.LINEARS): linear, or a kind an "
        "architecture registers. Empty: the architecture's default (ModelSpec.slot_defaults), "
        "else linear."))
    attention_bias: bool = field(default=False, metadata=doc("Bias on q/k/v/o projections."))
    mlp_bias: bool = field(default=False, metadata=doc("Bias on MLP projections."))
    sections: dict[str, Any] = field(default_factory=dict, repr=False, metadata=doc(
        "The architectures' own sections by name (model.moe, model.yoco, ...): written and read "
        "as keys of model, typed by the spec that declares them (ModelSpec.config).", sections=True))

    def __post_init__(self):
        if self.num_kv_heads == 0:
            self.num_kv_heads = self.num_heads
        if self.head_dim == 0 and self.num_heads > 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.ffn_hidden_size == 0:
            self.ffn_hidden_size = 64 * -(-int(8 * self.hidden_size / 3) // 64)


_FIELDS = frozenset(f.name for f in dataclasses.fields(_ModelFields))


class ModelConfig(_ModelFields):
    """Shape and layer choices of a decoder-only transformer, with the sections of the
    registered architectures (``model.moe``, ...) as attributes: ``cfg.moe`` is the
    MoEConfig. Each section is given as a keyword (an instance of its class, or a mapping
    of its fields) or takes its defaults; config files write it as ``model.<section>``."""

    def __init__(self, *args, **kwargs):
        given = dict(kwargs.pop("sections", None) or {})
        given.update({k: kwargs.pop(k) for k in [k for k in kwargs if k not in _FIELDS]})
        super().__init__(*args, **kwargs)
        from polytron.model.spec import registered_specs
        spec = registered_specs().get(self.arch)
        if spec is not None:       # else a plugin's arch: filled in validate() after the import
            self._fill_slots(spec)
        types = self.config_sections({**given, "plugins": self.plugins})
        for name, value in given.items():
            if name not in types:
                raise ConfigError(f"unknown config key 'model.{name}'; allowed keys in 'model': "
                                  + ", ".join(sorted((_FIELDS - {"sections"}) | set(types))))
            self.sections[name] = _section(name, value, types[name])
        self._add_default_sections()

    def _add_default_sections(self) -> None:
        """Defaults for every registered section not given (sections registered by a plugin
        imported after construction are added here too)."""
        for name, cls in self.config_sections().items():
            if name not in self.sections:
                self.sections[name] = cls()

    @classmethod
    def config_sections(cls, data: Optional[dict] = None) -> dict[str, type]:
        """Section name -> config class of every registered architecture that declares one.
        ``data`` (a model mapping being loaded) with keys no registry knows yet: its
        ``plugins`` are imported first, since their sections are declared by them."""
        from polytron.model.spec import config_sections
        types: dict[str, type] = {name: spec.config for name, spec in config_sections().items() if spec.config}
        extra = [k for k in (data or {}) if k not in _FIELDS and k not in types]
        plugins = (data or {}).get("plugins")
        if extra and isinstance(plugins, list) and all(isinstance(p, str) for p in plugins):
            load_plugins(plugins)
            types = {name: spec.config for name, spec in config_sections().items() if spec.config}
        return types

    def saved_sections(self) -> dict[str, Any]:
        """The sections this model uses (its architecture's and those its layer kinds read):
        the only ones a run writes to its config and compares on resume."""
        from polytron.model.spec import config_sections
        specs = config_sections()
        return {name: sec for name, sec in self.sections.items() if name in specs and specs[name].used_by(self)}

    def _fill_slots(self, spec) -> None:
        """Unset slots (empty) take the architecture's kind (``arch: moe`` -> ``mlp: moe``)."""
        from polytron.model.spec import GENERIC_SLOTS
        for slot in GENERIC_SLOTS:
            if not getattr(self, slot):
                setattr(self, slot, spec.slot_default(slot))

    def validate(self) -> None:
        """Reject impossible shapes and unknown slot kinds with a message naming the key."""
        from polytron.model.spec import get_spec
        load_plugins(self.plugins)
        self._add_default_sections()
        spec = get_spec(self.arch)
        self._fill_slots(spec)
        self._check_slots(spec)
        for section in self.sections.values():
            section.validate(self)
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "ffn_hidden_size", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise bad(f"model.{key}", getattr(self, key), "a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise bad("model.num_kv_heads", self.num_kv_heads,
                      f"a divisor of model.num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise bad("model.head_dim", self.head_dim, "an even number (RoPE rotates pairs)")
        if self.rope_theta <= 0:
            raise bad("model.rope_theta", self.rope_theta, "a positive number")
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("model.norm_eps and model.init_std must be positive")

    def _check_slots(self, spec) -> None:
        """Every slot names a registered kind, one the architecture accepts."""
        from polytron.model.layers import ATTENTIONS, LINEARS, MLPS
        for key, registry in (("attention", ATTENTIONS), ("mlp", MLPS), ("linear", LINEARS)):
            if getattr(self, key) not in registry:
                raise bad(f"model.{key}", getattr(self, key),
                          "one of " + ", ".join(repr(k) for k in sorted(registry)))
        for key, kinds in spec.slot_kinds.items():
            if getattr(self, key) not in kinds:
                raise bad(f"model.{key}", getattr(self, key),
                          f"{' or '.join(repr(k) for k in kinds)} with model.arch={self.arch}")

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count of the model this config builds (tied parameters once)."""
        from polytron.model.accounting import counts
        c = counts(self)
        return c.total if include_embedding else c.total - c.embedding

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), attention included
        (model/accounting.py: 6 x activated matmul parameters + attention, PaLM convention)."""
        from polytron.model.accounting import flops_per_token
        return flops_per_token(self, seq_len)

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: a section by name (cfg.moe)
        sections = self.__dict__.get("sections")
        if sections is None or name.startswith("_"):
            raise AttributeError(name)
        if name not in sections:
            self._add_default_sections()
        if name not in sections:
            raise AttributeError(f"ModelConfig has no field or registered section {name!r}")
        return sections[name]

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FIELDS or name.startswith("_"):
            object.__setattr__(self, name, value)
            return
        types = self.config_sections()
        if name not in types:
            raise AttributeError(f"ModelConfig has no field or registered section {name!r}")
        self.sections[name] = _section(name, value, types[name])


def _section(name: str, value: Any, cls: type) -> Any:
    """A section value given to ModelConfig: an instance of its class, or a mapping of its fields."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return from_dict(cls, value, prefix=f"model.{name}.")
    raise bad(f"model.{name}", value, f"a mapping of {cls.__name__} fields")


def load_plugins(modules: list[str]) -> None:
    """Import ``model.plugins``; a module that fails to import is one ConfigError line."""
    import importlib
    for i, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - reported as one line naming the module
            raise bad(f"model.plugins[{i}]", name, f"an importable module ({type(e).__name__}: {e})") from None


#: Model settings a resumed run may change: they alter how weights are used at the
#: margins (context length, RoPE base and scaling, norm epsilon) or only matter at
#: initialization. Every other model setting fixes what the saved weights mean.
FREE_ON_RESUME = ("max_seq_len", "rope_theta", "rope_scaling", "norm_eps", "init_std", "plugins")


def weight_meaning_change(saved: dict, current: dict, prefix: str = "model") -> Optional[tuple[str, object, object]]:
    """The first model setting (dotted key, saved value, current value) that differs between
    a checkpoint's model section and this run's and changes what its weights mean.

    ``current`` is this run's saved view (``to_dict``), which holds only the sections the
    model uses (:meth:`ModelConfig.saved_sections`), so only those are compared: a stored
    config that holds every section (written before sections were per architecture) resumes
    whatever the unused ones say."""
    for key, value in current.items():
        if key in FREE_ON_RESUME or key not in saved:
            continue
        old = saved[key]
        if isinstance(value, dict) and isinstance(old, dict):
            found = weight_meaning_change(old, value, f"{prefix}.{key}")
            if found:
                return found
        elif old != value:
            return f"{prefix}.{key}", old, value
    return None

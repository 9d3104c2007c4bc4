"""Model configuration: one dataclass for every decoder architecture.

Slots (``attention``, ``mlp``, ``linear``) pick the layer implementations from
registries in :mod:`model.layers`, so a new architecture adds a registry entry
rather than a copy of the block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from polytron.model.bitnet.config import BitNetConfig
from polytron.model.configlib import ConfigError, bad, doc
from polytron.model.dha.config import DHAConfig
from polytron.model.moe.config import MoEConfig
from polytron.model.yoco.config import YOCOConfig


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
class ModelConfig:
    """Shape and layer choices of a decoder-only transformer."""
    arch: str = field(default="llama", metadata=doc(
        "Architecture: a registered model spec (model/spec.py), e.g. llama."))
    plugins: list[str] = field(default_factory=list, metadata=doc(
        "Python modules imported before the model is built, e.g. [my_lab.my_arch]: an "
        "architecture or layer kind kept outside this repository registers itself on import "
        "(like torchtitan's custom_import); the module must be importable by every rank."))
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
    attention: str = field(default="gqa", metadata=doc(
        "Attention slot (model.layers.ATTENTIONS): gqa, or a kind an architecture registers."))
    mlp: str = field(default="swiglu", metadata=doc(
        "MLP slot (model.layers.MLPS): swiglu, or a kind an architecture registers."))
    linear: str = field(default="linear", metadata=doc(
        "Linear slot used by the projections (model.layers.LINEARS): linear, or a kind an "
        "architecture registers."))
    attention_bias: bool = field(default=False, metadata=doc("Bias on q/k/v/o projections."))
    mlp_bias: bool = field(default=False, metadata=doc("Bias on MLP projections."))
    bitnet: BitNetConfig = field(default_factory=BitNetConfig, metadata=doc(
        "BitNet b1.58 settings (model/bitnet)."))
    moe: MoEConfig = field(default_factory=MoEConfig, metadata=doc("Mixture-of-experts settings (model/moe)."))
    dha: DHAConfig = field(default_factory=DHAConfig, metadata=doc(
        "Decoupled-head attention settings (model/dha)."))
    yoco: YOCOConfig = field(default_factory=YOCOConfig, metadata=doc("YOCO settings (model/yoco)."))

    def __post_init__(self):
        if self.num_kv_heads == 0:
            self.num_kv_heads = self.num_heads
        if self.head_dim == 0 and self.num_heads > 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.ffn_hidden_size == 0:
            self.ffn_hidden_size = 64 * -(-int(8 * self.hidden_size / 3) // 64)

    def validate(self) -> None:
        """Reject impossible shapes and unknown slot kinds with a message naming the key."""
        from polytron.model.layers import ATTENTIONS, LINEARS, MLPS
        from polytron.model.spec import get_spec
        load_plugins(self.plugins)
        get_spec(self.arch)
        for key, registry in (("attention", ATTENTIONS), ("mlp", MLPS), ("linear", LINEARS)):
            if getattr(self, key) not in registry:
                raise bad(f"model.{key}", getattr(self, key),
                          "one of " + ", ".join(repr(k) for k in sorted(registry)))
        for section in (self.bitnet, self.moe, self.dha, self.yoco):
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
    a checkpoint's model section and this run's and changes what its weights mean."""
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

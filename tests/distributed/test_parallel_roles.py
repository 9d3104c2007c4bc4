"""Parallel roles as registries (parallel/roles.py) and the hook protocols (model/protocols.py):
the architecture folders' tensor-parallel styles reach the plan, an unknown or conflicting
role is refused, the layers offer the protocols the parallel layer reads, and parallel/
imports no architecture folder. No process group: plans are built, not applied."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from torch import nn
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import PrepareModuleInputOutput, SequenceParallel

from polytron.model import protocols as P
from polytron.model.config import ModelConfig
from polytron.model.configlib import from_dict
from polytron.model.transformer import build_model
from polytron.parallel import roles
from polytron.parallel.tensor_parallel import InPlace, unit_plan

ROOT = Path(__file__).resolve().parents[2]
BASE = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
            max_seq_len=16)
ARCHS = {
    "bitnet": {"arch": "bitnet", "attention": "gqa_subnorm", "mlp": "relu2_subnorm", "linear": "bitlinear"},
    "dha": {"arch": "dha", "attention": "dha"},
    "moe": {"arch": "moe", "mlp": "moe", "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 16}},
}


def model_of(name: str) -> nn.Module:
    cfg = from_dict(ModelConfig, {**BASE, **ARCHS[name]}, prefix="model.")
    cfg.validate()
    return build_model(cfg, device="meta")


def block_plan(model: nn.Module, sequence_parallel: bool) -> dict:
    unit, module = next((u, m) for u, m in model.unit_modules() if u.kind == "block")
    return unit_plan(unit.kind, module, 2, sequence_parallel)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {name: model_of(name) for name in ARCHS}


def test_architecture_roles_reach_the_plan(models):
    bitnet = block_plan(models["bitnet"], True)
    for norm in ("attention.sub_norm", "mlp.sub_norm"):        # sharded_norm: over the feature dim
        assert isinstance(bitnet[norm], SequenceParallel) and bitnet[norm].use_local_output
        assert bitnet[norm].sequence_sharding == (Shard(-1),)
    dha = block_plan(models["dha"], False)
    assert isinstance(dha["attention.maps"], InPlace)
    moe_sp, moe = block_plan(models["moe"], True), block_plan(models["moe"], False)
    assert isinstance(moe_sp["mlp"], PrepareModuleInputOutput) and "mlp" not in moe


def test_every_declared_role_is_registered(models):
    for model in models.values():
        for _, module in model.named_modules():
            if isinstance(module, P.TPRoles):
                for role in module.tp_roles().values():
                    assert roles.role_name(role) in roles.TP_STYLES, (type(module).__name__, role)


def test_unknown_and_conflicting_roles_are_refused():
    with pytest.raises(ValueError, match=r"unknown tensor-parallel role 'no_such_role' on Linear"):
        roles.style_for("no_such_role", nn.Linear(2, 2), 2, True)
    with pytest.raises(ValueError, match="'colwise' is already registered"):
        roles.register_tp_style("colwise", lambda role, module, tp, sp: None)


def test_a_registered_role_is_used_with_its_arguments():
    seen = []

    def factory(role, module, tp, sp):
        seen.append((role, type(module).__name__, tp, sp))
        return None

    class Declares(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(2, 2)

        def tp_roles(self) -> dict:
            return {"inner": ("test_role_with_args", 7)}

    roles.register_tp_style("test_role_with_args", factory)
    try:
        assert unit_plan("block", Declares(), 2, False) == {}
        assert seen == [(("test_role_with_args", 7), "Linear", 2, False)]
    finally:
        del roles.TP_STYLES["test_role_with_args"]


def test_layers_offer_the_protocols_parallel_reads(models):
    moe = models["moe"]
    layers = [m for m in moe.modules() if isinstance(m, P.ExpertLayer)]
    assert layers and all(isinstance(m.routed_experts(), nn.Module) for m in layers)
    routers = [m for m in moe.modules() if type(m).__name__ == "Router"]
    assert routers and all(isinstance(r, P.LoadReducing) and isinstance(r, P.FullPrecision)
                           and isinstance(r, P.PostOptimizerStep) and isinstance(r, P.InitBuffers)
                           for r in routers)
    assert any(isinstance(m, P.TPLocal) for m in models["dha"].modules())
    assert isinstance(moe, P.FullParamShapes)
    assert not isinstance(nn.Linear(2, 2), P.TPRoles)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_parallel_imports_no_architecture_folder():
    archs = {p.name for p in (ROOT / "model").iterdir() if (p / "__init__.py").exists()}
    assert {"moe", "dha", "bitnet", "yoco"} <= archs
    bad = {(f.name, m) for f in (ROOT / "parallel").glob("*.py") for m in _imports(f)
           if m.startswith("polytron.model.") and m.split(".")[2] in archs}
    assert not bad

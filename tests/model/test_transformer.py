"""Shapes, causality, init and slot wiring of the dense decoder."""
import pytest
import torch

from polytron.model.config import ModelConfig
from polytron.model.layers import ATTENTIONS, LINEARS, MLPS, apply_rope, rope_table, select_rope
from polytron.model.transformer import Transformer, build_model, cross_entropy, document_mask


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=96, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def test_logits_shape_and_param_count():
    cfg = tiny()
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (3, 16))
    assert model(tokens).shape == (3, 16, cfg.vocab_size)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_causality(kv):
    """Changing a future token never changes earlier logits."""
    cfg = tiny(num_kv_heads=kv)
    model = build_model(cfg, seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 20))
    base = model(tokens)
    for t in (5, 12, 19):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t], base[:, t])


def test_tied_embeddings_share_storage_after_materialize():
    cfg = tiny(tie_embeddings=True)
    model = build_model(cfg, seed=0)
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_init_is_deterministic_and_depth_scaled():
    cfg = tiny(num_layers=8, init_std=0.02)
    a, b = build_model(cfg, seed=5), build_model(cfg, seed=5)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    c = build_model(cfg, seed=6)
    assert not torch.equal(a.layers["0"].attention.wq.weight, c.layers["0"].attention.wq.weight)
    wo_std = a.layers["0"].attention.wo.weight.std().item()
    wq_std = a.layers["0"].attention.wq.weight.std().item()
    assert abs(wq_std - 0.02) < 0.002
    assert abs(wo_std - 0.02 / 4) < 0.001          # 0.02 / sqrt(2 * 8)
    assert torch.all(a.norm.weight == 1)


def test_meta_construction_allocates_nothing():
    with torch.device("meta"):
        model = Transformer(tiny())
    assert all(p.is_meta for p in model.parameters())


def test_rope_positions_reset_matches_fresh_sequence():
    """position_ids restarting at 0 give the same rotation as a new sequence."""
    cfg = tiny()
    table = rope_table(cfg)
    x = torch.randn(1, 6, 2, cfg.head_dim)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    cos, sin = select_rope(table, 6, pos)
    y = apply_rope(x, cos, sin)
    cos0, sin0 = select_rope(table, 3, None)
    torch.testing.assert_close(y[:, 3:], apply_rope(x[:, 3:], cos0, sin0))


def test_document_mask_blocks_other_documents():
    cfg = tiny()
    model = build_model(cfg, seed=2)
    a = torch.randint(0, cfg.vocab_size, (1, 8))
    b = torch.randint(0, cfg.vocab_size, (1, 8))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 8 + [1] * 8])
    pos = torch.tensor([list(range(8)) * 2])
    out = model(packed, position_ids=pos, doc_ids=doc_ids)
    torch.testing.assert_close(out[:, 8:], model(b), rtol=1e-5, atol=1e-5)
    assert document_mask(doc_ids).shape == (1, 1, 16, 16)


def test_slots_are_registered_and_loss_ignores_masked_labels():
    assert "gqa" in ATTENTIONS and "swiglu" in MLPS and "linear" in LINEARS
    logits = torch.randn(2, 4, 10)
    labels = torch.randint(0, 10, (2, 4))
    masked = labels.clone()
    masked[:, :2] = -100
    ref = torch.nn.functional.cross_entropy(logits[:, 2:].reshape(-1, 10), labels[:, 2:].reshape(-1))
    torch.testing.assert_close(cross_entropy(logits, masked), ref)


def test_training_reduces_loss_on_fixed_batch():
    cfg = tiny()
    model = build_model(cfg, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, cfg.vocab_size, (4, 17))
    losses = []
    for _ in range(20):
        loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]

"""SASRec invariances: causality, padding, no NaN on empty rows, [MASK] handling, save/load round trip; for
both block types (sasrec, ligr) where the block could break them."""

from __future__ import annotations

import json

import pytest
import torch

from recsys.model import BLOCKS, SASRec, load_model, save_model

N_ITEMS, MAX_LEN, HIDDEN = 30, 12, 16


def make_model(causal: bool = True, seed: int = 0, block: str = "sasrec") -> SASRec:
    torch.manual_seed(seed)
    attention = "causal" if causal else "bidirectional"
    ffn_mult = 4 if block == "ligr" else 1
    return SASRec(N_ITEMS, MAX_LEN, HIDDEN, n_blocks=2, n_heads=2, dropout=0.3, attention=attention,
                  ffn_mult=ffn_mult, block=block).eval()  # type: ignore[arg-type]


def left_pad(seq: list[int], width: int) -> torch.Tensor:
    return torch.tensor([[0] * (width - len(seq)) + seq])  # (1, width)


def test_shapes_and_user_vectors() -> None:
    model = make_model()
    items = torch.randint(0, N_ITEMS + 1, (3, 7))
    hidden = model(items)
    assert hidden.shape == (3, 7, HIDDEN)
    assert model.score(hidden).shape == (3, 7, N_ITEMS + 1)
    assert model.item_embeddings().shape == (N_ITEMS + 1, HIDDEN)
    torch.testing.assert_close(model.user_vectors(items), hidden[:, -1])


def test_bidirectional_user_vectors_read_an_appended_mask() -> None:
    model = make_model(causal=False)
    mask = N_ITEMS + 1
    assert model.mask_token == mask and model.item_emb.num_embeddings == N_ITEMS + 2
    # A full window: the oldest item makes room for the [MASK].
    items = torch.randint(1, N_ITEMS + 1, (4, MAX_LEN))
    appended = torch.cat([items[:, 1:], torch.full((4, 1), mask)], 1)
    torch.testing.assert_close(model.user_vectors(items), model(appended)[:, -1])
    # A short window grows by one column.
    short = items[:, -5:]
    torch.testing.assert_close(model.user_vectors(short), model(torch.cat([short, torch.full((4, 1), mask)], 1))[:, -1])


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("causal", [True, False])
def test_user_vectors_ignore_extra_left_padding(causal: bool, block: str) -> None:
    model = make_model(causal, block=block)
    seq = [5, 2, 9, 14, 3]
    widths = [left_pad(seq, w) for w in (5, 8, MAX_LEN)]
    vectors = [model.user_vectors(x) for x in widths]
    for v in vectors[1:]:
        torch.testing.assert_close(v, vectors[0])


def test_mask_is_never_a_candidate() -> None:
    model = make_model(causal=False)
    with torch.no_grad():
        model.item_emb.weight[N_ITEMS + 1] = 100.0  # a [MASK] row that would win every ranking
    user = model.user_vectors(torch.randint(1, N_ITEMS + 1, (3, MAX_LEN)))
    scores = model.score(user)
    assert scores.shape == (3, N_ITEMS + 1)
    assert model.item_embeddings().shape == (N_ITEMS + 1, HIDDEN)
    torch.testing.assert_close(scores, user @ model.item_emb.weight[: N_ITEMS + 1].T)


@pytest.mark.parametrize("block", BLOCKS)
def test_causal_outputs_ignore_later_items(block: str) -> None:
    model = make_model(block=block)
    items = torch.tensor([[0, 0, 3, 7, 1, 9, 4, 2]])
    changed = items.clone()
    changed[0, 5] = 11
    before, after = model(items), model(changed)
    torch.testing.assert_close(before[:, :5], after[:, :5], rtol=0, atol=0)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_bidirectional_model_sees_the_future() -> None:
    model = make_model(causal=False)
    items = torch.tensor([[0, 0, 3, 7, 1, 9, 4, 2]])
    changed = items.clone()
    changed[0, -1] = 11
    assert not torch.allclose(model(items)[:, 2], model(changed)[:, 2])


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("causal", [True, False])
def test_extra_left_padding_changes_nothing(causal: bool, block: str) -> None:
    model = make_model(causal, block=block)
    seq = [5, 2, 9, 14, 3]
    short, wide = model(left_pad(seq, 5)), model(left_pad(seq, MAX_LEN))
    torch.testing.assert_close(wide[:, -5:], short)
    # The same row inside a batch with longer neighbours.
    batch = torch.cat([left_pad(seq, MAX_LEN), torch.randint(1, N_ITEMS + 1, (2, MAX_LEN))])
    torch.testing.assert_close(model(batch)[:1, -5:], short)


@pytest.mark.parametrize("block", BLOCKS)
def test_padding_embedding_does_not_leak(block: str) -> None:
    model = make_model(block=block)
    items = torch.cat([left_pad([4, 8, 15], MAX_LEN), left_pad([16, 23, 4, 2, 1, 7], MAX_LEN)])
    real = items != 0
    before = model(items)
    with torch.no_grad():
        model.item_emb.weight[0] = torch.randn(HIDDEN) * 10
    torch.testing.assert_close(model(items)[real], before[real])


@pytest.mark.parametrize("block", BLOCKS)
def test_fully_padded_rows_give_finite_outputs_and_gradients(block: str) -> None:
    model = make_model(block=block).train()
    items = torch.zeros(3, MAX_LEN, dtype=torch.long)
    items[1, -2:] = torch.tensor([3, 4])
    hidden = model(items)
    assert torch.isfinite(hidden).all()
    model.score(hidden).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_too_wide_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_len"):
        make_model()(torch.ones(1, MAX_LEN + 1, dtype=torch.long))


def test_bad_head_count_is_rejected() -> None:
    with pytest.raises(ValueError, match="n_heads"):
        SASRec(N_ITEMS, MAX_LEN, hidden=10, n_blocks=1, n_heads=3, dropout=0.0)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("causal", [True, False])
def test_save_load_round_trip(tmp_path, causal: bool, block: str) -> None:
    model = make_model(causal=causal, seed=3, block=block)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert not loaded.training
    assert loaded.kwargs == model.kwargs and loaded.mask_token == model.mask_token
    items = torch.randint(0, N_ITEMS + 1, (4, MAX_LEN))
    torch.testing.assert_close(loaded(items), model(items), rtol=0, atol=0)
    torch.testing.assert_close(loaded.user_vectors(items), model.user_vectors(items), rtol=0, atol=0)


def test_model_json_of_older_versions_loads(tmp_path) -> None:
    model = make_model(seed=4)
    save_model(model, tmp_path)
    kwargs = json.loads((tmp_path / "model.json").read_text())
    kwargs.pop("attention")
    (tmp_path / "model.json").write_text(json.dumps({**kwargs, "causal": True}))
    assert load_model(tmp_path).attention == "causal"
    (tmp_path / "model.json").write_text(json.dumps({**kwargs, "causal": False}))
    with pytest.raises(ValueError, match="attention=bidirectional"):
        load_model(tmp_path)


def test_a_model_json_without_ffn_mult_or_block_loads_as_the_paper_model(tmp_path) -> None:
    model = make_model(seed=5)
    save_model(model, tmp_path)
    kwargs = json.loads((tmp_path / "model.json").read_text())
    assert kwargs.pop("ffn_mult") == 1 and kwargs.pop("block") == "sasrec"
    (tmp_path / "model.json").write_text(json.dumps(kwargs))  # as written before model.ffn_mult / block existed
    loaded = load_model(tmp_path)
    items = torch.randint(0, N_ITEMS + 1, (3, MAX_LEN))
    torch.testing.assert_close(loaded(items), model(items), rtol=0, atol=0)


def test_ffn_mult_widens_every_feed_forward_layer_and_round_trips(tmp_path) -> None:
    torch.manual_seed(6)
    wide = SASRec(N_ITEMS, MAX_LEN, HIDDEN, n_blocks=2, n_heads=2, dropout=0.0, ffn_mult=4).eval()
    narrow = SASRec(N_ITEMS, MAX_LEN, HIDDEN, n_blocks=2, n_heads=2, dropout=0.0).eval()
    for block in wide.blocks:
        assert block.ffn[0].weight.shape == (4 * HIDDEN, HIDDEN) and block.ffn[3].weight.shape == (HIDDEN, 4 * HIDDEN)
    extra = sum(p.numel() for p in wide.parameters()) - sum(p.numel() for p in narrow.parameters())
    assert extra == 2 * (2 * 3 * HIDDEN * HIDDEN + 3 * HIDDEN)  # per block: two (H x 4H) matrices grow by 3H^2, one bias by 3H
    save_model(wide, tmp_path / "m")
    items = torch.randint(0, N_ITEMS + 1, (3, MAX_LEN))
    torch.testing.assert_close(load_model(tmp_path / "m")(items), wide(items), rtol=0, atol=0)
    with pytest.raises(ValueError, match="ffn_mult"):
        SASRec(N_ITEMS, MAX_LEN, HIDDEN, n_blocks=1, n_heads=1, dropout=0.0, ffn_mult=0)


def test_load_model_names_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_model(tmp_path)


def test_ligr_gates_each_residual_branch_and_uses_a_swiglu_feed_forward() -> None:
    """The LiGR block against a direct computation of x + sigmoid(G_a x) * Attn(LN(x)), then
    x + sigmoid(G_f x) * W_out(silu(W_a LN(x)) * W_b LN(x)), with the block's own weights."""
    torch.manual_seed(8)
    model = SASRec(N_ITEMS, MAX_LEN, HIDDEN, n_blocks=1, n_heads=2, dropout=0.0, ffn_mult=3, block="ligr").eval()
    blk = model.blocks[0]
    x = torch.randn(2, 5, HIDDEN)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    q, k, v = blk.qkv(blk.attn_norm(x)).split(HIDDEN, -1)
    heads = [z.view(2, 5, 2, HIDDEN // 2).transpose(1, 2) for z in (q, k, v)]  # (B, H, T, Dh) each
    logits = heads[0] @ heads[1].transpose(-1, -2) / (HIDDEN // 2) ** 0.5
    att = logits.masked_fill(~mask, float("-inf")).softmax(-1) @ heads[2]  # (B, H, T, Dh)
    y = x + torch.sigmoid(x @ blk.gates[0].weight.T + blk.gates[0].bias) * blk.proj(att.transpose(1, 2).reshape(2, 5, HIDDEN))
    h = blk.ffn_norm(y)
    w_a, w_b = blk.ffn.inner.weight.chunk(2, 0)  # (3H, H) each
    ffn = (torch.nn.functional.silu(h @ w_a.T) * (h @ w_b.T)) @ blk.ffn.out.weight.T
    want = y + torch.sigmoid(y @ blk.gates[1].weight.T + blk.gates[1].bias) * ffn
    torch.testing.assert_close(blk(x, mask), want, rtol=1e-5, atol=1e-6)
    plain = SASRec(N_ITEMS, MAX_LEN, HIDDEN, n_blocks=1, n_heads=2, dropout=0.0, ffn_mult=3)
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    # two gates (H x H + H each); SwiGLU 3 x (3H x H) without biases against GELU 2 x (3H x H) + 3H + H
    assert extra == 2 * (HIDDEN * HIDDEN + HIDDEN) + 3 * HIDDEN * HIDDEN - 4 * HIDDEN
    with pytest.raises(ValueError, match="block must be one of"):
        SASRec(N_ITEMS, MAX_LEN, HIDDEN, n_blocks=1, n_heads=1, dropout=0.0, block="gru")  # type: ignore[arg-type]


# ---- repeat bias ----------------------------------------------------------------------------------------------


def _repeat_model(seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    model = SASRec(N_ITEMS, MAX_LEN, HIDDEN, n_blocks=1, n_heads=1, dropout=0.0, repeat_bias=True).eval()
    with torch.no_grad():
        model.repeat_weight.copy_(torch.linspace(3.0, 0.5, MAX_LEN))  # the newest item gets the most
    return model


def test_repeat_bias_adds_each_window_items_bonus_by_recency():
    model = _repeat_model()
    items = torch.cat([left_pad([4, 7, 4, 9], 6), left_pad([2], 6)])  # (2, 6); user 0 re-consumed item 4
    with torch.no_grad():
        got = model.scores(items)
        plain = model.score(model.user_vectors(items))
    w = model.repeat_weight.detach()
    want = plain.clone()
    for b, seq in enumerate(([4, 7, 4, 9], [2])):  # item at distance d from the last position gets w[d]
        for d, item in enumerate(reversed(seq)):
            want[b, item] += w[d]
    assert torch.allclose(got, want, atol=1e-6)
    assert got[0, 4] - plain[0, 4] == pytest.approx(float(w[1] + w[3]), abs=1e-6)  # two occurrences sum
    # every position of a window: the last row equals the last-position bias; nothing from the future
    every = model.history_bias(items, all_positions=True)  # (B, T, T)
    assert torch.equal(every[:, -1], model.history_bias(items))
    assert torch.equal(every.triu(1), torch.zeros_like(every))
    assert every[0, 3, 2] == w[1] and every[0, 2, 2] == w[0] and every[1, 4, 5] == 0.0


def test_no_repeat_bias_is_plain_sasrec_and_saves_as_before(tmp_path):
    plain = make_model()
    items = left_pad([1, 2, 3], 5)
    with torch.no_grad():
        assert torch.equal(plain.scores(items), plain.score(plain.user_vectors(items)))
    assert plain.history_bias(items) is None and "repeat_bias" not in plain.kwargs
    model = _repeat_model()
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.repeat_bias and torch.equal(loaded.repeat_weight, model.repeat_weight)
    with pytest.raises(ValueError, match="causal"):
        SASRec(N_ITEMS, MAX_LEN, HIDDEN, 1, 1, 0.0, attention="bidirectional", repeat_bias=True)


def test_cpu_dropout_keeps_each_value_with_probability_1_minus_p_scaled_and_passes_gradient_through_the_mask():
    from recsys.model import Dropout

    torch.manual_seed(0)
    drop = Dropout(0.3)
    x = torch.full((1_000_000,), 2.0, requires_grad=True)
    y = drop(x)
    kept = y != 0
    # 1e6 draws: the keep fraction's standard error is 4.6e-4, so 0.7 +- 0.003 is > 6 s.e.
    assert abs(kept.float().mean().item() - 0.7) < 0.003
    assert torch.all(y[kept] == 2.0 / 0.7)  # kept values scaled by 1 / (1 - p)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, kept.float() / 0.7)  # gradient 1 / (1 - p) through kept values, 0 elsewhere
    drop.eval()
    assert torch.equal(drop(x), x)  # identity at evaluation
    assert torch.equal(Dropout(0.0).train()(x), x)

"""The decode runtime's own layout (inference/runtime.py): sibling projections fused into one packed product, small
products padded, float32 attention over a float32 cache. It must compute the model's own function."""

import pytest
import torch

from sortedllm.inference.runtime import MIN_ROWS, Columns, FusedPart, Runtime, linear


@pytest.mark.timeout(60)
@torch.inference_mode()
def test_runtime_logits_match_the_model(tiny_sorted):
    """Prefill, then one token at a time and then three at once: every position's logits are the HF model's."""
    sm = tiny_sorted
    rt = Runtime.of(sm, "float32")
    attn = rt.arch.layers[0].self_attn
    assert all(isinstance(getattr(attn, n), FusedPart) for n in ("q_proj", "k_proj", "v_proj"))
    ids = torch.randint(0, sm.arch.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    want = sm.model(ids).logits[0]
    L = rt.num_layers
    cache = rt.new_cache(1, 12)
    got = []
    for a, b in ((0, 6), (6, 7), (7, 8), (8, 9), (9, 12)):
        cols = Columns(None, torch.arange(a, b)[None], cache)
        h = rt.run(rt.embed(ids[:, a:b]), 0, L, cols, exact=a > 0)
        got.append(rt.logits(h, L)[0])
    torch.testing.assert_close(torch.cat(got), want, atol=2e-4, rtol=2e-4)


@pytest.mark.timeout(30)
def test_padded_product_rows_equal_the_unpadded_ones():
    w = torch.randn(48, 32)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
    x = torch.randn(MIN_ROWS + 2, 32)
    for rows in range(1, MIN_ROWS + 3):
        y = linear(x[:rows], packed, None)
        assert y.shape == (rows, 48)
        torch.testing.assert_close(y, x[:rows] @ w.T, atol=1e-5, rtol=1e-5)
    assert linear(x[None, :2], packed, None).shape == (1, 2, 48)  # leading dims kept

"""The tiled linear + cross-entropy paths against the plain loss: values, float64 gradcheck, no full logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sortedllm.errors import SortedError
from sortedllm.train.chunked import ChunkedLinearCrossEntropy, cce_available, linear_cross_entropy, resolve_impl

NEEDS_GPU = pytest.mark.skipif(not cce_available(),
                               reason="cut-cross-entropy's Triton kernel needs a CUDA GPU (none here)")


def problem(E=3, n=7, d=5, V=11, bias=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(E, n, d, generator=g, dtype=dtype, requires_grad=True)
    W = torch.randn(V, d, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=dtype, requires_grad=True) if bias else None
    t = torch.randint(0, V, (n,), generator=g)
    w = torch.rand(E, generator=g, dtype=dtype) + 0.1
    return h, W, b, t, w


def reference(h, W, b, t, w, softcap=None):
    """What the loss means: full logits of every exit, F.cross_entropy, weighted sum over exits."""
    z = h @ W.T + (b if b is not None else 0)
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), t.repeat(h.shape[0]), reduction="none").view(h.shape[:2])
    return (ce.sum(1) * w).sum(), ce.sum(1)


@pytest.mark.parametrize("softcap, bias, chunk", [(None, False, 3), (3.0, True, 3), (None, True, 1), (3.0, False, 7),
                                                  (None, False, 100)])
def test_chunked_matches_reference_and_passes_gradcheck(softcap, bias, chunk):
    h, W, b, t, w = problem(bias=bias)
    ours, sums = linear_cross_entropy(h, W, t, w, bias=b, softcap=softcap, impl="chunked", chunk_size=chunk)
    ref, ref_sums = reference(h, W, b, t, w, softcap)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-12, atol=1e-12)
    inputs = (h, W) + ((b,) if bias else ())

    def f(h, W, *b):
        return linear_cross_entropy(h, W, t, w, bias=b[0] if b else None, softcap=softcap, impl="chunked",
                                    chunk_size=chunk)[0]

    assert torch.autograd.gradcheck(f, inputs)


def test_dense_reference_path_passes_gradcheck():
    h, W, b, t, w = problem()
    torch.testing.assert_close(linear_cross_entropy(h, W, t, w, impl="dense")[0], reference(h, W, b, t, w)[0])
    assert torch.autograd.gradcheck(lambda h, W: linear_cross_entropy(h, W, t, w, impl="dense")[0], (h, W))


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_trl_path_matches_reference(softcap):
    """TRL's kernel accumulates in float32 whatever the input dtype, so float64 gradcheck cannot resolve it; its
    value and gradients are checked against the float64 reference at float32 precision instead."""
    h, W, b, t, w = problem(E=2, n=9, d=8, V=50)
    ours = linear_cross_entropy(h, W, t, w, softcap=softcap, impl="trl", chunk_size=16)[0]
    g_ours = torch.autograd.grad(ours, (h, W))
    ref = reference(h, W, None, t, w, softcap)[0]
    g_ref = torch.autograd.grad(ref, (h, W))
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(g_ours, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


@NEEDS_GPU
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_cce_path_matches_reference_on_gpu(softcap):
    h, W, b, t, w = (x.cuda().float().detach().requires_grad_(x.requires_grad) if x is not None else None
                     for x in problem(E=2, n=64, d=32, V=1000))
    ours = linear_cross_entropy(h, W, t, w, softcap=softcap, impl="cce")[0]
    ref = reference(h, W, None, t, w, softcap)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    for a, r in zip(torch.autograd.grad(ours, (h, W)), torch.autograd.grad(ref, (h, W))):
        torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-4)


def test_auto_picks_chunked_on_cpu_and_cce_needs_a_gpu():
    assert resolve_impl("auto", torch.device("cpu")) == "chunked"
    if not cce_available():
        with pytest.raises(SortedError, match="cce needs a CUDA GPU"):
            resolve_impl("cce", torch.device("cpu"))
    with pytest.raises(SortedError, match="unknown loss_impl 'fast'"):
        resolve_impl("fast", torch.device("cpu"))


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("impl", ["chunked", "trl"])
def test_never_holds_the_full_logits(impl):
    """Forward and backward of 4 exits x 512 positions over a 4096-word vocabulary with tiles of 64 positions
    (chunked: 4 exits x 64 x 4096 logits) or 512 words (trl: 2048 rows x 512): no tensor reaches even one exit's
    [positions x vocab] logits."""
    E, n, d, V = 4, 512, 16, 4096
    h, W, _, t, w = problem(E, n, d, V, dtype=torch.float32)
    with LargestTensor() as mode:
        loss, _ = linear_cross_entropy(h, W, t, w, impl=impl, chunk_size=64 if impl == "chunked" else 512)
        loss.backward()
    assert mode.largest <= n * V // 2, mode.largest
    with LargestTensor() as dense:
        linear_cross_entropy(h, W, t, w, impl="dense")[0].backward()
    assert dense.largest >= E * n * V  # the check sees the dense path's logits


def test_frozen_head_and_no_grad_skip_gradient_work():
    h, W, _, t, w = problem(dtype=torch.float32)
    W.requires_grad_(False)
    loss, _ = linear_cross_entropy(h, W, t, w, impl="chunked")
    assert loss.grad_fn is not None
    loss.backward()
    assert W.grad is None and h.grad is not None
    with torch.no_grad():
        loss, sums = linear_cross_entropy(h, W, t, w, impl="chunked")
    torch.testing.assert_close(loss, reference(h.detach().double(), W.double(), None, t, w.double())[0].float())


def test_bf16_autocast_runs_matmuls_in_bf16_with_float32_softmax():
    h, W, _, t, w = problem(E=2, n=40, d=32, V=300, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, W, t, w, impl="chunked", chunk_size=8)[0]
        dense = linear_cross_entropy(h, W, t, w, impl="dense")[0]
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, dense, rtol=2e-3, atol=1e-3)
    g_ours = torch.autograd.grad(ours, (h, W))
    g_dense = torch.autograd.grad(dense, (h, W))
    for a, b in zip(g_ours, g_dense):
        assert a.dtype == torch.float32
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_backward_scales_by_the_incoming_gradient():
    h, W, _, t, w = problem()
    loss = ChunkedLinearCrossEntropy.apply(h, W, None, t, w, None, 4)[0]
    g1 = torch.autograd.grad(loss, (h, W), retain_graph=True)
    g3 = torch.autograd.grad(loss * 3, (h, W))
    for a, b in zip(g1, g3):
        torch.testing.assert_close(3 * a, b)


def test_trainer_config_rejects_an_unknown_or_unavailable_loss_impl(tmp_path):
    from sortedllm.train.trainer import SoFTConfig

    with pytest.raises(SortedError, match="unknown loss_impl 'fast'"):
        SoFTConfig(output_dir=str(tmp_path), loss_impl="fast")
    if not cce_available():
        with pytest.raises(SortedError, match="cce needs a CUDA GPU"):
            SoFTConfig(output_dir=str(tmp_path), loss_impl="cce")
    assert SoFTConfig(output_dir=str(tmp_path), loss_impl="trl", loss_chunk_size=4096).loss_chunk_size == 4096

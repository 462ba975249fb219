"""Tests for latentkit.kernels: the Triton kernels and the Flex adapter against a float64 SDPA reference.

Without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1, float32, small tiles), so
every shape here is small. The tolerance is the same-precision PyTorch error times two, plus a floor.
Kernel outputs are poisoned with NaN before each run, so an element a kernel never writes fails the test.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch
from latentkit.kernels.dispatch import masked_attention, prepare_mask
from latentkit.kernels.reference import reference_masked_attention

from latentkit.config import ModelSection
from latentkit.errors import ConfigError
from latentkit.masks import (
    MaskSpec,
    causal_mask,
    full_mask,
    hide_spans_outside_latents,
    packed_documents,
    with_padding,
)

HAS_CUDA = torch.cuda.is_available()  # without CUDA, conftest.py has turned on the Triton interpreter
DEVICE = "cuda" if HAS_CUDA else "cpu"
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def triton_kernels():
    from latentkit.kernels import triton_attention

    return triton_attention


# --- layouts -----------------------------------------------------------------------------------------------


def random_monet_blocks(num_keys: int, count: int, seed: int) -> list[tuple[int, int, int, int]]:
    """`count` random (image_start, image_end, latent_start, latent_end) spans, in order, disjoint."""
    cuts = sorted(random.Random(seed).sample(range(1, num_keys), 4 * count))
    return [tuple(cuts[4 * i : 4 * i + 4]) for i in range(count)]


def random_intervals(batch: int, num_keys: int, causal: bool, seed: int) -> MaskSpec:
    generator = torch.Generator().manual_seed(seed)
    return MaskSpec(
        causal, torch.randint(0, num_keys + 1, (batch, num_keys, 4), generator=generator, dtype=torch.int32)
    )


def left_padded(batch_pads: list[int], num_keys: int) -> torch.Tensor:
    """bool [B, Nk] key_is_valid with the given number of padding tokens on the left of each row."""
    return torch.arange(num_keys).unsqueeze(0) >= torch.tensor(batch_pads).unsqueeze(1)


@dataclass(frozen=True)
class Case:
    spec: MaskSpec
    heads: int
    kv_heads: int
    head_dim: int
    num_queries: int | None = None  # None: Nq = Nk
    scale: float | None = None


CASES: dict[str, Case] = {
    "causal": Case(causal_mask(2, 37), heads=2, kv_heads=2, head_dim=16),
    "monet-gqa": Case(
        hide_spans_outside_latents(
            [random_monet_blocks(70, 3, seed=1), random_monet_blocks(70, 2, seed=2)], 70
        ),
        heads=2,
        kv_heads=1,
        head_dim=64,
    ),
    "monet-left-padding-d80": Case(
        hide_spans_outside_latents(
            [random_monet_blocks(45, 2, seed=3), [(9, 20, 22, 30)]], 45, key_is_valid=left_padded([0, 7], 45)
        ),
        heads=2,
        kv_heads=2,
        head_dim=80,
    ),
    "packed-documents-trailing-padding": Case(
        packed_documents([[20, 13, 9], [30, 25]], 61), heads=3, kv_heads=1, head_dim=16, scale=0.3
    ),
    "packed-documents-bidirectional": Case(
        packed_documents([[12, 17, 6], [20, 10]], 41, causal=False), heads=2, kv_heads=1, head_dim=16
    ),
    "full-bidirectional": Case(full_mask(1, 50), heads=2, kv_heads=1, head_dim=20),
    "random-noncausal": Case(random_intervals(2, 33, causal=False, seed=4), heads=2, kv_heads=2, head_dim=16),
    "random-causal-fewer-queries": Case(
        random_intervals(2, 53, causal=True, seed=5), heads=3, kv_heads=1, head_dim=16, num_queries=19
    ),
    "monet-one-query": Case(
        hide_spans_outside_latents([random_monet_blocks(40, 2, seed=6)], 40),
        heads=4,
        kv_heads=2,
        head_dim=64,
        num_queries=1,
    ),
}


# --- helpers -----------------------------------------------------------------------------------------------


def random_inputs(case: Case, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v, grad_out on DEVICE."""
    spec = case.spec
    nq = case.num_queries or spec.num_keys
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(spec.batch_size, case.heads, nq, case.head_dim, generator=generator)
    k, v = (
        torch.randn(spec.batch_size, case.kv_heads, spec.num_keys, case.head_dim, generator=generator)
        for _ in range(2)
    )
    grad_out = torch.randn(q.shape, generator=generator)
    return tuple(x.to(DEVICE, dtype) for x in (q, k, v, grad_out))


def reference_with_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    spec: MaskSpec,
    scale: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:
    """(out, dq, dk, dv) of the SDPA reference computed in `dtype`."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out = reference_masked_attention(q, k, v, spec, scale)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out.to(dtype)))


def assert_within_torch_error(
    ours: torch.Tensor, exact: torch.Tensor, torch_same_dtype: torch.Tensor, what: str
) -> None:
    ours_error = (ours.double() - exact).abs().max().item()  # NaN (an unwritten element) fails the comparison
    torch_error = (torch_same_dtype.double() - exact).abs().max().item()
    bound = 2 * torch_error + FLOOR[ours.dtype]
    assert ours_error <= bound, (
        f"{what}: max error {ours_error:.3g} > {bound:.3g} (PyTorch's own: {torch_error:.3g})"
    )


def poisoned(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, float("nan"))


def run_kernels(case: Case, q, k, v, grad_out, scale: float) -> tuple[torch.Tensor, ...]:
    """(out, dq, dk, dv) from the launchers, every output buffer poisoned first."""
    kernels = triton_kernels()
    tiles = kernels.prepare_tile_mask(case.spec, DEVICE)
    out = poisoned(q)
    lse = torch.full(q.shape[:3], float("nan"), device=DEVICE)
    kernels.attention_forward(q, k, v, tiles, scale, out, lse)
    dq, dk, dv = poisoned(q), poisoned(k), poisoned(v)
    kernels.attention_backward(q, k, v, out, lse, grad_out, tiles, scale, dq, dk, dv)
    return out, dq, dk, dv


def check_against_reference(case: Case, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    q, k, v, grad_out = random_inputs(case, dtype)
    scale = case.scale or 1.0 / math.sqrt(case.head_dim)
    ours = run_kernels(case, q, k, v, grad_out, scale)
    exact = reference_with_grads(q, k, v, grad_out, case.spec, scale, torch.float64)
    same_dtype = reference_with_grads(q, k, v, grad_out, case.spec, scale, dtype)
    for what, mine, truth, theirs in zip(("out", "dq", "dk", "dv"), ours, exact, same_dtype):
        assert_within_torch_error(mine, truth, theirs, what)
    return ours


# --- Triton kernels ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_float64_reference(name):
    case = CASES[name]
    out, dq, _, _ = check_against_reference(case, torch.float32)
    nq = out.shape[2]
    empty_rows = ~case.spec.to_dense(nq).to(DEVICE).any(-1).squeeze(1)  # [B, Nq]
    assert torch.equal(out.abs().amax((1, 3))[empty_rows], torch.zeros(int(empty_rows.sum()), device=DEVICE))
    assert torch.equal(dq.abs().amax((1, 3))[empty_rows], torch.zeros(int(empty_rows.sum()), device=DEVICE))


def test_layouts_include_fully_masked_rows_and_every_tile_kind():
    kernels = triton_kernels()
    assert not CASES["monet-left-padding-d80"].spec.to_dense().any(-1).all()
    assert not CASES["packed-documents-trailing-padding"].spec.to_dense().any(-1).all()
    tiles = kernels.prepare_tile_mask(CASES["monet-gqa"].spec, "cpu")
    kinds = kernels.tile_kinds(tiles, 70, 16, 16)
    assert {kernels.SKIPPED, kernels.FULL, kernels.PARTIAL} <= set(kinds.unique().tolist())


def test_skipped_key_tiles_are_never_read():
    """Key tiles hidden from every row hold NaN keys and values: the outputs stay finite and exact."""
    kernels = triton_kernels()
    configs = [*kernels.FWD_CONFIGS, *kernels.DKDV_CONFIGS, *kernels.DQ_CONFIGS]
    padding = max(config.kwargs["BLOCK_N"] for config in configs)
    spec = with_padding(causal_mask(1, 2 * padding), torch.arange(2 * padding).unsqueeze(0) < padding)
    case = Case(spec, heads=2, kv_heads=1, head_dim=16)
    q, k, v, grad_out = random_inputs(case, torch.float32)
    scale = 1.0 / math.sqrt(case.head_dim)
    exact = reference_with_grads(q, k, v, grad_out, spec, scale, torch.float64)
    k_poisoned, v_poisoned = k.clone(), v.clone()
    k_poisoned[:, :, padding:] = float("nan")
    v_poisoned[:, :, padding:] = float("nan")
    ours = run_kernels(case, q, k_poisoned, v_poisoned, grad_out, scale)
    for what, mine, truth in zip(("out", "dq", "dk", "dv"), ours, exact):
        torch.testing.assert_close(mine.double(), truth, atol=1e-5, rtol=1e-5, msg=what)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("block_m", "block_n"), [(16, 16), (32, 16), (16, 64)])
def test_tile_classification_is_sound(causal, block_m, block_n):
    """SKIPPED tiles hold no visible pair and FULL tiles no hidden one (the dense mask decides)."""
    kernels = triton_kernels()
    specs = [
        random_intervals(2, 75, causal, seed=7),
        hide_spans_outside_latents(
            [random_monet_blocks(75, 3, seed=8), random_monet_blocks(75, 1, seed=9)], 75
        ),
        packed_documents([[30, 25, 20], [40]], 75, causal=causal),
    ]
    for spec in specs:
        for nq in (75, 21):
            kinds = kernels.tile_kinds(kernels.prepare_tile_mask(spec, "cpu"), nq, block_m, block_n)
            dense = spec.to_dense(nq)[:, 0]
            for b, i, j in torch.cartesian_prod(*(torch.arange(s) for s in kinds.shape)).tolist():
                tile = dense[b, i * block_m : (i + 1) * block_m, j * block_n : (j + 1) * block_n]
                full_width = (j + 1) * block_n <= spec.num_keys
                if kinds[b, i, j] == kernels.SKIPPED:
                    assert not tile.any()
                elif kinds[b, i, j] == kernels.FULL:
                    assert tile.all() and full_width


def test_causal_classification_is_exact():
    kernels = triton_kernels()
    kinds = kernels.tile_kinds(kernels.prepare_tile_mask(causal_mask(1, 64), "cpu"), 64, 16, 16)[0]
    upper = torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1)
    assert (kinds[upper] == kernels.SKIPPED).all()
    assert (kinds.diagonal() == kernels.PARTIAL).all()
    assert (kinds[~upper & ~torch.eye(4, dtype=torch.bool)] == kernels.FULL).all()


def test_autograd_through_dispatch_with_strided_inputs():
    """The functional path (autograd.Function) on q/k/v laid out as HF passes them ([B, N, H, D] memory)."""
    case = CASES["monet-gqa"]
    q, k, v, grad_out = random_inputs(case, torch.float32, seed=1)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v))
    out = masked_attention(q, k, v, case.spec, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    scale = 1.0 / math.sqrt(case.head_dim)
    exact = reference_with_grads(q, k, v, grad_out, case.spec, scale, torch.float64)
    same_dtype = reference_with_grads(q, k, v, grad_out, case.spec, scale, torch.float32)
    for what, mine, truth, theirs in zip(
        ("out", "dq", "dk", "dv"), (out.detach(), *grads), exact, same_dtype
    ):
        assert_within_torch_error(mine, truth, theirs, what)


# --- dispatch ----------------------------------------------------------------------------------------------


def test_auto_backend_off_cuda_is_the_reference():
    if HAS_CUDA:
        pytest.skip("auto picks triton on CUDA")
    q, k, v, _ = random_inputs(CASES["causal"], torch.float32)
    spec = CASES["causal"].spec
    assert torch.equal(masked_attention(q, k, v, spec), reference_masked_attention(q, k, v, spec))


def test_dispatch_errors():
    q, k, v, _ = random_inputs(CASES["causal"], torch.float32)
    spec = CASES["causal"].spec
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        masked_attention(q, k, v, spec, backend="nope")
    with pytest.raises(ValueError, match="head dims up to 128"):
        masked_attention(*(x.repeat(1, 1, 1, 10) for x in (q, k, v)), spec, backend="triton")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        masked_attention(
            q.repeat(1, 3, 1, 1), k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), spec, backend="triton"
        )
    with pytest.raises(ValueError, match="do not match the mask"):
        masked_attention(q, k, v, causal_mask(2, 36), backend="triton")
    with pytest.raises(ValueError, match="share one dtype"):
        masked_attention(q, k.double(), v, spec, backend="triton")
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="float32 only"):
            masked_attention(*(x.bfloat16() for x in (q, k, v)), spec, backend="triton")


def test_triton_on_cpu_without_the_interpreter_is_a_config_error(monkeypatch):
    if HAS_CUDA:
        pytest.skip("CPU only")
    monkeypatch.setattr(triton_kernels(), "INTERPRETING", False)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        prepare_mask(causal_mask(1, 8), 8, "triton", torch.device("cpu"))


# --- FlexAttention ----------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@torch.no_grad()
def test_flex_forward_matches_reference():
    for name in ("monet-left-padding-d80", "random-causal-fewer-queries", "packed-documents-bidirectional"):
        case = CASES[name]
        q, k, v, _ = random_inputs(case, torch.float32)
        out = masked_attention(q, k, v, case.spec, scale=case.scale, backend="flex")
        exact = reference_masked_attention(q.double(), k.double(), v.double(), case.spec, case.scale)
        torch.testing.assert_close(out.double(), exact, atol=1e-5, rtol=1e-5, msg=name)


def test_flex_backward_on_cpu_is_a_config_error():
    if HAS_CUDA:
        pytest.skip("CPU only")
    q, k, v, _ = random_inputs(CASES["causal"], torch.float32)
    with pytest.raises(ConfigError, match="no backward"):
        masked_attention(q.requires_grad_(), k, v, CASES["causal"].spec, backend="flex")


# --- backbone ----------------------------------------------------------------------------------------------


def backbone_loss_and_grads(
    attn_backend: str, spec: MaskSpec, ids: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    from latentkit.backbone import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone(ModelSection(preset="tiny-causal-lm", attn_backend=attn_backend))
    backbone.model.to(DEVICE)
    positions = torch.arange(ids.shape[1], device=DEVICE).expand_as(ids)
    hidden = backbone.forward(backbone.embed(ids), positions, spec).last_hidden_state
    logits = backbone.logits(hidden)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {
        name: p.grad for name, p in backbone.model.named_parameters() if p.grad is not None
    }


def test_tiny_backbone_trains_through_triton_like_sdpa():
    n = 36
    valid = left_padded([0, 5], n)
    spec = hide_spans_outside_latents(
        [random_monet_blocks(n, 2, seed=10), [(8, 15, 17, 21)]], n, key_is_valid=valid
    )
    ids = torch.randint(0, 500, (2, n), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    loss, grads = backbone_loss_and_grads("triton", spec, ids)
    expected_loss, expected_grads = backbone_loss_and_grads("sdpa", spec, ids)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


# --- GPU only ----------------------------------------------------------------------------------------------


def gpu_case(head_dim: int, num_queries: int | None = None) -> Case:
    """Qwen2.5-VL-7B heads (28 query, 4 KV) on Monet stage-2 layouts, one of them left-padded."""
    n = 1031
    blocks = [[(100, 300, 302, 310), (400, 650, 651, 659)], [(60, 250, 255, 263)]]
    spec = hide_spans_outside_latents(blocks, n, key_is_valid=left_padded([0, 40], n))
    return Case(spec, heads=28, kv_heads=4, head_dim=head_dim, num_queries=num_queries)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("head_dim", "num_queries"), [(64, None), (80, None), (128, None), (128, 77)])
def test_gpu_low_precision_matches_reference(dtype, head_dim, num_queries):
    check_against_reference(gpu_case(head_dim, num_queries), dtype)


@pytest.mark.gpu
@gpu
def test_gpu_backward_is_deterministic():
    case = gpu_case(128)
    inputs = random_inputs(case, torch.bfloat16)
    first = run_kernels(case, *inputs, scale=0.1)
    second = run_kernels(case, *inputs, scale=0.1)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
@gpu
def test_gpu_flex_matches_reference():
    case = gpu_case(64)
    q, k, v, grad_out = random_inputs(case, torch.bfloat16)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = masked_attention(q, k, v, case.spec, backend="flex")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    scale = 1.0 / math.sqrt(case.head_dim)
    exact = reference_with_grads(q, k, v, grad_out, case.spec, scale, torch.float64)
    same_dtype = reference_with_grads(q, k, v, grad_out, case.spec, scale, torch.bfloat16)
    for what, mine, truth, theirs in zip(
        ("out", "dq", "dk", "dv"), (out.detach(), *grads), exact, same_dtype
    ):
        assert_within_torch_error(mine, truth, theirs, what)

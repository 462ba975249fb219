"""Segment-masked attention on a GPU: our Triton kernels beside SDPA + dense mask, FlexAttention, flash-attn.

Usage (CUDA only; `--help` works anywhere):
    python benchmarks/attention.py                      # N = 2K..32K, causal / monet / packed, bf16, D=128
    python benchmarks/attention.py --seq-lens 4096 16384 --masks monet --heads 28 --kv-heads 4
    python benchmarks/attention.py --check              # bf16 correctness sweep against an fp32 reference

Shapes: q [B, H, N, D], k/v [B, Hkv, N, D], bf16, random normal data; B = max(1, --total-tokens // N) so that
every N does about the same work per head. Masks (one random layout per batch row, fixed seed):
  * causal: plain causal attention;
  * monet: Monet stage-2 layouts: auxiliary images (--image-fraction of the tokens, default 35%, in
    max(2, N // 4096) images), each followed by a 2-token marker and a 16-token latent block; text between;
  * packed: documents of random lengths (128 .. N/2 tokens) packed back to back, causal within each.
Implementations, all through `latentkit.kernels.dispatch` except flash-attn:
  * sdpa-dense: `MaskSpec.to_dense()` into PyTorch SDPA (what Monet's official code does, there on the CPU);
  * flex: FlexAttention, compiled, BlockMask from the interval mask_mod (compiled `create_block_mask`);
  * flash-attn: `flash_attn_func(causal=True)`, causal mask only, when flash-attn is installed: the ceiling;
  * triton: ours (autotuned; the first call per shape tunes).
Columns: "prep ms" is the per-step mask preparation (dense mask / BlockMask / tile bounds), timed apart from
attention because one preparation serves every layer. fwd / bwd / fwd+bwd ms are the medians of
`triton.testing.do_bench` (after warm-up; bwd is `out.backward(dO)` on a kept graph). TFLOP/s count only
the (query, key) pairs the mask allows: fwd = 4 * D * pairs * H, bwd = 2.5 x fwd (spec "Measuring").
"peak MiB" is the peak CUDA memory of one prepare + fwd + bwd above the inputs. "skip %" is the fraction of
(query tile, key tile) pairs skipped: ours with the forward's tuned tiles, flex from its BlockMask.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from latentkit.kernels.dispatch import attend, prepare_mask
from latentkit.kernels.reference import reference_masked_attention

from latentkit.masks import MaskSpec, causal_mask, hide_spans_outside_latents, packed_documents, with_padding

MASKS = ("causal", "monet", "packed")
IMPLEMENTATIONS = ("sdpa-dense", "flex", "flash-attn", "triton")
LATENT_TOKENS = 16
MARKER_TOKENS = 2  # between an auxiliary image and its latent block (the latent-start marker and a newline)


# --- layouts -----------------------------------------------------------------------------------------------


def monet_blocks(num_keys: int, image_fraction: float, rng: random.Random) -> list[tuple[int, int, int, int]]:
    """Random Monet stage-2 spans: images of equal size totalling `image_fraction` of the tokens."""
    num_images = max(2, num_keys // 4096)
    image_tokens = int(num_keys * image_fraction) // num_images
    text_tokens = num_keys - num_images * (image_tokens + MARKER_TOKENS + LATENT_TOKENS)
    if image_tokens < 1 or text_tokens < 0:
        raise ValueError(f"a Monet layout of {num_images} images needs more than {num_keys} tokens")
    cuts = sorted(rng.randint(0, text_tokens) for _ in range(num_images))
    blocks, position, previous_cut = [], 0, 0
    for cut in cuts:
        position += cut - previous_cut  # the text before this image
        image_end = position + image_tokens
        latent_start = image_end + MARKER_TOKENS
        blocks.append((position, image_end, latent_start, latent_start + LATENT_TOKENS))
        position, previous_cut = latent_start + LATENT_TOKENS, cut
    return blocks


def document_lengths(num_keys: int, rng: random.Random) -> list[int]:
    lengths: list[int] = []
    while sum(lengths) < num_keys:
        lengths.append(min(rng.randint(128, max(128, num_keys // 2)), num_keys - sum(lengths)))
    return lengths


def build_mask(kind: str, batch: int, num_keys: int, image_fraction: float, seed: int) -> MaskSpec:
    rng = random.Random(seed)
    if kind == "causal":
        return causal_mask(batch, num_keys)
    if kind == "monet":
        return hide_spans_outside_latents(
            [monet_blocks(num_keys, image_fraction, rng) for _ in range(batch)], num_keys
        )
    return packed_documents([document_lengths(num_keys, rng) for _ in range(batch)], num_keys)


def allowed_pairs(spec: MaskSpec, num_queries: int) -> int:
    """Visible (query, key) pairs summed over the batch, in O(N): per column, rows minus the two intervals."""
    num_keys = spec.num_keys
    s1, e1, s2, e2 = spec.intervals.long().unbind(-1)
    columns = torch.arange(num_keys, device=spec.intervals.device)
    first = torch.full_like(columns, num_keys - num_queries)
    low = torch.maximum(first, columns) if spec.causal else first  # rows [low, Nk) before the intervals

    def overlap(starts: list[torch.Tensor], ends: list[torch.Tensor]) -> torch.Tensor:
        start = torch.stack(torch.broadcast_tensors(*starts)).amax(0)
        end = torch.stack(torch.broadcast_tensors(*ends)).amin(0)
        return (end - start).clamp(min=0)

    top = torch.full_like(columns, num_keys)
    visible = (
        (top - low).clamp(min=0)
        - overlap([low, s1], [top, e1])
        - overlap([low, s2], [top, e2])
        + overlap([low, s1, s2], [top, e1, e2])
    )
    return int(visible.sum())


# --- timing -------------------------------------------------------------------------------------------------


@dataclass
class Row:
    mask: str
    seq_len: int
    batch: int
    implementation: str
    prep_ms: float | None = None
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    total_ms: float | None = None
    peak_mib: float | None = None
    skipped: float | None = None
    note: str = ""


def bench(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def our_skipped_fraction(prepared, num_queries: int) -> float:
    from latentkit.kernels import triton_attention

    config = getattr(triton_attention._attn_fwd, "best_config", None) or triton_attention.FWD_CONFIGS[0]
    kinds = triton_attention.tile_kinds(
        prepared.tiles, num_queries, config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    )
    return float((kinds == triton_attention.SKIPPED).float().mean())


def measure(
    implementation: str,
    spec: MaskSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
) -> Row:
    """One implementation on one shape and mask (spec is on the GPU)."""
    num_queries = q.shape[2]
    row = Row("", num_queries, q.shape[0], implementation)
    inputs = [q, k, v]
    if implementation == "flash-attn":
        from flash_attn import flash_attn_func

        # flash-attn takes [B, N, H, D]
        inputs = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]
        grad_out = grad_out.transpose(1, 2).contiguous()

        def prepare() -> None:
            return None

        def forward(_: object) -> torch.Tensor:
            return flash_attn_func(*inputs, causal=True)
    else:

        def prepare():
            return prepare_mask(spec, num_queries, implementation.removesuffix("-dense"), q.device)

        def forward(prepared) -> torch.Tensor:
            return attend(*inputs, prepared, None)

    prepared = prepare()
    forward(prepared).backward(grad_out)  # compiles / autotunes
    for x in inputs:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    forward(prepare()).backward(grad_out)
    torch.cuda.synchronize()
    row.peak_mib = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    for x in inputs:
        x.grad = None

    if implementation != "flash-attn":
        row.prep_ms = bench(prepare)
    row.fwd_ms = bench(lambda: forward(prepared))
    out = forward(prepared)
    row.bwd_ms = bench(lambda: out.backward(grad_out, retain_graph=True), grad_to_none=inputs)
    row.total_ms = bench(lambda: forward(prepared).backward(grad_out), grad_to_none=inputs)
    if implementation == "triton":
        row.skipped = our_skipped_fraction(prepared, num_queries)
    elif implementation == "flex":
        row.skipped = prepared.block_mask.sparsity() / 100
    return row


def tflops(ms: float | None, flops: float) -> str:
    return "-" if ms is None else f"{flops / ms / 1e9:.0f}"


def number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(rows: list[Row], pairs: dict[tuple[str, int], int], heads: int, head_dim: int) -> None:
    header = (
        f"{'mask':<7} {'N':>6} {'B':>3} {'impl':<11} "
        f"{'prep ms':>8} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} "
        f"{'fwd TF/s':>8} {'bwd TF/s':>8} {'f+b TF/s':>8} {'peak MiB':>9} {'skip %':>6}  note"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        fwd_flops = 4 * head_dim * pairs[(row.mask, row.seq_len)] * heads  # spec "Measuring"
        print(
            f"{row.mask:<7} {row.seq_len:>6} {row.batch:>3} {row.implementation:<11} "
            f"{number(row.prep_ms):>8} "
            f"{number(row.fwd_ms):>8} {number(row.bwd_ms):>8} {number(row.total_ms):>8} "
            f"{tflops(row.fwd_ms, fwd_flops):>8} {tflops(row.bwd_ms, 2.5 * fwd_flops):>8} "
            f"{tflops(row.total_ms, 3.5 * fwd_flops):>8} {number(row.peak_mib, 0):>9} "
            f"{number(None if row.skipped is None else 100 * row.skipped, 1):>6}  {row.note}"
        )


def random_inputs(
    batch: int,
    heads: int,
    kv_heads: int,
    num_queries: int,
    num_keys: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device="cuda", dtype=dtype)

    q = randn(batch, heads, num_queries, head_dim).requires_grad_()
    k = randn(batch, kv_heads, num_keys, head_dim).requires_grad_()
    v = randn(batch, kv_heads, num_keys, head_dim).requires_grad_()
    return q, k, v, randn(batch, heads, num_queries, head_dim)


def benchmark_main(args: argparse.Namespace) -> None:
    rows: list[Row] = []
    pairs: dict[tuple[str, int], int] = {}
    for seq_len in args.seq_lens:
        batch = max(1, args.total_tokens // seq_len)
        q, k, v, grad_out = random_inputs(
            batch, args.heads, args.kv_heads, seq_len, seq_len, args.head_dim, torch.bfloat16, args.seed
        )
        for mask in args.masks:
            spec = build_mask(mask, batch, seq_len, args.image_fraction, args.seed).to("cuda")
            pairs[(mask, seq_len)] = allowed_pairs(spec, seq_len)
            for implementation in args.implementations:
                if implementation == "flash-attn" and (mask != "causal" or not flash_attn_available()):
                    continue
                try:
                    row = measure(implementation, spec, q, k, v, grad_out)
                except torch.cuda.OutOfMemoryError:
                    row = Row("", seq_len, batch, implementation, note="out of memory")
                row.mask = mask
                rows.append(row)
                for x in (q, k, v):
                    x.grad = None
                torch.cuda.empty_cache()
                print(f"done: {mask} N={seq_len} {implementation}", file=sys.stderr, flush=True)
    print_table(rows, pairs, args.heads, args.head_dim)


# --- correctness sweep --------------------------------------------------------------------------------------


def check_main(args: argparse.Namespace) -> None:
    """Ours in bf16 against an fp32 reference; passes when within 2x PyTorch's own bf16 error + 1e-3."""
    failures = 0
    print(
        f"{'mask':<8} {'Nq':>5} {'Nk':>5} {'H':>3} {'Hkv':>3} {'D':>4}  "
        f"{'err out/dq/dk/dv (ours)':<34} {'(torch bf16)':<34} result"
    )
    shapes = [(1, 1), (17, 17), (300, 300), (1000, 1000), (2049, 2049), (77, 1031), (1, 1031)]
    for (num_queries, num_keys), head_dim, (heads, kv_heads), mask in (
        (shape, d, h, m)
        for shape in shapes
        for d in (64, 80, 128)
        for h in ((28, 4), (8, 8))
        for m in (*MASKS, "padded")
        if shape[1] >= 128 or m in ("causal", "packed")  # Monet layouts need room for images and latents
    ):
        if mask == "padded":  # left padding: fully masked rows
            valid = torch.arange(num_keys).unsqueeze(0) >= torch.tensor([[0], [num_keys // 5]])
            spec = with_padding(build_mask("monet", 2, num_keys, args.image_fraction, args.seed), valid)
        else:
            spec = build_mask(mask, 2, num_keys, args.image_fraction, args.seed)
        spec = spec.to("cuda")
        q, k, v, grad_out = random_inputs(
            2, heads, kv_heads, num_queries, num_keys, head_dim, torch.bfloat16, args.seed
        )
        errors = {}
        for name, backend, dtype in (("ours", "triton", torch.bfloat16), ("torch", "sdpa", torch.bfloat16)):
            inputs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
            out = attend(*inputs, prepare_mask(spec, num_queries, backend, q.device), None)
            grads = torch.autograd.grad(out, inputs, grad_out)
            errors[name] = [out.detach(), *grads]
        exact_inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
        exact_out = reference_masked_attention(*exact_inputs, spec)
        exact = [exact_out.detach(), *torch.autograd.grad(exact_out, exact_inputs, grad_out.float())]
        ours = [(a.float() - b).abs().max().item() for a, b in zip(errors["ours"], exact)]
        theirs = [(a.float() - b).abs().max().item() for a, b in zip(errors["torch"], exact)]
        passed = all(o <= 2 * t + 1e-3 for o, t in zip(ours, theirs))  # NaN fails
        failures += not passed
        print(
            f"{mask:<8} {num_queries:>5} {num_keys:>5} {heads:>3} {kv_heads:>3} {head_dim:>4}  "
            f"{'/'.join(f'{e:.1e}' for e in ours):<34} {'/'.join(f'{e:.1e}' for e in theirs):<34} "
            f"{'ok' if passed else 'FAIL'}"
        )
    print(f"{failures} failure(s)")
    sys.exit(1 if failures else 0)


# --- entry point --------------------------------------------------------------------------------------------


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def print_environment(args: argparse.Namespace) -> None:
    import triton

    flash = "not installed"
    if flash_attn_available():
        import flash_attn

        flash = flash_attn.__version__
    print(
        f"# {datetime.date.today()}  {torch.cuda.get_device_name()}  torch {torch.__version__}  "
        f"triton {triton.__version__}  flash-attn {flash}  python {platform.python_version()}"
    )
    print(
        f"# bf16, H={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, "
        f"tokens per batch ~{args.total_tokens}, "
        f"image fraction {args.image_fraction}, seed {args.seed}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS))
    parser.add_argument(
        "--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS)
    )
    parser.add_argument("--total-tokens", type=int, default=32768, help="B = max(1, total_tokens // N)")
    parser.add_argument("--heads", type=int, default=28, help="query heads (Qwen2.5-VL-7B: 28)")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads (Qwen2.5-VL-7B: 4)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument(
        "--image-fraction", type=float, default=0.35, help="auxiliary-image share of monet tokens"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--check", action="store_true", help="bf16 correctness sweep against an fp32 reference"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    print_environment(args)
    if args.check:
        check_main(args)
    else:
        benchmark_main(args)


if __name__ == "__main__":
    main()

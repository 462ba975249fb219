"""LatentUM's MoME routing cost: forward + backward of a Qwen2.5-VL text decoder with generation-branch experts
(`methods/latentum/mome.py`) at a given share of routed tokens, beside the same decoder without experts.

Usage:
    python benchmarks/latentum_mome.py                                  # hidden 512, 2 layers, 2 x 512 tokens
    python benchmarks/latentum_mome.py --hidden 1024 --layers 2 --shares 0 0.25 0.5 1 --repeats 10

The decoder has random weights (a config, nothing downloaded), float32 on the CPU or bfloat16 on CUDA. As in
stage vision the originals are frozen and the copies train: the backward computes the copies' gradients and the
gradient of the inputs. Routed tokens are a random `share` of the positions (the same draw for every variant).
A step is one forward and one backward; the table gives the median over `--repeats` after `--warmup` steps, of
the wall-clock time and of the process's CPU time, and the FLOPs of one step as torch's `FlopCounterMode` counts
them (matmuls and attention; unlike the times, independent of other jobs on a shared machine)."""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from latentkit.methods.latentum.mome import ROUTE, GenerationExperts, attach_experts
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel


def decoder(hidden: int, layers: int, heads: int, device: torch.device, dtype: torch.dtype):
    half = (
        hidden // heads // 2
    )  # rotary frequencies per head, split over (temporal, height, width) as Qwen's 1:1.5:1.5
    spatial = 3 * half // 8
    config = Qwen2_5_VLTextConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        vocab_size=16,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": [half - 2 * spatial, spatial, spatial],
        },
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2_5_VLTextModel(config).to(device, dtype)


def step_flops(model, embeds: torch.Tensor, extras: dict) -> int:
    """FLOPs of one step as torch's FlopCounterMode counts them (matmuls, attention): independent of the load."""
    with FlopCounterMode(display=False) as counter:
        model(
            inputs_embeds=embeds, use_cache=False, **extras
        ).last_hidden_state.float().square().mean().backward()
    embeds.grad = None
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def step_seconds(model, embeds: torch.Tensor, extras: dict, warmup: int, repeats: int) -> tuple[float, float]:
    """Median wall-clock and process CPU seconds per step (CPU time is less skewed by other jobs' load)."""
    times, cpu = [], []
    for index in range(warmup + repeats):
        if embeds.device.type == "cuda":
            torch.cuda.synchronize()
        started, cpu_started = time.perf_counter(), time.process_time()
        out = model(inputs_embeds=embeds, use_cache=False, **extras).last_hidden_state
        out.float().square().mean().backward()
        if embeds.device.type == "cuda":
            torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
        embeds.grad = None
        model.zero_grad(set_to_none=True)
    return statistics.median(times), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = decoder(args.hidden, args.layers, args.heads, device, dtype)
    model.requires_grad_(False)
    shape = (args.batch_size, args.tokens)
    embeds = torch.randn(*shape, args.hidden, device=device, dtype=dtype, requires_grad=True)
    draw = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)

    plain = (*step_seconds(model, embeds, {}, args.warmup, args.repeats), step_flops(model, embeds, {}))
    experts = GenerationExperts(model.layers).requires_grad_(True)
    attach_experts(model.layers, experts)
    print(
        f"{device.type} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.machine()}), "
        f"torch {torch.__version__}, {dtype}; hidden {args.hidden}, {args.layers} layers, "
        f"{args.batch_size} x {args.tokens} tokens, median of {args.repeats}"
    )
    print("| routed share | ms per step | CPU ms per step | GFLOP per step | each vs. no experts |")
    print("|---|---|---|---|---|")
    print(
        f"| no experts | {plain[0] * 1e3:.1f} | {plain[1] * 1e3:.1f} | {plain[2] / 1e9:.2f} | 1.00, 1.00, 1.00 |"
    )
    for share in args.shares:
        extras = {ROUTE: draw < share}
        wall, cpu = step_seconds(model, embeds, extras, args.warmup, args.repeats)
        flops = step_flops(model, embeds, extras)
        ratios = f"{wall / plain[0]:.2f}, {cpu / plain[1]:.2f}, {flops / plain[2]:.2f}"
        print(f"| {share:.2f} | {wall * 1e3:.1f} | {cpu * 1e3:.1f} | {flops / 1e9:.2f} | {ratios} |")


if __name__ == "__main__":
    main()

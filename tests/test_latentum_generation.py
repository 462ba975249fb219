"""LatentUM's generation side pinned by independent computations: MoME routing (an all-False route changes nothing;
a mixed route equals a hand-written forward through the copies; outputs and gradients equal both branches computed
on every row and selected by the route, with each branch computing only its own rows), the code head's teacher forcing and its guided
sampling distribution (by hand), the code noise of stage language, stage vision's U ⊕ G layout and block mask
(against a dense mask built from the definition), what each stage trains, one-line errors; and the three stages
end to end through the CLI, with the run loaded back bit for bit."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import latentkit, metrics, train_args
from latentkit.methods.latentum import Latentum, LatentumConfig
from latentkit.methods.latentum.code_head import CodeHead, GuidanceParams, guided_probabilities, sample_codes
from latentkit.methods.latentum.language import noisy_codes
from latentkit.methods.latentum.mome import ROUTE, GenerationExperts, attach_experts
from latentkit.methods.latentum.vision import GENERATION, generation_blocks, generation_mask
from safetensors.torch import load_file

import latentkit as lk
from latentkit.backbone import build_backbone
from latentkit.config import ModelSection, build_config
from latentkit.errors import ConfigError
from latentkit.layout import Kind, collate
from latentkit.masks import causal_mask
from latentkit.optim import freeze_and_group, trainable_parameters
from latentkit.records import load_split
from latentkit.registry import StageProgress
from latentkit.synth.maze import generate_synth_maze


@pytest.fixture(scope="module")
def maze(tmp_path_factory):
    root = tmp_path_factory.mktemp("maze")
    generate_synth_maze(root, n_train=3, n_val=0, n_test=0)
    return load_split(root, "train").samples


def tiny_latentum(preset: str = "tiny-qwen2.5-vl") -> Latentum:
    torch.manual_seed(0)
    method = Latentum(LatentumConfig())
    method.setup(build_backbone(ModelSection(preset=preset)))
    return method


def perturb_experts(experts: GenerationExperts) -> None:
    """Make the generation branch differ from the text weights, so a test can tell the branches apart."""
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))


# --- MoME ----------------------------------------------------------------------------------------------------
def test_an_all_false_route_leaves_the_model_exactly_as_it_was():
    torch.manual_seed(0)
    backbone = build_backbone(ModelSection(preset="tiny-qwen2.5-vl"))
    embeds = torch.randn(2, 7, backbone.hidden_size)
    positions = torch.arange(7).expand(3, 2, 7)
    mask = causal_mask(2, 7)
    with torch.no_grad():
        unwrapped = backbone.logits(backbone.forward(embeds, positions, mask).last_hidden_state)
    method = Latentum(LatentumConfig())
    method.setup(backbone)
    perturb_experts(method.experts)
    vocabulary = unwrapped.shape[-1]  # setup adds the observation tags' rows
    with torch.no_grad():
        for extras in (None, {ROUTE: torch.zeros(2, 7, dtype=torch.bool)}):
            hidden = backbone.forward(embeds, positions, mask, extras=extras).last_hidden_state
            assert torch.equal(backbone.logits(hidden)[..., :vocabulary], unwrapped)
        routed = backbone.forward(embeds, positions, mask, extras={ROUTE: torch.ones(2, 7)}).last_hidden_state
    assert not torch.allclose(routed, hidden, atol=1e-3)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def hand_forward(method: Latentum, embeds: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
    """One sequence [N, D] through the decoder written out: RMSNorms, RoPE (text positions: M-RoPE's three axes
    equal), causal grouped-query attention, SwiGLU MLP; each routed token's q/k/v/o and MLP from the copies."""
    decoder = method.backbone.decoder()
    config = method.backbone.hf_model().config.text_config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    n, head_dim = embeds.shape[0], config.hidden_size // heads
    freqs = torch.outer(torch.arange(n, dtype=torch.float32), decoder.rotary_emb.inv_freq.float())
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    x = embeds
    for layer, copies in zip(decoder.layers, method.experts.layers, strict=True):
        attention = layer.self_attn

        def branch(name: str, inputs: torch.Tensor, copies=copies, attention=attention) -> torch.Tensor:
            text = inputs @ getattr(attention, name).weight.T
            generation = inputs @ copies.attention[name].weight.T
            if getattr(attention, name).bias is not None:
                text, generation = (
                    text + getattr(attention, name).bias,
                    generation + copies.attention[name].bias,
                )
            return torch.where(route[:, None], generation, text)

        def mlp(inputs: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
            gate, up = inputs @ module.gate_proj.weight.T, inputs @ module.up_proj.weight.T
            return (torch.nn.functional.silu(gate) * up) @ module.down_proj.weight.T

        h = layer.input_layernorm(x)
        q = branch("q_proj", h).view(n, heads, head_dim).transpose(0, 1)
        k = branch("k_proj", h).view(n, kv_heads, head_dim).transpose(0, 1)
        v = branch("v_proj", h).view(n, kv_heads, head_dim).transpose(0, 1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
        scores = (q @ k.transpose(1, 2) / math.sqrt(head_dim)).masked_fill(~causal, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, heads * head_dim)
        x = x + branch("o_proj", out)
        h = layer.post_attention_layernorm(x)
        x = x + torch.where(route[:, None], mlp(h, copies.mlp), mlp(h, layer.mlp))
    return decoder.norm(x)


def test_a_routed_token_goes_through_the_copies_as_a_hand_written_forward_does():
    method = tiny_latentum()
    perturb_experts(method.experts)
    backbone = method.backbone
    assert set(method.experts.layers[0].attention) == {"q_proj", "k_proj", "v_proj", "o_proj"}  # no q/k norms
    embeds = torch.randn(6, backbone.hidden_size)
    route = torch.tensor([False, False, True, True, False, True])
    with torch.no_grad():
        got = backbone.forward(
            embeds[None], torch.arange(6).expand(3, 1, 6), causal_mask(1, 6), extras={ROUTE: route[None]}
        ).last_hidden_state[0]
        expected = hand_forward(method, embeds, route)
        text_only = hand_forward(method, embeds, torch.zeros(6, dtype=torch.bool))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(
        got[:2], text_only[:2], atol=1e-5
    )  # tokens before the first routed one are untouched
    assert not torch.allclose(got[2:], text_only[2:], atol=1e-3)


class Selected(torch.nn.Module):
    """The definition of a routed part, computed naively: both branches on every row, the route picks per row."""

    def __init__(self, original: torch.nn.Module, copy: torch.nn.Module, route: torch.Tensor):
        super().__init__()
        self.original, self.copy, self.route = original, copy, route

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        route = self.route.reshape(*self.route.shape, *[1] * (hidden.ndim - 2))
        return torch.where(route, self.copy(hidden), self.original(hidden))


def routed_forward_and_grads(backbone, embeds, route, experts) -> tuple[torch.Tensor, list]:
    embeds = embeds.clone().requires_grad_(True)
    n = embeds.shape[1]
    extras = None if route is None else {ROUTE: route}
    hidden = backbone.forward(embeds, torch.arange(n).expand(3, 2, n), causal_mask(2, n), extras=extras)
    loss = (hidden.last_hidden_state * torch.linspace(-1, 1, hidden.last_hidden_state.shape[-1])).sum()
    loss.backward()
    grads = [embeds.grad, *(p.grad for p in experts.parameters())]
    experts.zero_grad(set_to_none=True)
    return hidden.last_hidden_state.detach(), grads


@pytest.mark.parametrize("kind", ["mixed", "none", "all"])
def test_the_routed_forward_equals_both_branches_on_every_row_selected_by_the_route(kind):
    """Outputs and gradients (originals frozen, copies trained) against the naive definition, and each branch
    computes its own rows only: no token goes through both."""
    torch.manual_seed(0)
    backbone = build_backbone(ModelSection(preset="tiny-qwen2.5-vl"))
    backbone.model.requires_grad_(False)
    layers = backbone.decoder().layers
    experts = GenerationExperts(layers).requires_grad_(True)  # stage vision: the copies train
    perturb_experts(experts)
    handles = attach_experts(layers, experts)
    embeds = torch.randn(2, 9, backbone.hidden_size)
    route = {
        "mixed": torch.tensor([[0, 0, 1, 1, 0, 1, 1, 1, 0], [1, 0, 0, 0, 1, 1, 0, 0, 0]], dtype=torch.bool),
        "none": torch.zeros(2, 9, dtype=torch.bool),
        "all": torch.ones(2, 9, dtype=torch.bool),
    }[kind]
    rows: dict[str, int] = {"original": 0, "copy": 0}

    def count(branch: str):
        return lambda module, args: rows.__setitem__(branch, rows[branch] + args[0].shape[:-1].numel())

    counters = [layers[0].mlp.register_forward_pre_hook(count("original"))]  # after the split: its rows only
    counters.append(experts.layers[0].mlp.register_forward_pre_hook(count("copy")))
    got, got_grads = routed_forward_and_grads(backbone, embeds, route, experts)
    routed = int(route.sum())
    # an unrouted batch never calls the copies; otherwise the original takes the unrouted rows [n_u, D] alone
    assert rows == ({"original": 18, "copy": 0} if routed == 0 else {"original": 18 - routed, "copy": routed})
    for handle in [*handles, *counters]:
        handle.remove()

    for layer, copies in zip(layers, experts.layers, strict=True):
        for name, module in copies.attention.items():
            setattr(layer.self_attn, name, Selected(getattr(layer.self_attn, name), module, route))
        layer.mlp = Selected(layer.mlp, copies.mlp, route)
    expected, expected_grads = routed_forward_and_grads(backbone, embeds, None, experts)
    torch.testing.assert_close(got, expected)
    assert len(got_grads) == len(expected_grads)
    for mine, reference in zip(got_grads, expected_grads, strict=True):
        if mine is None:  # a copy outside the graph: the definition gives it zero gradient
            assert routed == 0 and not reference.any()
        else:
            torch.testing.assert_close(mine, reference)
    if routed == 0:
        assert all(g is None for g in got_grads[1:])


def test_copy_text_weights_makes_the_branches_equal_again():
    method = tiny_latentum()
    perturb_experts(method.experts)
    method.experts.copy_text_weights(method.backbone.decoder().layers)
    layer = method.backbone.decoder().layers[1]
    copies = method.experts.layers[1]
    assert torch.equal(copies.attention["k_proj"].bias, layer.self_attn.k_proj.bias)
    assert torch.equal(copies.mlp.down_proj.weight, layer.mlp.down_proj.weight)
    assert copies.mlp.down_proj.weight.data_ptr() != layer.mlp.down_proj.weight.data_ptr()


# --- the code head ---------------------------------------------------------------------------------------------
def test_the_code_head_is_autoregressive_over_sub_codes():
    torch.manual_seed(0)
    head = CodeHead(hidden_size=8, codebooks=3, entries=5, width=16, layers=1, heads=2).eval()
    hidden = torch.randn(4, 8)
    codes = torch.randint(5, (4, 3))
    logits = head(hidden, codes)
    assert logits.shape == (4, 3, 5)
    changed = codes.clone()
    changed[:, 1] = (changed[:, 1] + 1) % 5
    other = head(hidden, changed)
    assert torch.equal(other[:, :2], logits[:, :2])  # sub-codes 0 and 1 do not see sub-code 1
    assert not torch.allclose(other[:, 2], logits[:, 2])
    torch.testing.assert_close(head.step_logits(hidden, codes[:, :2]), logits[:, 2])
    torch.testing.assert_close(head.step_logits(hidden, codes[:, :0]), logits[:, 0])


def test_guided_probabilities_by_hand():
    # scale 2: l = u + 2 (c - u) = (4, 2, 0, -2); T 0.5 doubles it: (8, 4, 0, -4); top-k 3 drops -4;
    # softmax over (8, 4, 0): e^8 / Z = 0.98169..., e^4 / Z = 0.01798..., e^0 / Z = 0.00033...
    # top-p 0.99: the mass before entry 2 is 0.99967 >= 0.99, so it goes; entries 0 and 1 renormalised.
    cond = torch.tensor([3.0, 2.0, 1.0, 0.0])
    uncond = torch.tensor([2.0, 2.0, 2.0, 2.0])
    got = guided_probabilities(cond, uncond, GuidanceParams(scale=2.0, temperature=0.5, top_k=3, top_p=0.99))
    z = math.exp(8) + math.exp(4)
    assert got.tolist() == pytest.approx([math.exp(8) / z, math.exp(4) / z, 0.0, 0.0], rel=1e-6)
    # scale 1 is the conditional distribution; no filter at top_k = N, top_p = 1
    plain = guided_probabilities(cond, uncond, GuidanceParams(scale=1.0, temperature=1.0, top_k=4, top_p=1.0))
    torch.testing.assert_close(plain, cond.softmax(-1))
    # the top entry is always kept, whatever top_p
    sharp = guided_probabilities(
        cond, uncond, GuidanceParams(scale=1.0, temperature=1.0, top_k=4, top_p=0.01)
    )
    assert sharp.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_sample_codes_draws_from_the_guided_distribution():
    torch.manual_seed(0)
    head = CodeHead(hidden_size=8, codebooks=2, entries=6, width=16, layers=1, heads=2).eval()
    hidden, uncond = torch.randn(1, 8), torch.randn(1, 8)
    greedy = GuidanceParams(scale=3.0, temperature=1.0, top_k=1, top_p=1.0)
    codes = sample_codes(head, hidden, uncond, greedy, torch.Generator().manual_seed(0))
    first = (
        head.step_logits(uncond, codes[:, :0])
        + 3 * (head.step_logits(hidden, codes[:, :0]) - head.step_logits(uncond, codes[:, :0]))
    ).argmax(-1)
    assert codes.shape == (1, 2) and int(codes[0, 0]) == int(first)
    params = GuidanceParams()
    draws = [sample_codes(head, hidden, uncond, params, torch.Generator().manual_seed(s)) for s in (1, 1)]
    assert torch.equal(draws[0], draws[1])


# --- stage language --------------------------------------------------------------------------------------------
def test_noisy_codes_replace_the_given_share_reproducibly():
    codes = torch.zeros(4000, 4, dtype=torch.long)
    noisy = noisy_codes(codes, 64, 0.15, torch.Generator().manual_seed(3))
    assert torch.equal(noisy, noisy_codes(codes, 64, 0.15, torch.Generator().manual_seed(3)))
    # replaced with probability 0.15; a replacement keeps the code by chance 1/64
    assert float((noisy != codes).float().mean()) == pytest.approx(0.15 * 63 / 64, abs=0.01)
    assert int(noisy.max()) < 64 and int(noisy.min()) >= 0
    assert torch.equal(noisy_codes(codes, 64, 0.0, torch.Generator().manual_seed(3)), codes)


# --- stage vision ----------------------------------------------------------------------------------------------
def test_vision_layout_copies_positions_and_the_mask_is_the_block_rule(maze):
    method = tiny_latentum()
    layouts = [method.layout(s, "vision") for s in maze[:2]]
    batch = collate(layouts, method.backbone.tokenizer.pad_token_id)
    vision_start = method.backbone.token_id(method.backbone.chat.vision_start)
    dropped = [False, True]
    dense = generation_mask(batch, dropped).to_dense()[:, 0]
    for row, layout in enumerate(layouts):
        targets = [slot for slot in layout.images if slot.kind == Kind.AUX_IMAGE]
        blocks = generation_blocks(layout)
        assert len(blocks) == len(targets) > 0
        g_begin = int((layout.kinds == GENERATION).nonzero()[0])
        assert g_begin == len(method.layout(maze[row], "language"))
        for block, slot in zip(blocks, targets, strict=True):
            assert int(layout.input_ids[block.start]) == vision_start
            assert block.understanding_start == slot.start - 1
            assert torch.equal(
                layout.position_ids[:, block.start : block.end],
                layout.position_ids[:, slot.start - 1 : slot.end],
            )
        # the rule from its definition, position by position
        expected = torch.zeros(len(layout), len(layout), dtype=torch.bool)
        for i in range(len(layout)):
            block_of_i = next((b for b in blocks if b.start <= i < b.end), None)
            for j in range(i + 1):
                if block_of_i is None or j >= block_of_i.start:
                    expected[i, j] = True
                elif j < g_begin:
                    expected[i, j] = not dropped[row] and j < block_of_i.understanding_start
        assert torch.equal(dense[row, : len(layout), : len(layout)], expected)
        assert not dense[row, :, len(layout) :].any()


def test_what_each_stage_trains(maze):
    method = tiny_latentum()
    backbone = method.backbone
    every = trainable_parameters(backbone, method)
    owned = {name: {id(p) for p in module.parameters()} for name, module in method.modules.items()}
    model = {id(p) for p in backbone.model.parameters()}
    expected = {
        "quantizer": owned["quantizer"],
        "language": model - {id(p) for p in backbone.module_groups()["vision"].parameters()},
        "vision": owned["experts"] | owned["code_head"],
    }
    for stage, trained in expected.items():
        freeze = ["vision", *method.stage_freeze(stage)]
        groups = freeze_and_group(backbone, method, freeze, {}, every)
        assert {id(p) for params in groups.values() for p in params} == trained, stage


def test_stage_vision_trains_the_generation_branch_only(maze):
    method = tiny_latentum()
    backbone = method.backbone
    every = trainable_parameters(backbone, method)
    freeze_and_group(backbone, method, list(method.stage_freeze("vision")), {}, every)
    quantizer_batch = collate([method.layout(s, "quantizer") for s in maze], backbone.tokenizer.pad_token_id)
    method.loss(backbone, quantizer_batch, "quantizer", StageProgress(0, 1))  # fits the codebooks (data init)
    batch = collate([method.layout(s, "vision") for s in maze], backbone.tokenizer.pad_token_id)
    out = method.loss(backbone, batch, "vision", StageProgress(0, 1))
    out.loss.backward()
    assert out.metrics["code_positions"] == sum(
        b.positions for layout in batch.layouts for b in generation_blocks(layout)
    )
    assert out.metrics["code_ce"] == pytest.approx(float(out.loss))
    assert all(p.grad is None for p in backbone.model.parameters())
    assert all(p.grad is None for p in method.quantizer.parameters())
    for module in (method.experts, method.code_head):
        assert all(p.grad is not None and p.grad.isfinite().all() for p in module.parameters())
    report = method.code_report(maze, batch_size=2)  # conditioned everywhere, in batches of 2
    assert report.positions == out.metrics["code_positions"] and report.samples == 3
    assert 0.0 <= report.accuracy <= 1.0 and math.isfinite(report.ce)


# --- errors ----------------------------------------------------------------------------------------------------
def test_stages_that_read_codes_refuse_an_untrained_quantizer(tmp_path):
    method = tiny_latentum()
    for stage in ("language", "vision"):
        with pytest.raises(ConfigError, match=f"stage {stage} .* run stage quantizer first") as caught:
            method.prepare_stage(stage, None)  # type: ignore[arg-type]
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"guidance": {"top_p": 0.0}}, "top_p"),
        ({"guidance": {"top_k": 0}}, "top_k"),
        ({"guidance": {"temperature": 0}}, "temperature"),
        ({"language": {"code_noise": 1.0}}, "code_noise"),
        ({"vision": {"condition_dropout": -0.1}}, "condition_dropout"),
        ({"code_head": {"width": 30, "heads": 4}}, "width=30 is not a multiple of heads=4"),
        ({"code_head": {"widht": 8}}, "width"),
    ],
)
def test_bad_config_values_are_one_line_errors(section, message):
    with pytest.raises(ConfigError, match=message) as caught:
        build_config(LatentumConfig, {"method": section}, "c.yaml")
    assert "\n" not in str(caught.value)


def test_a_cli_run_of_stage_vision_on_an_untrained_quantizer_exits_2(tmp_path):
    steps = ["train.stages.quantizer.steps=1", "train.stages.language.steps=1", "data.synth.n_train=4"]
    args = train_args(tmp_path, "untrained", "--method", "latentum", *steps)
    latentkit(*args, "--stage", "quantizer")
    final = tmp_path / "untrained" / "stages" / "quantizer" / "final" / "method_modules.safetensors"
    weights = load_file(str(final))
    weights["quantizer.quantizer.usage"].zero_()  # as if stage quantizer had never fitted the codebooks
    from safetensors.torch import save_file

    save_file(weights, str(final))
    result = latentkit(*args, "--stage", "language", "--resume", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "run stage quantizer first" in result.stderr and "Traceback" not in result.stderr


# --- end to end --------------------------------------------------------------------------------------------------
def test_three_stages_end_to_end_and_the_run_loads_back_bit_exact(tmp_path):
    steps = [f"train.stages.{stage}.steps=2" for stage in ("quantizer", "language", "vision")]
    steps.append("train.until=vision")  # stage pixels: tests/test_latentum_pixels.py
    latentkit(*train_args(tmp_path, "lum", "--method", "latentum", *steps, "data.synth.n_train=8"))
    run = tmp_path / "lum"
    records = [m for m in metrics(run) if "loss" in m]
    assert [(m["stage"], m["step"]) for m in records] == [
        (stage, step) for stage in ("quantizer", "language", "vision") for step in (1, 2)
    ]
    assert all(math.isfinite(m["ce"]) and m["codes_changed"] > 0 for m in records if m["stage"] == "language")
    assert all(
        math.isfinite(m["code_ce"]) and m["code_positions"] > 0 for m in records if m["stage"] == "vision"
    )
    assert json.loads((run / "final" / "latentkit_method.json").read_text()) == {
        "method": "latentum",
        "stage": "vision",
    }
    base = load_file(str(run / "final" / "model.safetensors"))
    owned = load_file(str(run / "final" / "method_modules.safetensors"))
    assert not any("experts" in key or "code_head" in key for key in base)  # the base model stays HF format
    assert {key.split(".")[0] for key in owned} == {"quantizer", "experts", "code_head", "pixel_decoder"}
    language = load_file(str(run / "stages" / "language" / "final" / "model.safetensors"))
    vision_final = load_file(str(run / "stages" / "vision" / "final" / "model.safetensors"))
    assert all(torch.equal(language[k], vision_final[k]) for k in language)  # the originals stayed frozen
    model = lk.load(run)
    loaded = model.method.modules.state_dict()
    assert loaded.keys() == owned.keys() and all(torch.equal(loaded[k], owned[k]) for k in owned)
    # the loaded generation branch is the one that trained: it differs from the text weights it started from
    layer = model.backbone.decoder().layers[0]
    assert not torch.equal(model.method.experts.layers[0].mlp.up_proj.weight, layer.mlp.up_proj.weight)

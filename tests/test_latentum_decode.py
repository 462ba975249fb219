"""LatentUM's interleaved decoding (`methods/latentum/decoding.py`): the engine's cached, batched imagination
against a naive loop of full forwards, the read-back at the image's M-RoPE grid (and its replay), reproducible
codes, a budget that ends mid-image; and generate, eval, compare and diagnose on a tiny trained run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import latentkit, train_args
from latentkit.methods.latentum import Latentum, LatentumConfig
from latentkit.methods.latentum.channel import CONDITIONS as CHANNEL_CONDITIONS
from latentkit.methods.latentum.code_head import sample_codes
from latentkit.methods.latentum.decoding import _row_seed
from latentkit.methods.latentum.mome import ROUTE
from latentkit.methods.latentum.targets import codes_to_inputs
from latentkit.methods.latentum.vision import GENERATION
from PIL import Image

import latentkit as lk
from latentkit.backbone import build_backbone
from latentkit.config import ModelSection
from latentkit.decoding import SamplingParams, decode
from latentkit.decoding.replay import decision_states, replay_forward
from latentkit.errors import ConfigError
from latentkit.latent import ContinuousPolicy, Identity, Zeros
from latentkit.layout import Kind, LayoutBuilder, collate, inputs_embeds
from latentkit.masks import causal_mask
from latentkit.records import load_split
from latentkit.synth.maze import generate_synth_maze

GRID = (1, 4, 4)  # synth-maze's boards at the tiny preset: 16 merged positions


@pytest.fixture(scope="module")
def method(tmp_path_factory):
    root = tmp_path_factory.mktemp("maze")
    generate_synth_maze(root, n_train=2, n_val=0, n_test=0)
    torch.manual_seed(0)
    latentum = Latentum(LatentumConfig())
    latentum.setup(build_backbone(ModelSection(preset="tiny-qwen2.5-vl")))
    with torch.no_grad():  # the generation branch differs from the text weights, so routing shows
        for parameter in latentum.experts.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    latentum.samples = load_split(root, "train").samples
    return latentum


def prompts(method):
    return [method.prompt(s).build(s.sample_id, s.dataset) for s in method.samples]


def imagine(method, seed=0, max_new_tokens=40, record_hidden=False):
    policy = replace(method.decoding_policy(), force=True, seed=seed)
    return decode(method.backbone, prompts(method), SamplingParams(max_new_tokens), policy, record_hidden)


@torch.no_grad()
def naive_codes(method, layout, seed):
    """The imagination by its definition, one full forward per position, no cache: the prompt, then image-start
    and the drawn positions on the generation branch; the unconditional state from the block alone."""
    backbone, guidance = method.backbone, method.decoding_policy().guidance
    generator = torch.Generator().manual_seed(_row_seed(seed, layout.key))
    prompt = collate([layout], backbone.tokenizer.pad_token_id)
    start_position = int(prompt.position_ids.max()) + 1
    pad = backbone.token_id(backbone.chat.image_pad)
    grid = backbone.position_ids(torch.full((16,), pad), [(1, 8, 8)]) + start_position + 1
    start = backbone.embed(torch.tensor([backbone.token_id(backbone.chat.vision_start)]))
    block, block_positions = [start[0]], [torch.full((3,), start_position)]
    codes = []
    for index in range(16):
        embeds = torch.cat([inputs_embeds(backbone, prompt)[0], torch.stack(block)])[None]
        positions = torch.cat([prompt.position_ids[:, 0], torch.stack(block_positions, 1)], 1)[:, None]
        route = torch.arange(embeds.shape[1])[None] >= len(layout)
        cond = backbone.forward(embeds, positions, causal_mask(1, embeds.shape[1]), extras={ROUTE: route})
        alone = torch.stack(block)[None]
        uncond = backbone.forward(
            alone,
            torch.stack(block_positions, 1)[:, None],
            causal_mask(1, len(block)),
            extras={ROUTE: torch.ones(1, len(block), dtype=torch.bool)},
        )
        drawn = sample_codes(
            method.code_head,
            cond.last_hidden_state[:, -1],
            uncond.last_hidden_state[:, -1],
            guidance,
            generator,
        )
        codes.append(drawn[0])
        block.append(codes_to_inputs(backbone, method.quantizer, drawn)[0].to(start))
        block_positions.append(grid[:, index])
    return torch.stack(codes)


def test_imagined_codes_equal_a_naive_loop_of_full_forwards(method):
    trajectories = imagine(method)
    for layout, trajectory in zip(prompts(method), trajectories):
        assert trajectory.extras["imagined_grids"] == [list(GRID)]
        assert (
            torch.tensor(trajectory.extras["imagined_codes"][0]).tolist()
            == naive_codes(method, layout, 0).tolist()
        )


def test_the_image_is_read_back_on_the_understanding_branch_at_its_grid(method):
    backbone = method.backbone
    trajectory = imagine(method, max_new_tokens=19)[
        0
    ]  # image-start, 15 positions, rewind, read-back, image-end
    codes = torch.tensor(trajectory.extras["imagined_codes"][0])
    start = backbone.token_id(backbone.chat.vision_start)
    # the generation block is gone: the row holds image-start, the 16 decoded positions, image-end
    assert GENERATION not in trajectory.kinds and not any(trajectory.inputs_extras.get(ROUTE, {}).values())
    assert trajectory.input_ids[0] == start and trajectory.kinds[:18] == [int(Kind.AUX_IMAGE)] * 18
    assert trajectory.input_ids[17] == backbone.token_id(backbone.chat.vision_end)
    read = torch.stack([trajectory.vectors[i] for i in range(1, 17)])
    with torch.no_grad():  # one position at a time there, all 16 at once here
        assert torch.allclose(read, codes_to_inputs(backbone, method.quantizer, codes).to(read), atol=1e-6)
    p = trajectory.positions[0] + 1
    grid = [(p, p + i, p + j) for i in range(4) for j in range(4)]
    assert [trajectory.mrope_positions.get(i, (trajectory.positions[i],) * 3) for i in range(1, 17)] == grid
    assert trajectory.positions[17] == p + 4  # the text goes on one past the grid's largest position
    assert trajectory.captions[1].splitlines()[0] == "imagined image 1: 16 positions x 4 codes"


def test_a_replay_of_the_interleaved_trajectory_gives_the_states_it_was_decoded_from(method):
    trajectories = imagine(method, max_new_tokens=24, record_hidden=True)
    with torch.no_grad():
        out, batch = replay_forward(method.backbone, trajectories)
    for trajectory, states in zip(trajectories, decision_states(out, batch, trajectories)):
        # from the read-back's first position on (before it, the rewound generation block decided)
        decided = torch.stack(trajectory.decision_hidden[18:])
        assert torch.allclose(states[18:].float(), decided.float(), atol=1e-4)


def test_same_seed_same_codes_and_text_another_seed_other_codes(method):
    first, again, other = imagine(method, seed=3), imagine(method, seed=3), imagine(method, seed=4)
    assert [t.extras["imagined_codes"] for t in first] == [t.extras["imagined_codes"] for t in again]
    assert [t.text for t in first] == [t.text for t in again]
    assert [t.extras["imagined_codes"] for t in first] != [t.extras["imagined_codes"] for t in other]


def test_a_budget_that_ends_mid_image_records_no_codes(method):
    trajectory = imagine(method, max_new_tokens=8)[0]
    assert trajectory.extras["imagined_images"] == 0 and trajectory.extras["imagined_codes"] == []
    assert trajectory.finish_reason == "length"


def test_k_limits_the_positions_drawn_and_read_back_and_k_0_imagines_nothing(method):
    whole = imagine(method, max_new_tokens=24)
    backbone, start = method.backbone, method.backbone.token_id(method.backbone.chat.vision_start)
    end = backbone.token_id(backbone.chat.vision_end)
    for k in (4, 0):
        policy = method.decoding_policy().varied(k=k, force=True)
        assert isinstance(policy, ContinuousPolicy) and policy.intervention is None
        trajectories = decode(backbone, prompts(method), SamplingParams(24), policy)
        for full, part in zip(whole, trajectories):
            blocks = part.blocks(int(Kind.AUX_IMAGE))
            assert part.input_ids[0] == start and part.input_ids[k + 1] == end
            if k == 0:
                assert blocks == [] and part.extras["imagined_codes"][0] == []
                continue
            # the same generator draws the same first k positions as the whole image's
            assert part.extras["imagined_codes"][0] == full.extras["imagined_codes"][0][:k]
            assert [b.shape[0] for b in blocks][:1] == [k]
            p = part.positions[0] + 1
            read = [part.mrope_positions.get(i, (part.positions[i],) * 3) for i in range(1, k + 1)]
            assert read == [(p, p, p + j) for j in range(k)]  # the grid's first row, in raster order


def test_an_intervention_replaces_what_the_understanding_branch_reads_not_what_is_drawn(method):
    baseline = imagine(method, max_new_tokens=24)
    identity = decode(
        method.backbone,
        prompts(method),
        SamplingParams(24),
        method.decoding_policy().varied(force=True, intervention=Identity()),
    )
    assert [t.input_ids for t in identity] == [t.input_ids for t in baseline]
    assert all(torch.equal(a.vectors[i], b.vectors[i]) for a, b in zip(identity, baseline) for i in a.vectors)
    zeros = method.decoding_policy().varied(force=True, intervention=Zeros())
    for zeroed, base in zip(decode(method.backbone, prompts(method), SamplingParams(24), zeros), baseline):
        assert zeroed.extras["imagined_codes"][0] == base.extras["imagined_codes"][0]
        (block, *_) = zeroed.blocks(int(Kind.AUX_IMAGE))
        assert block.shape[0] == 16 and not block.any()


def test_a_prompt_without_an_image_needs_a_grid(method):
    builder = LayoutBuilder(method.backbone)
    builder.add_text("hello", int(Kind.TEXT), 0)
    layout = builder.build("x", "toy")
    with pytest.raises(ConfigError, match="method.imagine.grid"):
        decode(method.backbone, [layout], SamplingParams(4), method.decoding_policy())
    policy = replace(method.decoding_policy(), grid=(1, 2, 2), force=True)
    trajectory = decode(method.backbone, [layout], SamplingParams(12), policy)[0]
    assert len(trajectory.extras["imagined_codes"][0]) == 4


# --- the CLI on a tiny trained run -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    steps = [f"train.stages.{stage}.steps=2" for stage in ("quantizer", "language", "vision", "pixels")]
    latentkit(
        *train_args(
            out, "lum", "--method", "latentum", *steps, "data.synth.n_train=8", "data.synth.n_test=2"
        ),
        "method.guidance.scale=1.0",  # no unconditional pass: the CLI tests decode at half the cost
    )
    return out / "lum"


def test_generate_shows_the_imagined_images_codes(run):
    args = ["generate", "--run", str(run), "-b", "synth-maze", "--max-new-tokens", "24"]
    shown = latentkit(*args, "method.imagine.force=true").stdout
    assert "⟦imagined image 1: 16 positions x 4 codes⟧" in shown
    answer = json.loads(latentkit(*args, "method.imagine.force=true", "--json").stdout)
    codes = answer["trajectories"][0]["extras"]["imagined_codes"]
    assert len(codes) == 1 and len(codes[0]) == 16 and all(len(position) == 4 for position in codes[0])


def test_generate_saves_the_imagined_boards_as_the_pixel_decoder_draws_them(run, tmp_path):
    out = tmp_path / "boards"
    args = ["generate", "--run", str(run), "-b", "synth-maze", "--max-new-tokens", "24"]
    args += ["--save-images", str(out), "method.imagine.force=true"]
    answer = json.loads(latentkit(*args, "--json").stdout)
    (codes,) = answer["trajectories"][0]["extras"]["imagined_codes"]
    (saved,) = [Path(path) for path in answer["saved_images"]]
    assert saved == out / "image-001.png"
    (expected,) = lk.load(run).method.board_images([torch.tensor(codes)], GRID[1:])
    question_board = Image.open(load_split(run / "data" / "synth-maze", "test").samples[0].images[0])
    assert Image.open(saved).size == expected.size == question_board.size
    assert np.array_equal(np.array(Image.open(saved)), np.array(expected))
    before = saved.read_bytes()
    again = latentkit(*args, check=False)  # the same directory again: refused, the first PNG kept
    assert again.returncode == 2 and "already holds images" in again.stderr
    assert "\n" not in again.stderr.strip() and saved.read_bytes() == before


def test_eval_decodes_with_imagined_images_and_compare_reads_its_summary(run, tmp_path):
    out = tmp_path / "maze.jsonl"
    common = ["--benchmark", "synth-maze", "--limit", "2", "--max-new-tokens", "24", "--no-progress"]
    latentkit("eval", "--run", str(run), *common, "--out", str(out), "method.imagine.force=true")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["imagined_images"] for r in records] == [1, 1]
    assert all(len(r["imagined_codes"][0]) == 16 for r in records)
    summary = out.with_name("maze.summary.json")
    latentkit("compare", str(summary), "--out", str(tmp_path / "cmp"))
    assert "latentum" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_diagnose_varies_the_imagined_boards_and_checks_the_channel(run, tmp_path):
    common = ["--benchmark", "synth-maze", "--limit", "2", "--max-new-tokens", "20", "--k-sweep", "4"]
    latentkit("diagnose", "--run", str(run), *common, "--out", str(tmp_path))
    report = json.loads((tmp_path / "synth-maze-test-limit2-max20-k4.json").read_text())
    assert report["decoding"]["k"] is None and report["decoding"]["policy"] == "ImaginePolicy"
    assert report["forced"]["trigger_rate"] == 1.0 and report["forced"]["mean_latent_steps"] >= 16
    conditions = report["interventions"]["conditions"]
    assert {"identity", "zeros", "noise", "dataset_mean", "k=0"} <= set(conditions)
    assert conditions["k=0"]["mean_latent_steps"] == 0
    assert [p["k"] for p in report["k_sweep"]] == [4]
    channel = report["channel"]["conditions"]
    assert list(channel) == list(CHANNEL_CONDITIONS) and all(c["samples"] == 2 for c in channel.values())
    assert "K=own" in (tmp_path / "synth-maze-test-limit2-max20-k4.md").read_text()

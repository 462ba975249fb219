"""`latentkit diagnose` on a briefly trained tiny Monet run, its refusals, and the collapse score by hand."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import latentkit, train_args
from latentkit.cli.app import main
from latentkit.kernels.dispatch import attend, prepare_mask
from latentkit.methods.monet.channel import CONDITIONS as CHANNEL_CONDITIONS
from latentkit.methods.monet.layout import teacher_layout
from latentkit.methods.monet.method import TARGETS, swapped_weights
from PIL import Image

from latentkit.decoding import DecodingPolicy, Embeddings, SamplingParams, Step, Token
from latentkit.eval.answer import answer_samples
from latentkit.eval.benchmarks import get_benchmark
from latentkit.eval.diagnose import DiagnoseOptions, cross_input_cosine, diagnose
from latentkit.eval.diagnose.forced import answer_span
from latentkit.eval.diagnose.hidden import attention_probabilities
from latentkit.eval.model import load_eval_model
from latentkit.eval.runner import load_eval_set
from latentkit.latent import ContinuousPolicy, Transplant
from latentkit.layout import Kind, collate, inputs_embeds
from latentkit.masks import causal_mask, with_padding
from latentkit.representation_cache import RepresentationCache

COMMON = ["--benchmark", "synth-zoom", "--limit", "4", "--max-new-tokens", "6", "--batch-size", "3"]
DIAGNOSE = [*COMMON, "--k-sweep", "1,2"]
STEM = "synth-zoom-test-limit4-max6-k1_2"  # the default output is named by the settings above
REPLACEMENTS = (
    "identity",
    "zeros",
    "constant",
    "noise",
    "norm_matched_noise",
    "moment_matched_noise",
    "dataset_mean",
    "repeat_first",
    "swap",
    "k=0",
)
INPUTS = ("image_swap", "image_blank")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    # Test-time K=2 keeps decoding short; K=2 in the sweep then reuses the forced run.
    monet = (
        "--method",
        "monet",
        "train.steps=2",
        "data.synth.n_test=8",
        "method.decode_latents=2",
        "train.until=latent",
    )
    latentkit(*train_args(out, "m", *monet))
    latentkit(*train_args(out, "s", "train.steps=1"))
    return out


@pytest.fixture(scope="module")
def diagnosed(runs):
    """Default output folder; batches of 3 over 4 samples, so answers span two batches."""
    result = latentkit("diagnose", "--run", str(runs / "m"), *DIAGNOSE)
    report = json.loads((runs / "m" / "diagnose" / f"{STEM}.json").read_text())
    return result, report


def test_reports_are_written(runs, diagnosed):
    result, report = diagnosed
    folder = runs / "m" / "diagnose"
    assert all((folder / f"{STEM}.{suffix}").is_file() for suffix in ("json", "md", "png"))
    assert "| condition | accuracy |" in result.stdout and "## Test-time K" in result.stdout
    assert str(folder / f"{STEM}.png") in result.stdout
    # one line per condition: generated, forced, the replacements, the oracle, the inputs, the K sweep
    assert (
        len([line for line in result.stderr.splitlines() if " K=" in line])
        == 2 + len(REPLACEMENTS) + 1 + 2 + 2
    )
    with Image.open(folder / f"{STEM}.png") as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 600
    assert report["model"]["method"] == "monet" and report["model"]["run"] == str(runs / "m")
    assert (report["benchmark"], report["split"], report["scorer"], report["num_samples"]) == (
        "synth-zoom",
        "test",
        "boxed_exact",
        4,
    )
    info = json.loads((runs / "m" / "data/synth-zoom/synth_info.json").read_text())
    assert report["chance_level"] == info["chance_level"]
    assert report["decoding"]["k"] == 2 and report["decoding"]["max_new_tokens"] == 6
    assert [point["k"] for point in report["k_sweep"]] == [1, 2]
    channel = report["channel"]
    assert list(channel["conditions"]) == list(CHANNEL_CONDITIONS)
    assert all(c["samples"] == 4 for c in channel["conditions"].values())
    assert channel["valid"] == (channel["carries"] and channel["needed"])
    assert "## Latent channel" in result.stdout


def test_values_are_consistent_with_the_per_sample_answers(diagnosed):
    _, report = diagnosed
    answers = [sample["answers"] for sample in report["per_sample"]]
    assert len(answers) == 4

    def column(name: str, key: str) -> list:
        return [a[name][key] for a in answers]

    generated = report["generated"]
    triggered = [blocks > 0 for blocks in column("generated", "latent_blocks")]
    assert generated["trigger_rate"] == pytest.approx(sum(triggered) / 4)
    assert generated["accuracy"] == pytest.approx(sum(column("generated", "correct")) / 4)
    assert generated["mean_blocks"] == pytest.approx(sum(column("generated", "latent_blocks")) / 4)
    # The model is barely trained: it never opens a block itself, so later conditions force the blocks.
    assert report["latents_forced"] == (not any(triggered))
    assert report["forced"]["trigger_rate"] == 1.0  # a start token and at least one latent fit in 6 tokens
    baseline = report["interventions"]["baseline"]
    assert baseline == ("forced" if report["latents_forced"] else "generated")
    conditions = {**report["interventions"]["conditions"], **report["inputs"]}
    assert list(conditions) == [*REPLACEMENTS, "oracle", *INPUTS]
    for name in [*REPLACEMENTS, "oracle", *INPUTS]:
        result = conditions[name]
        assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["changed"] <= 1.0
        assert result["delta"] == pytest.approx(
            result["accuracy"] - report["interventions"]["baseline_accuracy"]
        )
        changed = [a != b for a, b in zip(column(name, "extracted"), column(baseline, "extracted"))]
        assert result["changed"] == pytest.approx(sum(changed) / 4)
        right = column(name, "correct")
        assert result["accuracy"] == pytest.approx(sum(right) / 4)
        assert result["interval"]["low"] <= result["accuracy"] <= result["interval"]["high"]
        assert result["baseline_only_correct"] == sum(
            b and not c for b, c in zip(column(baseline, "correct"), right)
        )
        assert result["condition_only_correct"] == sum(
            c and not b for b, c in zip(column(baseline, "correct"), right)
        )
        assert 0.0 < result["p_value"] <= 1.0
    assert column("identity", "extracted") == column(baseline, "extracted")
    assert report["interventions"]["identity_reproduces_baseline"]
    assert all(steps == 0 for steps in column("k=0", "latent_steps"))
    assert not any(note.startswith("oracle: skipped") for note in report["notes"])
    for point in report["k_sweep"]:
        steps = column(f"k={point['k']}", "latent_steps")
        blocks = column(f"k={point['k']}", "latent_blocks")
        assert all(s <= point["k"] * b for s, b in zip(steps, blocks))  # no block longer than its K
    collapse = report["collapse"]
    assert -1.0 <= collapse["cross_input_cosine"] <= 1.0 and collapse["mean_norm"] > 0
    assert 0.0 <= collapse["between_input_fraction"] <= 1.0 and -1.0 <= collapse["centred_cosine"] <= 1.0
    assert len(collapse["between_input_fraction_per_step"]) == 2
    assert collapse["latents"] == sum(column(baseline, "latent_steps"))


def test_generated_condition_is_what_eval_answers(runs, diagnosed, tmp_path):
    _, report = diagnosed
    out = tmp_path / "eval.jsonl"
    latentkit("eval", "--run", str(runs / "m"), *COMMON, "--out", str(out), "--no-progress")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    generated = [sample["answers"]["generated"] for sample in report["per_sample"]]
    assert [r["sample_id"] for r in records] == [s["sample_id"] for s in report["per_sample"]]
    assert [r["extracted"] for r in records] == [g["extracted"] for g in generated]
    assert [r["correct"] for r in records] == [g["correct"] for g in generated]
    # eval reports the latent blocks of an answer's last generate round; diagnose counts every round
    assert all(g["latent_blocks"] >= r["latent_blocks"] for r, g in zip(records, generated))


def test_latents_that_trigger_are_diagnosed_without_forcing(runs, tmp_path, monkeypatch):
    model = load_eval_model(run=runs / "m")
    backbone = model.backbone
    start = backbone.token_id(model.method.config.latent_tokens[0])
    original = backbone.logits

    def prefers_start(
        hidden: torch.Tensor,
    ) -> torch.Tensor:  # a model that opens a latent block whenever it can
        logits = original(hidden)
        return logits.index_add(-1, torch.tensor([start]), torch.full((*logits.shape[:-1], 1), 1e4))

    monkeypatch.setattr(backbone, "logits", prefers_start)
    options = DiagnoseOptions("synth-zoom", limit=3, batch_size=2, max_new_tokens=4, k_sweep=(1,))
    report, paths = diagnose(model, options, tmp_path, log=lambda line: None)
    assert report["generated"]["trigger_rate"] == 1.0 and report["generated"]["accuracy_untriggered"] is None
    assert not report["latents_forced"]
    assert report["interventions"]["baseline"] == "generated"
    assert report["collapse"]["latents_from"] == "generated" and report["collapse"]["pairs"] > 0
    assert "force one" not in paths["md"].read_text()


def run_cli(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_refusals_exit_2_with_one_line(runs, capsys, tmp_path):
    code, err = run_cli(capsys, "diagnose", "--run", str(runs / "s"), *DIAGNOSE)
    error = one_line_error(err)
    assert code == 2 and "'sft'" in error and "does not decode with continuous steps" in error
    cases = {
        ("--run", str(tmp_path / "missing")): "not a training run",
        ("--run", str(runs / "m"), "--k-sweep", "1,x"): "--k-sweep",
        ("--run", str(runs / "m"), "--k-sweep", "0,2"): "--k-sweep",
        ("--run", str(runs / "m"), "--max-new-tokens", "1"): "--max-new-tokens",
    }
    for args, message in cases.items():
        code, err = run_cli(capsys, "diagnose", *DIAGNOSE, *args)
        assert code == 2 and message in one_line_error(err), (args, err)


def brute_force_cosine(latents: list[list[torch.Tensor]]) -> tuple[float, int]:
    """Every pair of latents at the same step index whose owners differ, one by one."""
    by_step: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for owner, blocks in enumerate(latents):
        for block in blocks:
            for j, vector in enumerate(block):
                by_step.setdefault(j, []).append((owner, vector.double()))
    values = [
        float(torch.dot(a, b) / (a.norm() * b.norm()))
        for pairs in by_step.values()
        for (oa, a), (ob, b) in itertools.combinations(pairs, 2)
        if oa != ob
    ]
    return sum(values) / len(values), len(values)


def test_cross_input_cosine_by_hand():
    t = torch.tensor
    latents = [
        [t([[1.0, 0.0], [0.0, 1.0]])],  # sample A: one block of two latents
        [t([[3.0, 0.0], [1.0, 1.0]])],  # sample B
        [t([[0.0, 2.0]]), t([[-1.0, 0.0], [2.0, 0.0]])],  # sample C: two blocks; its own pairs never count
    ]
    # step 0: A.B = 1, A.C = 0 and -1, B.C = 0 and -1 (C.C skipped); step 1: A.B = 1/√2, A.C = 0, B.C = 1/√2
    cosine, pairs = cross_input_cosine(latents)
    assert pairs == 8
    assert cosine == pytest.approx((math.sqrt(2) - 1) / 8)
    assert cross_input_cosine([[t([[1.0, 2.0]])], [t([[2.0, 4.0]])]]) == (pytest.approx(1.0), 1)
    assert cross_input_cosine([[t([[1.0, 0.0]]), t([[1.0, 0.0]])]]) == (None, 0)  # one input: no pairs
    generator = torch.Generator().manual_seed(0)
    lengths = [[3, 1], [2], [3, 3, 2], [1]]
    random = [[torch.randn(k, 5, generator=generator) for k in blocks] for blocks in lengths]
    expected, count = brute_force_cosine(random)
    cosine, pairs = cross_input_cosine(random)
    assert pairs == count and cosine == pytest.approx(expected)


class PrefixThoughts(DecodingPolicy):
    """Not Monet's policy: at the first step it feeds `k` copies of the hidden state as one continuous block
    (no start or end token), then plain text. It implements `ContinuousPolicy`, so diagnose can vary it."""

    def __init__(self, k: int = 2, force: bool = True, intervention=None, placeholder: int = 0):
        self.k, self.force, self.intervention, self.placeholder = k, force, intervention, placeholder
        self.kind = int(Kind.LATENT)
        self.keys = []

    def varied(self, k=None, force=None, intervention=None):
        return PrefixThoughts(
            self.k if k is None else k, self.force if force is None else force, intervention, self.placeholder
        )

    def begin(self, backbone, prompts):
        self.keys = [prompt.key for prompt in prompts]

    def decide(self, proposal, view):
        if view.step > 0 or not self.force or self.k == 0:
            return Step(Token(proposal.token))
        vectors = proposal.hidden[None].expand(self.k, -1)
        if self.intervention is not None:
            key = self.keys[view.row]
            vectors = torch.stack([self.intervention(v, j, key) for j, v in enumerate(vectors)])
        return Step(Embeddings(vectors, self.kind, self.placeholder))


def test_diagnose_runs_on_any_continuous_policy(runs, tmp_path, monkeypatch):
    model = load_eval_model(run=runs / "m")
    policy = PrefixThoughts(placeholder=model.backbone.token_id(model.backbone.chat.pad))
    assert isinstance(policy, ContinuousPolicy)
    monkeypatch.setattr(model.method, "decoding_policy", lambda: policy)
    options = DiagnoseOptions("synth-zoom", limit=3, batch_size=2, max_new_tokens=4, k_sweep=(1, 3))
    report, _ = diagnose(model, options, tmp_path, log=lambda line: None)
    assert report["decoding"]["policy"] == "PrefixThoughts"
    assert report["generated"]["trigger_rate"] == 1.0
    assert report["collapse"]["latents"] == 3 * 2
    assert [point["mean_latent_steps"] for point in report["k_sweep"]] == [1.0, 3.0]
    assert set(report["interventions"]["conditions"]) == {*REPLACEMENTS, "oracle"}
    assert set(report["inputs"]) == set(INPUTS)


def test_the_whole_battery_on_training_samples_with_oracles(runs, tmp_path):
    """On the train split the run's stage-2 target cache holds every sample: the oracle and retrieval run."""
    model = load_eval_model(run=runs / "m")
    options = DiagnoseOptions(
        "synth-zoom", split="train", limit=6, batch_size=4, max_new_tokens=6, k_sweep=(1,)
    )
    report, paths = diagnose(model, options, tmp_path, log=lambda line: None)
    assert all(path.is_file() for path in paths.values())
    conditions = report["interventions"]["conditions"]
    assert list(conditions) == [*REPLACEMENTS, "oracle"] and set(report["inputs"]) == set(INPUTS)
    baseline = report["interventions"]["baseline"]
    for sample in report["per_sample"]:
        assert sample["answers"]["identity"] == sample["answers"][baseline]
        assert sample["answers"]["oracle"]["latent_steps"] == 2
    retrieval = report["retrieval"]
    assert (
        retrieval["samples"] == 6 and retrieval["chance"] == pytest.approx(1 / 6) and retrieval["steps"] == 1
    )
    assert 0.0 <= retrieval["top1"] <= 1.0 and 0.0 <= retrieval["top1_centred"] <= 1.0
    probes = report["probes"]["attributes"]
    assert {"question_type", "target_shape"} <= set(probes)
    for probe in probes.values():
        assert probe["samples"] == 6 and probe["classes"] >= 2 and 0.0 <= probe["accuracy"] <= 1.0
    prism = report["prism"]
    assert prism["samples"] == 6
    for part in (prism["at_latents"], prism["after_block"]):
        assert 0.0 <= part["logit_lens"] <= 1.0
    attention = report["attention"]
    assert attention["samples"] == 6 and attention["answer_positions"] >= 6
    assert attention["latent"] + attention["image"] + attention["other"] == pytest.approx(1.0)
    assert 0.0 < attention["latent"] < 1.0 and 0.0 < attention["image"] < 1.0
    assert attention["latent_per_token"] == pytest.approx(attention["latent"] / 2, rel=1e-5)  # K=2 latents
    for result in report["inputs"].values():
        assert result["relative_change"] is not None and result["relative_change"] >= 0.0
    assert report["inputs"]["image_swap"]["toward_donor"] >= 0.0
    text = paths["md"].read_text()
    assert "## Retrieval against the oracle" in text and "How to read this" in text
    assert json.loads(paths["json"].read_text())["retrieval"] == retrieval


def test_monet_oracle_is_the_cached_stage2_targets_fed_one_slot_later(runs):
    model = load_eval_model(run=runs / "m")
    samples = load_eval_set(
        get_benchmark("synth-zoom"), model.config, model.run_dir, None, "train", 3, runs / "m" / "diagnose"
    ).samples
    oracles = model.method.oracle_latents(samples, model.run_dir)
    cache = RepresentationCache(runs / "m" / "stages" / "distill" / TARGETS)
    for oracle, targets in zip(oracles, cache.get([s.key for s in samples])):
        assert oracle.shape == (1, 8, model.backbone.hidden_size)  # one auxiliary image, num_latents 8
        assert torch.equal(oracle.flatten(0, 1), targets[-1])
    assert model.method.oracle_latents(samples, None) is None
    no_aux = replace(samples[0], segments=tuple(s for s in samples[0].segments if s.kind != "aux_image"))
    assert model.method.oracle_latents([no_aux], model.run_dir) is None
    policy = model.method.decoding_policy()
    oracle = Transplant({s.key: list(o) for s, o in zip(samples, oracles)}, 1, "oracle")
    params = SamplingParams(max_new_tokens=5)
    plain = answer_samples(model.method, samples, params, 3, policy=policy.varied(force=True))
    fed = answer_samples(
        model.method, samples, params, 3, policy=policy.varied(force=True, intervention=oracle)
    )
    for a, b, o in zip(plain, fed, oracles):
        block_a, block_b = a.trajectories[0].blocks(policy.kind)[0], b.trajectories[0].blocks(policy.kind)[0]
        assert torch.equal(block_b[0], block_a[0])  # h(start), the model's own
        assert torch.equal(block_b[1], o[0, 0])  # then the target at slot 1


def test_monet_oracle_outside_the_cache_is_computed_by_the_stage2_model(runs):
    """Test samples are not in the target cache: the stage-2 model computes them, as it computed the cache
    (recomputing training samples the same way gives the cached targets), and the model's own weights return."""
    model = load_eval_model(run=runs / "m")
    train, test = (
        load_eval_set(
            get_benchmark("synth-zoom"), model.config, model.run_dir, None, split, 2, runs / "m" / "diagnose"
        ).samples
        for split in ("train", "test")
    )
    before = {name: value.clone() for name, value in model.backbone.model.state_dict().items()}
    oracles = model.method.oracle_latents([*train, *test], model.run_dir)
    after = model.backbone.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    distill = runs / "m" / "stages" / "distill" / "final"
    with swapped_weights(model.backbone, distill):
        recomputed = model.method.target_latents([*train, *test])
    cached = RepresentationCache(runs / "m" / "stages" / "distill" / TARGETS).get([s.key for s in train])
    for mine, theirs in zip(recomputed[:2], cached):
        assert torch.allclose(mine, theirs, atol=1e-5)
    for oracle, targets in zip(oracles[2:], recomputed[2:]):
        assert oracle.shape == (1, 8, model.backbone.hidden_size)
        assert torch.allclose(oracle.flatten(0, 1), targets[-1], atol=1e-5)  # other batch, other padding
    final = model.method.target_latents(test)  # the final model's own pass differs: it is not stage 2's
    assert not torch.allclose(final[0], recomputed[2])


def test_monet_channel_with_aux_is_the_warmup_model_teacher_forced(runs):
    """The channel check's with_aux condition, recomputed from the warm-up model loaded on its own; every
    condition scores every sample, and the final model's weights are back afterwards."""
    model = load_eval_model(run=runs / "m")
    samples = load_eval_set(
        get_benchmark("synth-zoom"), model.config, model.run_dir, None, "test", 3, runs / "m" / "diagnose"
    ).samples
    before = {name: value.clone() for name, value in model.backbone.model.state_dict().items()}
    results = model.method.latent_channel(samples, model.run_dir)
    assert all(torch.equal(before[n], v) for n, v in model.backbone.model.state_dict().items())
    assert list(results) == list(CHANNEL_CONDITIONS) and all(len(v) == 3 for v in results.values())
    assert all(isinstance(c, bool) for v in results.values() for c in v)
    warm = load_eval_model(checkpoint=runs / "m" / "stages" / "warmup" / "final")
    backbone = warm.backbone
    for sample, got in zip(samples, results["with_aux"]):
        layout = teacher_layout(backbone, sample, warm.method.config)
        batch = collate([layout], backbone.tokenizer.pad_token_id)
        with torch.no_grad():
            out = backbone.forward(
                inputs_embeds(backbone, batch), batch.position_ids, warm.method.mask(batch, "warmup")
            )
        logits = backbone.logits(out.last_hidden_state)[0]
        answer = [backbone.tokenizer.encode(f" {sample.answer}", add_special_tokens=False)]
        aux_end = next(image.end for image in layout.images if image.kind == Kind.AUX_IMAGE)
        start, end = answer_span(layout, answer, aux_end + 1)
        assert got == all(int(logits[t - 1].argmax()) == int(layout.input_ids[t]) for t in range(start, end))
    assert model.method.latent_channel(samples, None) is None


def test_answer_span_is_the_first_mention_after_a_position():
    layout = SimpleNamespace(input_ids=torch.tensor([5, 7, 8, 1, 7, 8, 7]))
    assert answer_span(layout, [[7, 8]], 0) == (1, 3)
    assert answer_span(layout, [[7, 8]], 2) == (4, 6)
    assert answer_span(layout, [[9], [7]], 5) == (6, 7)  # the second tokenisation
    assert answer_span(layout, [[7, 8]], 5) is None


def test_recomputed_attention_probabilities_reproduce_the_kernel_output():
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, heads, 5, 8, generator=generator) for heads in (4, 2, 2))
    spec = with_padding(causal_mask(2, 5), torch.tensor([[True] * 5, [False, True, True, True, True]]))
    mask = prepare_mask(spec, 5, "sdpa", torch.device("cpu"))
    probabilities = attention_probabilities(query, key, mask, 0.3)
    expected = attend(query, key, value, mask, 0.3)
    assert torch.allclose(probabilities @ value.repeat_interleave(2, dim=1), expected, atol=1e-5)
    assert torch.allclose(probabilities.sum(-1)[1, :, 1:], torch.ones(4, 4))
    assert float(probabilities[1, :, :, 0].abs().sum()) == 0.0  # the padded column gets nothing

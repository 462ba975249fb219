"""The diagnose report as Markdown (with its reading guide) and as a PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentkit.eval.diagnose.conditions import k_text

READING_GUIDE = """\
### How to read this

- **Trigger rate**: the fraction of answers that opened at least one latent block.
- **Raw cross-input cosine**: the mean cosine similarity between latents (same step index) of different
  questions. It is uncentred, so a large shared mean drives it to 1 even when the latents still differ by
  input: a high raw cosine alone is *not* collapse.
- **Between-input fraction**: with mu_j the mean latent at step j over all answers,
  sum ||x - mu_j||^2 / sum ||x||^2 over every latent x. It is the share of the latents' second moment that
  varies between inputs (with one block per answer; with several, between blocks too). 0 = every input gets
  the same latent (true collapse). A raw cosine of 0.98 leaves about 2%, which can still carry the input
  perfectly: read it with the probes. **Centred cosine**: the same cosine after subtracting mu_j; near 0 (its
  floor is about -1/(n-1)) means the input-dependent parts point in unrelated directions, near 1 that they
  vary along one direction.
- **Probes**: a ridge probe per categorical attribute in the sample metadata, from each sample's first
  latent block (flattened), 5-fold cross-validated; *majority* predicts each training fold's most common
  class. Accuracy well above majority = the latents encode that attribute. *Variance explained*: the share
  of the latents' centred variance between the attribute's class means.
- **Replacements** decode as the baseline but replace every latent before the model reads it. *identity*
  returns it unchanged and must equal the baseline exactly (checked). *zeros*, *constant* (the latents'
  mean RMS), *noise* (Gaussian at the latent's RMS), *norm_matched_noise* (random direction, the latent's
  norm), *moment_matched_noise* (the latent's own mean and std over the hidden dimension), *dataset_mean*
  (the mean latent per step), *repeat_first* (the block's first latent at every step), *swap* (another
  sample's baseline latents, a fixed derangement), *oracle* (the method's oracle latents, e.g. Monet's
  stage-2 targets made with the auxiliary image visible; the first step keeps h(start)), *k=0* (the start
  and end markers with no latent between: TRT's boundary-markers-only; the text-only answer without markers
  is the generated condition on untriggered answers). Each reports accuracy with a 95% Wilson interval, the
  difference to the baseline with an exact McNemar p-value on the same samples, and the fraction of
  answers changed. A valid channel: oracle near the with-auxiliary-image accuracy, dummies (zeros, noise,
  swap) clearly below the baseline and near chance. Dummies equal to the baseline with few changed answers
  = the answer does not use what the latents carry (causally weak), whatever the probes find.
- **Inputs**: the question image swapped with another sample's, or blanked (uniform grey). *Relative
  change*: mean ||x' - x||^2 / mean over pairs of different inputs ||x_s - x_t||^2 on the first block: 0 =
  the latents ignore the image; about 1 = they change as much as between two questions. *Toward donor*: the
  same measure against the image donor's own latents (0 = the latents follow the image).
- **PRISM's gap**: the gold answer from the last-layer hidden states at the latent positions versus at the
  first position after the block (a probe; and the logit lens: how often the LM head's top-1 token there is
  the answer's first token). Decodable only after the block = the block is read later, not where computed.
- **Attention**: last layer, at every generated position after the first block, mean over heads and
  positions: the attention mass on the latent positions and on the question image's positions (in total
  and per token), recomputed from the layer's own rotated queries and keys under its mask.
- **Retrieval**: how often a sample's latents are closest (cosine) to its own oracle among all samples'
  oracles; chance is 1/n; centred: both sets minus their own mean.
- **Latent channel** (teacher-forced, so it needs no generation): on each gold response, whether every token
  of the answer's first mention after the auxiliary image is the model's top-1. *with_aux*: the auxiliary
  images given (Monet: the warm-up model, images inline). *oracle*: latents that hold them (Monet: the distill
  model in its own layout, where only the latents see each auxiliary image). *Dummies*: the same latents
  replaced (zeros, their mean, another sample's, norm-matched noise). The channel *carries* the answer when
  the oracle is within 0.10 of with_aux, and is *needed* when every dummy stays at or below the midpoint
  between chance and the oracle; a valid setting has both, and a method's own latents are read against the
  range from the dummies to the oracle.
- **Test-time K**: the number of latent steps per block changed at test time.
"""


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _interval(result: dict[str, Any]) -> str:
    interval = result["interval"]
    return f"[{interval['low']:.2f}, {interval['high']:.2f}]"


def _p(value: float) -> str:
    return f"{value:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _condition_rows(conditions: dict[str, dict[str, Any]]) -> list[list[str]]:
    return [
        [
            name,
            _number(result["accuracy"]),
            _interval(result),
            f"{result['delta']:+.3f}",
            _p(result["p_value"]),
            _number(result["changed"], 2),
            _number(result["trigger_rate"], 2),
        ]
        for name, result in conditions.items()
    ]


CONDITION_HEADER = [
    "condition",
    "accuracy",
    "95% CI",
    "Δ vs baseline",
    "McNemar p",
    "changed",
    "trigger rate",
]


def _channel_lines(channel: dict[str, Any], generated: float) -> list[str]:
    verdict = "valid" if channel["valid"] else "not valid"
    reasons = [
        f"the oracle {'carries' if channel['carries'] else 'does not carry'} the answer",
        f"the dummies {'fall' if channel['needed'] else 'do not fall'} to at most {channel['dummy_ceiling']:.3f}",
    ]
    lines = ["", "## Latent channel (teacher-forced on the gold responses)", ""]
    lines += _table(
        ["condition", "accuracy", "95% CI", "Δ vs oracle", "McNemar p", "samples"],
        [
            [
                name,
                _number(c["accuracy"]),
                _interval(c),
                f"{c['delta_vs_oracle']:+.3f}",
                _p(c["p_vs_oracle"]),
                str(c["samples"]),
            ]
            for name, c in channel["conditions"].items()
        ],
    )
    lines += [
        "",
        (
            f"Channel: **{verdict}** ({'; '.join(reasons)}; chance {_number(channel['chance'])}). The model's own "
            f"answers score {generated:.3f} as generated."
        ),
    ]
    return lines


def markdown_report(report: dict[str, Any]) -> str:
    model, decoding, generated = report["model"], report["decoding"], report["generated"]
    collapse, interventions = report["collapse"], report["interventions"]
    lines = [
        f"# latentkit diagnose: {report['benchmark']} ({report['split']})",
        "",
        (
            f"Model: {model['method']} `{model['model_dir']}` ({model['backbone']}); "
            f"{report['num_samples']} samples, scorer {report['scorer']}, chance {_number(report['chance_level'])}; "
            f"greedy, K={k_text(decoding['k'])}, max {decoding['max_new_tokens']} new tokens; {report['seconds']} s."
        ),
        "",
        "## As generated",
        "",
        *_table(
            [
                "accuracy",
                "95% CI",
                "trigger rate",
                "blocks / answer",
                "acc. (triggered)",
                "acc. (untriggered)",
            ],
            [
                [
                    _number(generated["accuracy"]),
                    _interval(generated),
                    _number(generated["trigger_rate"], 2),
                    _number(generated["mean_blocks"], 2),
                    _number(generated["accuracy_triggered"]),
                    _number(generated["accuracy_untriggered"]),
                ]
            ],
        ),
        "",
        f"## Similarity (latents of the {collapse['latents_from']} answers)",
        "",
        *_table(
            [
                "raw cross-input cosine",
                "between-input fraction",
                "centred cosine",
                "mean norm",
                "latents",
                "pairs",
            ],
            [
                [
                    _number(collapse["cross_input_cosine"]),
                    _number(collapse["between_input_fraction"]),
                    _number(collapse["centred_cosine"]),
                    _number(collapse["mean_norm"], 2),
                    str(collapse["latents"]),
                    str(collapse["pairs"]),
                ]
            ],
        ),
        "",
        "Between-input fraction per step: "
        + ", ".join(_number(v) for v in collapse["between_input_fraction_per_step"]),
        "",
        f"## Probes ({report['probes']['features']})",
        "",
    ]
    attributes = report["probes"]["attributes"]
    if attributes:
        lines += _table(
            ["attribute", "classes", "held-out accuracy", "majority", "variance explained", "samples"],
            [
                [
                    name,
                    str(r["classes"]),
                    _number(r["accuracy"]),
                    _number(r["majority"]),
                    _number(r["variance_explained"]),
                    str(r["samples"]),
                ]
                for name, r in attributes.items()
            ],
        )
    else:
        lines.append("No categorical attribute in the sample metadata (or too few samples with latents).")
    baseline_interval = _interval({"interval": interventions["baseline_interval"]})
    lines += [
        "",
        f"## Replacements (baseline: {interventions['baseline']}, accuracy "
        + f"{_number(interventions['baseline_accuracy'])} {baseline_interval})",
        "",
    ]
    if report["latents_forced"] and not decoding["force"]:
        lines += [
            "No generated answer opened a latent block, so the replacements, inputs and K sweep force one.",
            "",
        ]
    rows = [
        [
            "generated",
            _number(generated["accuracy"]),
            _interval(generated),
            "",
            "",
            "",
            _number(generated["trigger_rate"], 2),
        ],
        [
            "forced",
            _number(report["forced"]["accuracy"]),
            _interval(report["forced"]),
            "",
            "",
            "",
            _number(report["forced"]["trigger_rate"], 2),
        ],
        *_condition_rows(interventions["conditions"]),
    ]
    lines += _table(CONDITION_HEADER, rows)
    if report["inputs"]:
        lines += ["", "## Inputs (question image changed)", ""]
        lines += _table(
            [*CONDITION_HEADER, "relative latent change", "toward donor"],
            [
                [*row, _number(result["relative_change"]), _number(result.get("toward_donor"))]
                for row, result in zip(_condition_rows(report["inputs"]), report["inputs"].values())
            ],
        )
    lines += ["", "## PRISM's gap: the gold answer at and after the latents", ""]
    prism = report["prism"]
    if prism is None:
        lines.append("No answer has a latent block followed by another position.")
    else:
        lines += _table(
            ["read from", "probe accuracy", "majority", "logit lens top-1"],
            [
                [
                    label,
                    _number(part["probe"]["accuracy"]) if part["probe"] else "–",
                    _number(part["probe"]["majority"]) if part["probe"] else "–",
                    _number(part["logit_lens"]),
                ]
                for label, part in (
                    ("latent positions", prism["at_latents"]),
                    ("after the block", prism["after_block"]),
                )
            ],
        )
    lines += ["", "## Attention at the answer positions (last layer)", ""]
    attention = report["attention"]
    if attention is None:
        lines.append("No answer has a latent block followed by another position.")
    else:
        lines += _table(
            ["on latents", "on image", "other", "per latent token", "per image token", "answer positions"],
            [
                [
                    _number(attention["latent"]),
                    _number(attention["image"]),
                    _number(attention["other"]),
                    _number(attention["latent_per_token"], 4),
                    _number(attention["image_per_token"], 4),
                    str(attention["answer_positions"]),
                ]
            ],
        )
    retrieval = report["retrieval"]
    if retrieval is not None:
        lines += ["", "## Retrieval against the oracle", ""]
        lines += _table(
            ["top-1", "top-1 (centred)", "chance", "samples", "steps"],
            [
                [
                    _number(retrieval["top1"]),
                    _number(retrieval["top1_centred"]),
                    _number(retrieval["chance"]),
                    str(retrieval["samples"]),
                    str(retrieval["steps"]),
                ]
            ],
        )
    channel = report.get("channel")
    if channel is not None:
        lines += _channel_lines(channel, report["generated"]["accuracy"])
    lines += ["", "## Test-time K", ""]
    lines += _table(
        ["K", "accuracy", "95% CI", "Δ vs baseline", "McNemar p", "trigger rate"],
        [
            [
                str(p["k"]),
                _number(p["accuracy"]),
                _interval(p),
                f"{p['delta']:+.3f}",
                _p(p["p_value"]),
                _number(p["trigger_rate"], 2),
            ]
            for p in report["k_sweep"]
        ],
    )
    if report["notes"]:
        lines += ["", "## Notes", "", *(f"- {note}" for note in report["notes"])]
    lines += ["", READING_GUIDE]
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Left: accuracy per condition with 95% intervals (baseline dashed, chance dotted); right: accuracy
    against test-time K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = {
        "generated": report["generated"],
        "forced": report["forced"],
        **report["interventions"]["conditions"],
        **report["inputs"],
    }
    accuracies = [100 * r["accuracy"] for r in conditions.values()]
    errors = [
        [100 * (r["accuracy"] - r["interval"]["low"]) for r in conditions.values()],
        [100 * (r["interval"]["high"] - r["accuracy"]) for r in conditions.values()],
    ]
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 4.6), gridspec_kw={"width_ratios": [2.2, 1]})
    bars = left.bar(range(len(conditions)), accuracies, yerr=errors, capsize=2, color="tab:blue")
    left.bar_label(bars, fmt="%.1f", fontsize=7)
    baseline = report["interventions"]
    left.axhline(100 * baseline["baseline_accuracy"], color="black", linestyle="dashed", label="baseline")
    if report["chance_level"] is not None:
        left.axhline(100 * report["chance_level"], color="gray", linestyle="dotted", label="chance")
    left.set_xticks(range(len(conditions)), list(conditions), rotation=35, ha="right", fontsize=8)
    left.set_ylabel("accuracy (%)")
    left.set_ylim(0, 105)
    left.set_title(f"{report['benchmark']}: latents replaced (baseline {baseline['baseline']})")
    left.legend(fontsize=8)
    ks = [p["k"] for p in report["k_sweep"]]
    right.errorbar(
        ks,
        [100 * p["accuracy"] for p in report["k_sweep"]],
        yerr=[
            [100 * (p["accuracy"] - p["interval"]["low"]) for p in report["k_sweep"]],
            [100 * (p["interval"]["high"] - p["accuracy"]) for p in report["k_sweep"]],
        ],
        marker="o",
        capsize=2,
    )
    if report["decoding"]["k"] is not None:  # None: the policy's own length per block
        right.axvline(
            report["decoding"]["k"], color="black", linestyle="dashed", linewidth=0.8, label="method's K"
        )
    right.set_xticks(ks)
    right.set_xlabel("latent steps per block (K)" + (" — forced" if report["latents_forced"] else ""))
    right.set_ylabel("accuracy (%)")
    right.set_ylim(0, 105)
    right.set_title("test-time K")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

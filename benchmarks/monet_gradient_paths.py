"""Monet stage 2's two CE gradient paths at the start of the stage, tiny default on CPU: the norm of CE's
gradient through forward 2 (latents held constant) and through the latents into forward 1 (the fill), over the
trainable weights (vision frozen), on 8 training batches of 8, and the cosine between the two parts.

Usage (a warm-up run first, then this script on its run directory):
    latentkit train --method monet train.stage=warmup train.stages.warmup.steps=20 \
        run.output_dir=/tmp/runs run.name=m train.progress=false
    python benchmarks/monet_gradient_paths.py /tmp/runs/m
"""

import platform
import sys
from pathlib import Path

import torch
from latentkit.methods.monet.layout import stage2_mask

from latentkit.api import load
from latentkit.latent import FilledLatents, fill_latents
from latentkit.layout import collate, inputs_embeds, latent_slot_positions
from latentkit.losses import weighted_next_token_ce
from latentkit.records import load_split

run = Path(sys.argv[1])
torch.manual_seed(0)
model = load(run / "stages" / "warmup" / "final")  # the warm-up model with its own saved config
backbone, method = model.backbone, model.method
backbone.model.train()
for name, p in backbone.model.named_parameters():
    p.requires_grad_("visual" not in name)
params = [p for p in backbone.model.parameters() if p.requires_grad]
samples = load_split(run / "data" / "synth-zoom", "train").samples


def grads(output, inputs, grad_outputs=None):
    found = torch.autograd.grad(
        output, inputs, grad_outputs=grad_outputs, allow_unused=True, retain_graph=True
    )
    return [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, found)]


def norm(gs):
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs)))


rows = []
for first in range(0, 64, 8):
    layouts = [method.layout(s, "distill") for s in samples[first : first + 8]]
    batch = collate(layouts, backbone.tokenizer.pad_token_id)
    mask = stage2_mask(batch)
    embeds = inputs_embeds(backbone, batch)
    slots = [latent_slot_positions(l) for l in layouts]
    filled = fill_latents(
        backbone, embeds, batch.position_ids, mask, slots, [len(l) for l in layouts], "full"
    )
    constants = filled.values.detach().requires_grad_(True)
    out = backbone.forward(FilledLatents(constants, filled.positions).write(embeds), batch.position_ids, mask)
    ce, _ = weighted_next_token_ce(backbone, out.last_hidden_state, batch.labels, batch.loss_weight)
    kept = grads(ce, params)
    (at_latents,) = torch.autograd.grad(ce, constants, retain_graph=True)
    dropped = grads(filled.values, params, at_latents)
    total = [a + b for a, b in zip(kept, dropped)]
    cos = float(
        sum((a.double() * b.double()).sum() for a, b in zip(kept, dropped)) / (norm(kept) * norm(dropped))
    )
    rows.append((norm(kept), norm(dropped), norm(total), cos, float(ce)))

print(
    f"device: {platform.machine()} CPU, {torch.get_num_threads()} threads; torch {torch.__version__}; run {run}"
)
print("| batch | CE | through forward 2 | into forward 1 | total | cosine |")
print("|---|---|---|---|---|---|")
for index, (kept_norm, dropped_norm, total_norm, cos, ce) in enumerate(rows):
    print(f"| {index} | {ce:.3f} | {kept_norm:.3f} | {dropped_norm:.3f} | {total_norm:.3f} | {cos:+.3f} |")
mean = [sum(r[i] for r in rows) / len(rows) for i in range(5)]
print(f"| mean | {mean[4]:.3f} | {mean[0]:.3f} | {mean[1]:.3f} | {mean[2]:.3f} | {mean[3]:+.3f} |")

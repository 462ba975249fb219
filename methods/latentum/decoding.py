"""Interleaved latent-image reasoning (spec "Interleaved reasoning") as a policy of the core decoding engine.

Text decodes as usual. When the model emits the image-start token, the row imagines the image:
1. the image-start token and then the image's positions take the generation branch (MoME, route True), sharing
   the row's KV cache; the hidden state at each of them gives the next position's C sub-codes, drawn by the code
   head with classifier-free guidance (`sample_codes`), and the position is fed the MBAQ decode of its codes;
2. after the last position's codes are drawn, the row rewinds to before the image-start token (the generation
   block's cache columns are hidden from then on);
3. image-start, the n decoded positions (projector(z_q), `codes_to_inputs`) and image-end are fed through the
   understanding branch, as stage language taught the model to read target images;
4. text goes on.
Positions are those stage vision trained with: the image's 2-D M-RoPE grid after its start token, in both
branches. The image has the grid of the prompt's last image (synth-maze's boards all share the question board's
size) unless `grid` says otherwise.

The unconditional pass guidance needs is stage vision's dropped condition: the generation block alone (its start
token and the positions drawn so far, same positions, generation branch), without the rest of the sequence;
the policy runs it beside the engine on that short sequence. Codes are drawn from a per-row generator seeded by
(seed, sample key), so the same seed gives the same codes whatever the batch.

Each trajectory's `extras` record, per finished imagined image in order: `imagined_codes` (the codes, [positions,
C] ints, raster order), `imagined_grids` ([t, h, w] of merged positions, to lay the codes out as an image) and
`imagined_seconds` (wall-clock from the image-start token to the end of its read-back; the whole batch's steps
run in between, so a per-image cost is measured at batch size 1)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch
from latentkit.methods.latentum.code_head import CodeHead, GuidanceParams, sample_codes
from latentkit.methods.latentum.mome import ROUTE
from latentkit.methods.latentum.quantizer import MBAQ
from latentkit.methods.latentum.targets import codes_to_inputs
from latentkit.methods.latentum.vision import GENERATION
from torch import Tensor
from transformers import DynamicCache

from latentkit.backbone import Backbone
from latentkit.decoding import DecodingPolicy, Embeddings, Proposal, RowView, Step, Token, Trajectory
from latentkit.errors import ConfigError
from latentkit.latent import Intervention, varied_policy
from latentkit.layout import Kind, Layout
from latentkit.masks import causal_mask

Grid = tuple[int, int, int]  # merged positions: temporal, height, width


@dataclass
class _Imagining:
    """A row's image in progress: where its generation block starts, its grid and positions, what is drawn."""

    block_start: int  # the row's length (prompt included) before the generation block's image-start token
    grid: Grid
    size: int  # positions drawn and read back: the grid's, or fewer under the policy's `k`
    began: float
    positions: Tensor | None = None  # [3, n]: the image's M-RoPE positions, known once image-start is placed
    start_position: int = 0
    codes: list[Tensor] = field(default_factory=list)  # [C] per drawn position
    inputs: list[Tensor] = field(default_factory=list)  # [D] per drawn position: the MBAQ decode of its codes
    phase: str = "draw"  # draw -> read (image-start fed again, understanding branch) -> end (image-end next)
    unconditional_cache: object | None = (
        None  # the generation block alone, for guidance: one position per draw
    )
    seconds: float = 0.0


@dataclass
class ImaginePolicy(DecodingPolicy):
    """Knobs: `guidance` (the code head's sampling), `seed` (the codes' generators), `grid` (the imagined
    images' merged (t, h, w) grid; None: the prompt's last image's) and `force` (the first generated token is
    the image-start token, forced: an image imagined right after the prompt, e.g. a given text prefix).

    For `latentkit diagnose` it is a `ContinuousPolicy` whose continuous steps are an imagined image's read-back
    positions (`kind` AUX_IMAGE): `k` positions per image are drawn and read back, in raster order (None: the
    whole grid; 0: image-start then image-end, nothing imagined; more than the grid: the grid), and an
    `intervention` replaces each read-back input before the understanding branch reads it (the generation
    branch draws from the true ones)."""

    quantizer: MBAQ
    code_head: CodeHead
    guidance: GuidanceParams
    seed: int = 0
    grid: Grid | None = None
    force: bool = False
    k: int | None = None
    intervention: Intervention | None = None
    kind: int = int(Kind.AUX_IMAGE)
    backbone: Backbone | None = field(default=None, init=False, repr=False)
    row_keys: list[tuple[str, str]] = field(default_factory=list, init=False, repr=False)
    rows: list[_Imagining | None] = field(default_factory=list, init=False, repr=False)
    grids: list[Grid] = field(default_factory=list, init=False, repr=False)
    generators: list[torch.Generator] = field(default_factory=list, init=False, repr=False)
    finished: list[list[_Imagining]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 0:
            raise ValueError(f"positions per imagined image must be at least 0, got k={self.k}")

    def varied(
        self, k: int | None = None, force: bool | None = None, intervention: Intervention | None = None
    ) -> ImaginePolicy:
        return varied_policy(self, k, force, intervention)

    def begin(self, backbone: Backbone, prompts: list[Layout]) -> None:
        self.backbone = backbone
        self.row_keys = [prompt.key for prompt in prompts]
        self.rows = [None] * len(prompts)
        self.finished = [[] for _ in prompts]
        self.grids = [self.grid or _last_image_grid(backbone, prompt) for prompt in prompts]
        self.generators = [
            torch.Generator(device=backbone.device).manual_seed(_row_seed(self.seed, prompt.key))
            for prompt in prompts
        ]

    def decide(self, proposal: Proposal, view: RowView) -> Step:
        backbone, state = self.backbone, self.rows[view.row]
        assert backbone is not None, "begin() sets the backbone"
        image_start = backbone.token_id(backbone.chat.vision_start)
        if state is None:
            forced = self.force and view.step == 0
            if proposal.token != image_start and not forced:
                return Step(Token(proposal.token))
            grid = self.grids[view.row]
            size = _count(grid) if self.k is None else min(self.k, _count(grid))
            state = _Imagining(view.length, grid, size, time.perf_counter())
            self.rows[view.row] = state
            if size == 0:  # nothing to imagine: image-start and image-end on the understanding branch
                state.phase = "end"
                return Step(Token(image_start, forced=forced, kind=int(Kind.AUX_IMAGE), emit=False))
            token = Token(image_start, forced=forced, kind=GENERATION, emit=False)
            return Step(token, extras=_route(True, 1, backbone))
        if state.phase == "read":
            state.phase = "end"
            codes = torch.stack(state.codes)
            caption = _caption(len(self.finished[view.row]) + 1, codes, state.grid)
            placeholder = backbone.token_id(backbone.chat.image_pad)
            inputs = state.inputs
            if self.intervention is not None:
                key = self.row_keys[view.row]
                inputs = [self.intervention(vector, step, key) for step, vector in enumerate(inputs)]
            positions = state.positions[:, : state.size]
            return Step(Embeddings(torch.stack(inputs), self.kind, placeholder, None, positions, caption))
        if state.phase == "end":
            self.rows[view.row] = None
            state.seconds = time.perf_counter() - state.began
            self.finished[view.row].append(state)
            return Step(Token(backbone.token_id(backbone.chat.vision_end), True, int(Kind.AUX_IMAGE), False))
        if state.positions is None:  # the generation block's image-start token was just fed
            state.start_position = view.trajectory.positions[-1]
            grid_positions = backbone.position_ids(
                torch.full((_count(state.grid),), backbone.token_id(backbone.chat.image_pad)),
                [_unmerged(backbone, state.grid)],
            )
            state.positions = grid_positions.reshape(-1, _count(state.grid)) + state.start_position + 1
        codes = self._draw(proposal.hidden, state, view.row)
        vector = codes_to_inputs(backbone, self.quantizer, codes[None])[0]
        state.codes.append(codes)
        state.inputs.append(vector)
        if len(state.codes) < state.size:
            index = len(state.codes) - 1
            positions = state.positions[:, index : index + 1]
            placeholder = backbone.token_id(backbone.chat.image_pad)
            return Step(
                Embeddings(vector[None], GENERATION, placeholder, None, positions),
                extras=_route(True, 1, backbone),
            )
        state.phase = "read"
        return Step(Token(image_start, True, int(Kind.AUX_IMAGE), False), rewind_to=state.block_start)

    def _draw(self, hidden: Tensor, state: _Imagining, row: int) -> Tensor:
        """The next position's C sub-codes [C] from the conditional state and, for guidance, the
        unconditional one."""
        cond = hidden[None]
        uncond = cond if self.guidance.scale == 1.0 else self._unconditional(state)
        return sample_codes(self.code_head, cond, uncond, self.guidance, self.generators[row])[0]

    def _unconditional(self, state: _Imagining) -> Tensor:
        """The generation block's last state [1, D] with the condition dropped: its start token and the positions
        drawn so far alone, at their positions, through the generation branch. The block has its own KV cache,
        so each draw feeds one position: the start token first, then the position drawn last."""
        backbone = self.backbone
        assert backbone is not None and state.positions is not None
        device, drawn = backbone.device, len(state.inputs)
        if drawn == 0:
            new = backbone.embed(torch.tensor([backbone.token_id(backbone.chat.vision_start)], device=device))
            position = torch.full((3, 1), state.start_position, device=device)
            state.unconditional_cache = DynamicCache(config=backbone.hf_model().config)
        else:
            new = state.inputs[-1][None].to(backbone.model.get_input_embeddings().weight.dtype)
            position = state.positions[:, drawn - 1 : drawn].to(device)
        out = backbone.forward(
            new[None],
            position[:, None],
            causal_mask(1, drawn + 1, device),
            state.unconditional_cache,
            extras={ROUTE: _route(True, 1, backbone)[ROUTE][None]},
        )
        state.unconditional_cache = out.cache
        return out.last_hidden_state[:, -1]

    def end(self, trajectories: list[Trajectory]) -> None:
        for row, trajectory in enumerate(trajectories):
            images = self.finished[row]
            trajectory.extras["imagined_images"] = len(images)
            trajectory.extras["imagined_codes"] = [
                [codes.tolist() for codes in image.codes] for image in images
            ]
            trajectory.extras["imagined_grids"] = [list(image.grid) for image in images]
            trajectory.extras["imagined_seconds"] = [image.seconds for image in images]


def _route(branch: bool, count: int, backbone: Backbone) -> dict[str, Tensor]:
    return {ROUTE: torch.full((count,), branch, dtype=torch.bool, device=backbone.device)}


def _count(grid: Grid) -> int:
    return grid[0] * grid[1] * grid[2]


def _unmerged(backbone: Backbone, grid: Grid) -> tuple[int, int, int]:
    """The grid as the backbone's position ids take it: patches before the spatial merge."""
    merge = backbone.merge_size
    return grid[0], grid[1] * merge, grid[2] * merge


def _last_image_grid(backbone: Backbone, prompt: Layout) -> Grid:
    if not prompt.images:
        raise ConfigError(
            f"latentum imagines images of the prompt's last image's size, and sample {prompt.sample_id} of "
            f"{prompt.dataset} has no image: set method.imagine.grid=[t, h, w] (merged positions)"
        )
    t, h, w = prompt.images[-1].image.grid_thw
    merge = backbone.merge_size
    return int(t), int(h) // merge, int(w) // merge


def _row_seed(seed: int, key: tuple[str, str]) -> int:
    digest = hashlib.sha256(repr((seed, key)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _caption(number: int, codes: Tensor, grid: Grid) -> str:
    """ "imagined image k: n positions x C codes", then one line of codes per row of the grid."""
    lines = [f"imagined image {number}: {codes.shape[0]} positions x {codes.shape[1]} codes"]
    per_line = grid[2]
    for start in range(0, codes.shape[0], per_line):
        cells = " ".join(
            "[" + " ".join(map(str, row)) + "]" for row in codes[start : start + per_line].tolist()
        )
        lines.append(cells)
    return "\n".join(lines)

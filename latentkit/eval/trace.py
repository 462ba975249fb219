"""A generated answer as a person reads it (`latentkit generate`): text, continuous segments marked with their
length, the norm of each vector and its nearest vocabulary tokens, observations set apart, the inserted
auxiliary images, and the extracted and gold answers when known."""

from __future__ import annotations

import re
from typing import Any

import torch

from latentkit.backbone import Backbone
from latentkit.chat import ResponseWeights
from latentkit.decoding import Trajectory
from latentkit.eval.answer import Answer
from latentkit.eval.scorers import ScoreResult
from latentkit.layout import kind_name


def nearest_tokens(backbone: Backbone, vectors: torch.Tensor, top: int) -> list[list[str]]:
    """Per vector [n, D], the `top` vocabulary tokens whose input embeddings are closest in cosine."""
    table = torch.nn.functional.normalize(backbone.model.get_input_embeddings().weight.float(), dim=-1)
    query = torch.nn.functional.normalize(vectors.float().to(table.device), dim=-1)
    ids = (query @ table.T).topk(min(top, table.shape[0]), dim=-1).indices.tolist()
    return [[backbone.tokenizer.convert_ids_to_tokens(i) for i in row] for row in ids]


def trajectory_pieces(backbone: Backbone, trajectory: Trajectory, top: int) -> list[dict[str, Any]]:
    """The trajectory as ordered pieces: {"text": str} and {"continuous": kind, "vectors": [...]}, the latter with
    the policy's "caption" when it gave one."""
    pieces: list[dict[str, Any]] = []
    pending: list[int] = []

    def flush() -> None:
        if pending:
            pieces.append({"text": backbone.tokenizer.decode(pending, skip_special_tokens=False)})
            pending.clear()

    index = 0
    while index < len(trajectory):
        if index not in trajectory.vectors:
            if trajectory.emitted[index]:
                pending.append(trajectory.input_ids[index])
            index += 1
            continue
        flush()
        kind, end = trajectory.kinds[index], index
        while end in trajectory.vectors and trajectory.kinds[end] == kind:
            end += 1
        vectors = torch.stack([trajectory.vectors[i] for i in range(index, end)])
        piece = {"continuous": kind_name(kind), "vectors": _vector_rows(backbone, vectors, top)}
        if index in trajectory.captions:
            piece["caption"] = trajectory.captions[index]
        pieces.append(piece)
        index = end
    flush()
    return pieces


def _vector_rows(backbone: Backbone, vectors: torch.Tensor, top: int) -> list[dict[str, Any]]:
    nearest = nearest_tokens(backbone, vectors, top)
    return [{"norm": float(v.float().norm()), "nearest": n} for v, n in zip(vectors, nearest)]


def _info_text(info: dict[str, Any]) -> str:
    """`key=value` pairs; long lists (a z) shortened to their first values and length."""

    def shown(value: Any) -> str:
        if isinstance(value, list) and len(value) > 4:
            return "[" + ", ".join(shown(v) for v in value[:4]) + f", … ({len(value)})]"
        if isinstance(value, list):
            return "[" + ", ".join(shown(v) for v in value) + "]"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    return " ".join(f"{key}={shown(value)}" for key, value in info.items())


def render_answer(
    backbone: Backbone, answer: Answer, score: ScoreResult | None, top: int = 3, color: bool = False
) -> str:
    """The whole trace as text lines."""
    mark = (lambda text: f"\033[36m{text}\033[0m") if color else (lambda text: text)
    lines: list[str] = []
    for slot in answer.trajectories[0].prompt.embeddings if answer.trajectories else []:
        lines.append(mark(f"⟦prompt vectors × {slot.vectors.shape[0]}⟧ " + _info_text(answer.prompt_info)))
        for step, row in enumerate(_vector_rows(backbone, slot.vectors, top), start=1):
            nearest = " ".join(repr(token) for token in row["nearest"])
            lines.append(mark(f"    {step:>3}  norm {row['norm']:8.3f}   nearest {nearest}"))
    for round_index, trajectory in enumerate(answer.trajectories):
        if round_index:
            lines.append(mark("[auxiliary image inserted]"))
        for piece in trajectory_pieces(backbone, trajectory, top):
            if "text" in piece:
                lines.extend(_text_lines(piece["text"], mark))
                continue
            vectors = piece["vectors"]
            if "caption" in piece:  # the policy's own account of the run (e.g. an image's codes)
                first, *rest = piece["caption"].splitlines()
                lines += [mark(f"⟦{first}⟧"), *(mark(f"    {line}") for line in rest)]
                continue
            lines.append(mark(f"⟦{piece['continuous']} × {len(vectors)}⟧"))
            for step, row in enumerate(vectors, start=1):
                nearest = " ".join(repr(token) for token in row["nearest"])
                lines.append(mark(f"    {step:>3}  norm {row['norm']:8.3f}   nearest {nearest}"))
            lines.append(mark(f"⟦/{piece['continuous']}⟧"))
    steps = sum(t.steps for t in answer.trajectories)
    lines += ["", f"finish: {answer.finish_reason} · {steps} decoding steps"]
    if score is not None:
        verdict = "correct" if score.correct else "wrong"
        lines.append(f"answer: {score.extracted!r}   gold: {answer.sample.answer!r}   ({verdict})")
    return "\n".join(lines)


def _text_lines(text: str, mark) -> list[str]:
    """Text with every observation on its own line, set apart by a bar."""
    open_tag, close_tag = ResponseWeights().observation_tags
    pattern = re.compile(f"{re.escape(open_tag)}(.*?)(?:{re.escape(close_tag)}|$)", re.DOTALL)
    lines, last = [], 0
    for match in pattern.finditer(text):
        lines.extend(text[last : match.start()].splitlines() or [""])
        lines.append(mark("  ┃ observation: ") + match.group(1).strip())
        last = match.end()
    lines.extend(text[last:].splitlines())
    return [line for line in lines if line.strip()]


def answer_json(
    backbone: Backbone, answer: Answer, score: ScoreResult | None, top: int = 3
) -> dict[str, Any]:
    """Everything `render_answer` shows, plus every trajectory in full."""
    return {
        "sample_id": answer.sample.sample_id,
        "text": answer.text,
        "finish_reason": answer.finish_reason,
        "aux_images_used": answer.aux_images_used,
        "extracted": score.extracted if score else None,
        "gold": answer.sample.answer,
        "correct": score.correct if score else None,
        "prompt_info": answer.prompt_info,
        "prompt_vectors": [
            _vector_rows(backbone, slot.vectors, top)
            for slot in (answer.trajectories[0].prompt.embeddings if answer.trajectories else [])
        ],
        "pieces": [trajectory_pieces(backbone, t, top) for t in answer.trajectories],
        "trajectories": [t.to_json() for t in answer.trajectories],
    }

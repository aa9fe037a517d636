"""Evaluating a run distilled from a stock pipeline: the teacher as users run it (the pipeline's own
scheduler at ``eval.teacher_nfe`` steps with its CFG) next to the student at each NFE (sampled as the
exported pipeline does), same prompts and noise, timed, decoded through the VAE into one grid.

Prompt accuracy and the FD proxy need the built-in digit classifier: they are computed on the
built-in digits only, and this says so instead of printing a number that would mean nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

NO_DIGIT_METRICS = ("prompt accuracy and the FD proxy use the built-in digit classifier: they are computed for runs on "
                    "the built-in digits only")


@dataclass
class PipelineEvalRow:
    model: str
    nfe: int
    ms_per_image: float


def load_teacher_scheduler(folder: str | Path) -> Any:
    """The scheduler the teacher pipeline ships (its class from model_index.json)."""
    import diffusers

    from apexdistill.models.family import read_model_index

    index = read_model_index(folder) or {}
    cls = getattr(diffusers, index["scheduler"][1])
    return cls.from_pretrained(str(Path(folder) / "scheduler"))


def _timed(fn: Any) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    out = fn()
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return out, time.perf_counter() - started


@torch.no_grad()
def evaluate_pipeline_run(model: Any, cfg: Any, prompts: list[str], nfes: list[int], out_png: str | Path,
                          per_prompt: int = 2, seed: int = 0, device: str = "cpu", height: int | None = None,
                          width: int | None = None) -> list[PipelineEvalRow]:
    """Teacher (``eval.teacher_nfe``, ``teacher.guidance_scale``) and student rows with ms/image, and a
    grid (rows: teacher, then the student at each NFE) written to ``out_png``, at ``height`` x ``width``
    pixels (default the ``data.resolution`` square)."""
    from apexdistill.eval.grid import save_grid
    from apexdistill.models.build import build_backbone
    from apexdistill.models.family import get_family
    from apexdistill.models.text import build_text_encoder
    from apexdistill.models.vae import build_vae

    family = get_family(cfg.model.backbone)
    encoder = build_text_encoder(cfg.text_encoder).to(device)
    text, mask = encoder.encode(prompts)
    neg, neg_mask = (v.to(device) for v in encoder.encode_negative())
    del encoder
    text, mask = text.repeat_interleave(per_prompt, 0).to(device), mask.repeat_interleave(per_prompt, 0).to(device)
    vae = build_vae(cfg.vae, cfg.data.image_channels).to(device)
    c, h, w = vae.latent_shape(height or cfg.data.resolution, width or cfg.data.resolution)
    z = torch.randn((text.shape[0], c, h, w), generator=torch.Generator().manual_seed(seed)).to(device)
    model = model.to(device)
    teacher = build_backbone(cfg.model.model_copy(update={"lora": cfg.model.lora.model_copy(update={"enabled": False})}),
                             c, vae.latent_shape(cfg.data.resolution)[-1], text.shape[-1]).to(device).eval()
    n, rows, images = z.shape[0], [], []
    scheduler = load_teacher_scheduler(cfg.model.path)
    x, seconds = _timed(lambda: family.sample(teacher, scheduler, z, text, mask, cfg.eval.teacher_nfe, cfg.teacher.guidance_scale,
                                              neg, neg_mask, generator=torch.Generator(device=device).manual_seed(seed)))
    rows.append(PipelineEvalRow("teacher", cfg.eval.teacher_nfe, 1000 * seconds / n))
    images.append(vae.decode(x).clamp(-1, 1))
    for nfe in nfes:
        torch.manual_seed(seed)
        x, seconds = _timed(lambda: family.sample_student(model, z, text, mask, nfe, generator=torch.Generator(device=device).manual_seed(seed)))
        rows.append(PipelineEvalRow("student", nfe, 1000 * seconds / n))
        images.append(vae.decode(x).clamp(-1, 1))
    labels = [f"{r.model} {r.nfe} NFE" for r in rows]
    save_grid(torch.cat(images).float().cpu(), out_png, nrow=n, labels_text=labels)
    return rows


def format_pipeline_table(rows: list[PipelineEvalRow]) -> str:
    lines = ["| model | NFE | ms/image |", "|---|---|---|"]
    lines += [f"| {r.model} | {r.nfe} | {r.ms_per_image:.1f} |" for r in rows]
    return "\n".join(lines + ["", f"({NO_DIGIT_METRICS})"])

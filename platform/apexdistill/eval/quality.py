"""Quality of a distilled run on any model: FD to the teacher, FD to real images, CLIP score,
diversity and end-to-end speed, over a prompt set, generated as Ray Data batch inference.

The work is a list of batches (prompt set x images per prompt x noise draws): each batch is a fixed
set of images whose noise comes from its own seeds, so the numbers do not depend on how many actors
share the work. An actor (``QualityWorker``) holds the run's student and teacher, the text encoder,
the VAE and the feature models; for each batch it generates every row (the teacher at
``eval.teacher_nfe`` with its own scheduler and CFG, the student at each NFE as the exported pipeline
runs it), decodes, featurizes and times it. The driver aggregates:

- **FD to the teacher** of a row on draw d: the Frechet distance between its images and the teacher's
  *reference* draw (its own independent noise, the same prompts). The teacher's own draws against the
  reference are the **noise floor**: a student at the floor is as close as the teacher is to itself.
- **FD to real images** (``eval.reference``), **CLIP score** (``eval.clip_model``: torchmetrics'
  definition, overall and per prompt tag), **diversity** (the mean pairwise feature distance among a
  prompt's images; the student's as a ratio to the teacher's on the same draw: below 0.8 flags a likely
  mode collapse), and ms/image end to end (text encoder + transformer + VAE decode) and transformer only.

Means and spread are over ``eval.noise_draws``. FD is biased upward at small N: compare rows at the same
N only (every row here has the same N).
"""

from __future__ import annotations

import io
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor

from apexdistill.eval.features import build_clip_scorer, build_feature_space, check_eval_models, clip_score_of, clip_truncated
from apexdistill.eval.metrics import frechet_distance
from apexdistill.eval.prompts import PromptSet, load_prompt_set, prompt_set_from_list

COLLAPSE_RATIO = 0.8  # a student / teacher diversity ratio below this is flagged as a likely mode collapse
GRID_PROMPTS = 8  # prompts shown in the sample grid (their first image)


# ----------------------------------------------------------------------------- the work


@dataclass(frozen=True)
class Batch:
    """A fixed set of images: one prompt index, sample index and seed per image, of one noise draw."""

    index: int
    draw: int
    prompt_idx: tuple[int, ...]
    sample: tuple[int, ...]
    seeds: tuple[int, ...]
    teacher_only: bool  # the teacher's reference draw


def image_seed(seed: int, draw: int, prompt_idx: int, sample: int) -> int:
    """The initial noise seed of one image: independent across draws, prompts and samples, whatever the batching. (The
    2- and 4-NFE rows' re-noise is drawn per batch, from its first seed: those rows depend on eval.pipeline_batch_size,
    not on how many actors share the batches.)"""
    return int(np.random.SeedSequence([seed, draw, prompt_idx, sample]).generate_state(1)[0])


def plan_batches(prompts: int, per_prompt: int, draws: int, batch_size: int, seed: int) -> list[Batch]:
    """Draws 0..draws-1 for every row, then the teacher's reference draw (index ``draws``)."""
    out: list[Batch] = []
    for draw in range(draws + 1):
        cells = [(p, k) for p in range(prompts) for k in range(per_prompt)]
        for start in range(0, len(cells), batch_size):
            chunk = cells[start:start + batch_size]
            out.append(Batch(len(out), draw, tuple(p for p, _ in chunk), tuple(k for _, k in chunk),
                             tuple(image_seed(seed, draw, p, k) for p, k in chunk), teacher_only=draw == draws))
    return out


def _batch_record(b: Batch) -> dict[str, Any]:
    return {"index": b.index, "draw": b.draw, "prompt_idx": list(b.prompt_idx), "sample": list(b.sample),
            "seeds": list(b.seeds), "teacher_only": b.teacher_only}


def _batch_from_record(rec: dict[str, Any]) -> Batch:
    def ints(v: Any) -> tuple[int, ...]:
        return tuple(int(x) for x in np.asarray(v).reshape(-1))
    return Batch(int(rec["index"]), int(rec["draw"]), ints(rec["prompt_idx"]), ints(rec["sample"]), ints(rec["seeds"]),
                 bool(rec["teacher_only"]))


# ----------------------------------------------------------------------------- the worker


def _disabled_lora(model_cfg: Any) -> Any:
    return model_cfg.model_copy(update={"lora": model_cfg.lora.model_copy(update={"enabled": False})})


def load_run_student(run: str, use_ema: bool = True) -> tuple[Any, Any]:
    """(student backbone, config) of a run folder, one of its checkpoints, a run URI, or 'builtin:teacher'."""
    from apexdistill.assets import BUILTIN

    if run in BUILTIN:
        from apexdistill.demo import demo_config
        from apexdistill.models.build import build_backbone
        from apexdistill.train.data import digit_caption_table

        cfg = demo_config("./apex-runs", overrides=[f"model.path={run}"])
        text, _ = digit_caption_table(cfg)
        return build_backbone(cfg.model, 1, cfg.data.resolution, text.shape[-1]).eval(), cfg
    from apexdistill.train.export import load_trained_backbone

    return load_trained_backbone(run, use_ema=use_ema)


class QualityWorker:
    """Generates, decodes, featurizes and times batches of one run (what each Ray Data actor holds).

    ``cfg`` is the run's config with the evaluation settings to use; ``student`` its trained backbone.
    The teacher is the run's ``model.path`` with LoRA off (the weights distillation started from)."""

    def __init__(self, student: Any, cfg: Any, prompts: list[str], height: int, width: int, device: str = "cpu",
                 teacher: Any | None = None) -> None:
        from apexdistill.models.build import build_backbone
        from apexdistill.models.text import build_text_encoder
        from apexdistill.models.vae import build_vae

        self.cfg, self.prompts, self.device = cfg, list(prompts), torch.device(device)
        self.encoder = build_text_encoder(cfg.text_encoder).to(self.device).eval()
        self.vae = build_vae(cfg.vae, cfg.data.image_channels).to(self.device).eval()
        self.latent_shape = self.vae.latent_shape(height, width)
        self.pipeline = cfg.text_encoder.kind == "pipeline"
        self.student = student.to(self.device).eval()
        if teacher is None:
            if not cfg.model.path:
                raise ValueError("model.path: this run has no teacher to compare with (it was trained from a random init)")
            c = self.latent_shape[0]
            text_dim = int(self.encoder.dim)
            teacher = build_backbone(_disabled_lora(cfg.model), c, self.vae.latent_shape(cfg.data.resolution)[-1], text_dim)
        self.teacher = teacher.to(self.device).eval()
        self.guidance = teacher_guidance(cfg)  # Z-Image-Turbo: 0.0
        self.neg = None
        if self.pipeline:
            from apexdistill.eval.pipeline import load_teacher_scheduler
            from apexdistill.models.family import get_family

            self.family = get_family(cfg.model.backbone)
            load_teacher_scheduler(cfg.model.path)  # fails here, not in the first batch, if the folder has none
            if self.family.uses_cfg(self.guidance):
                self.neg = tuple(v.to(self.device) for v in self.encoder.encode_negative())
        self.features = build_feature_space(cfg.eval, self.device)
        self.clip = build_clip_scorer(cfg.eval, self.features, self.device)
        #: the teacher's latents and sampling time per batch: a worker that scores several students (checkpoints
        #: of one run, in-training scores) samples the teacher once
        self.teacher_cache: dict[tuple[int, ...], tuple[Tensor, float]] = {}

    @classmethod
    def from_run(cls, run: str, eval_updates: dict[str, Any], prompts: list[str], height: int, width: int,
                 device: str = "cpu", use_ema: bool = True) -> "QualityWorker":
        student, cfg = load_run_student(run, use_ema)
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update=eval_updates)})
        return cls(student, cfg, prompts, height, width, device)

    # ---------------------------------------------------------------- one row's generation

    def arms(self, teacher_only: bool) -> list[tuple[str, int]]:
        teacher = [("teacher", int(self.cfg.eval.teacher_nfe))]
        return teacher if teacher_only else teacher + [("student", int(n)) for n in self.cfg.eval.nfe]

    def _generate(self, name: str, nfe: int, z: Tensor, text: Tensor, mask: Tensor | None, seed: int) -> Tensor:
        torch.manual_seed(seed)  # families whose pipelines re-noise from the global RNG
        return sample_row(self.cfg, self.teacher if name == "teacher" else self.student, z, text, mask, nfe, name == "teacher",
                          torch.Generator(device=self.device).manual_seed(seed), self.neg)

    @torch.no_grad()
    def run(self, batch: Batch) -> dict[str, Any]:
        """Every row of one batch: per image (arm, nfe, features, CLIP score, timings, a PNG for the grid)."""
        prompts = [self.prompts[p] for p in batch.prompt_idx]
        n = len(prompts)
        z = torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(s)) for s in batch.seeds])
        z = z.to(self.device)
        out: dict[str, list[Any]] = {k: [] for k in ("model", "nfe", "draw", "prompt_idx", "sample", "seed", "batch",
                                                     "features", "clip_score", "encode_ms", "transformer_ms", "decode_ms",
                                                     "png")}
        # encoded once; every row's end-to-end time counts it, as each pipeline call would pay it
        started = _now(self.device)
        text, mask = self.encoder.encode(prompts)
        text, mask = text.to(self.device), (mask.to(self.device) if mask is not None else None)
        encode_s = _now(self.device) - started
        for name, nfe in self.arms(batch.teacher_only):
            key = (nfe, *batch.seeds)
            started = _now(self.device)
            if name == "teacher" and key in self.teacher_cache:
                x, sample_s = self.teacher_cache[key]  # with the time it took when it was sampled
                x = x.to(self.device)
            else:
                x = self._generate(name, nfe, z, text, mask, batch.seeds[0] + 1)
                sample_s = _now(self.device) - started
                if name == "teacher":
                    self.teacher_cache[key] = (x.detach().cpu(), sample_s)
            started = _now(self.device)
            images = self.vae.decode(x).float().clamp(-1, 1)
            decode_s = _now(self.device) - started
            feats = self.features(x, images).float().numpy()
            clip = (self.clip.scores(images, prompts, torch.from_numpy(feats) if self.clip is self.features else None).numpy()
                    if self.clip is not None else np.full(n, np.nan))
            out["model"] += [name] * n
            out["nfe"] += [nfe] * n
            out["draw"] += [batch.draw] * n
            out["prompt_idx"] += list(batch.prompt_idx)
            out["sample"] += list(batch.sample)
            out["seed"] += list(batch.seeds)
            out["batch"] += [batch.index] * n
            out["features"] += list(feats)
            out["clip_score"] += list(clip)
            out["encode_ms"] += [1000 * encode_s / n] * n
            out["transformer_ms"] += [1000 * sample_s / n] * n
            out["decode_ms"] += [1000 * decode_s / n] * n
            cpu_images = images.cpu()
            out["png"] += [_png(cpu_images[i]) if batch.draw == 0 and batch.sample[i] == 0 and batch.prompt_idx[i] < GRID_PROMPTS
                           else b"" for i in range(n)]
        arrays = {k: np.asarray(v) for k, v in out.items() if k not in ("features", "png")}
        arrays["features"] = np.stack(out["features"]).astype(np.float32)
        arrays["png"] = np.asarray(out["png"], dtype=object)
        return arrays

def teacher_guidance(cfg: Any) -> float:
    """The teacher's CFG scale as the run states it (a stated 0.0, Z-Image-Turbo's, is kept)."""
    return float(1.0 if cfg.teacher.guidance_scale is None else cfg.teacher.guidance_scale)


@torch.no_grad()
def sample_row(cfg: Any, model: Any, z: Tensor, text: Tensor, mask: Tensor | None, nfe: int, teacher: bool,
               generator: torch.Generator, negative: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
    """One row's latents as the evaluation (and the in-training score) samples them: the teacher with its pipeline's
    own scheduler and CFG (``negative``: the negative prompt's states, needed when its guidance applies CFG), or the
    student as the exported pipeline runs it; on the built-in digits the teacher's Euler ODE and the few-step sampler."""
    from apexdistill.method.sampler import sample_euler, sample_few_step

    if cfg.text_encoder.kind != "pipeline":
        return sample_euler(model, z, text, mask, nfe=nfe) if teacher else sample_few_step(model, z, text, mask, nfe=nfe,
                                                                                            generator=generator)
    from apexdistill.models.family import get_family

    family = get_family(cfg.model.backbone)
    if not teacher:
        return family.sample_student(model, z, text, mask, nfe, generator=generator)
    from apexdistill.eval.pipeline import load_teacher_scheduler

    guidance = teacher_guidance(cfg)
    neg, neg_mask = negative if negative is not None and family.uses_cfg(guidance) else (None, None)
    return family.sample(model, load_teacher_scheduler(cfg.model.path), z, text, mask, nfe, guidance, neg, neg_mask,
                         generator=generator)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _png(image: Tensor) -> bytes:
    from PIL import Image

    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def reference_files(folder: str) -> list[Path]:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"eval.reference: no such folder {root} (expected a folder of images)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"eval.reference: {root} holds {len(files)} image(s) ({', '.join(IMAGE_SUFFIXES)}); the FD needs at least 2")
    return files


def load_reference_images(files: list[Path], height: int, width: int, channels: int = 3) -> Tensor:
    """Images in [-1, 1], (N, C, height, width): shorter side resized, centre-cropped."""
    from PIL import Image

    out = []
    for f in files:
        img = Image.open(f).convert("L" if channels == 1 else "RGB")
        scale = max(height / img.height, width / img.width)
        img = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))), Image.Resampling.BICUBIC)
        left, top = (img.width - width) // 2, (img.height - height) // 2
        arr = np.asarray(img.crop((left, top, left + width, top + height)), dtype=np.float32)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        out.append(torch.from_numpy(arr / 127.5 - 1.0))
    return torch.stack(out)


@torch.no_grad()
def reference_features(spec: "QualitySpec", chunk: int = 32) -> np.ndarray:
    """Features of the real images of ``eval.reference`` in the evaluation's feature space (through the run's VAE for
    latent features), a chunk at a time: only the VAE and the feature model are loaded, never the whole folder."""
    from apexdistill.models.vae import build_vae

    cfg, device = spec.cfg, torch.device(spec.device)
    files = reference_files(cfg.eval.reference)
    vae = build_vae(cfg.vae, cfg.data.image_channels).to(device).eval()
    features = build_feature_space(cfg.eval, device)
    out = []
    for start in range(0, len(files), chunk):
        images = load_reference_images(files[start:start + chunk], spec.height, spec.width, cfg.data.image_channels).to(device)
        latents = vae.encode(images) if not features.needs_images else None
        out.append(features(latents, images).float().numpy())
    return np.concatenate(out)


class QualityActor:
    """The Ray Data actor: a ``QualityWorker`` built once per actor from the run's path."""

    def __init__(self, spec: dict[str, Any]) -> None:
        torch.set_num_threads(max(1, int(spec.get("threads") or 1)))
        self.worker = QualityWorker.from_run(spec["run"], spec["eval_updates"], spec["prompts"], spec["height"], spec["width"],
                                             spec["device"], spec["use_ema"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rec = {k: batch[k][0] for k in batch}
        return self.worker.run(_batch_from_record(rec))


class CollapsedGenerator(torch.nn.Module):
    """The known-bad reference for the diversity metric: a one-step generator that ignores its noise. At the
    sampler's query it returns the velocity whose endpoint x0 = x - t*v is one fixed image, whatever x is."""

    def forward(self, x: Tensor, t: Tensor, text: Tensor, mask: Tensor | None = None) -> Tensor:
        const = torch.linspace(-0.5, 0.5, x[0].numel(), device=x.device, dtype=x.dtype).reshape(x.shape[1:])
        return (x - const) / t.reshape(-1, *[1] * (x.dim() - 1)).clamp_min(1e-3)


# ----------------------------------------------------------------------------- results


@dataclass
class QualityRow:
    """One (model, NFE) row: means over the noise draws, and their spread (std; None with one draw)."""

    model: str
    nfe: int
    draws: int
    fd_teacher: float
    fd_teacher_std: float | None
    diversity: float
    diversity_ratio: float | None  # student / teacher on the same draws (None for the teacher)
    clip_score: float | None = None
    clip_score_std: float | None = None
    fd_real: float | None = None
    fd_real_std: float | None = None
    ms_per_image: float = 0.0  # end to end: text encoder + transformer + VAE decode
    ms_transformer: float = 0.0
    speedup: float | None = None  # the teacher's end-to-end time over this row's
    clip_by_tag: dict[str, float] = field(default_factory=dict)

    @property
    def collapsed(self) -> bool:
        return self.diversity_ratio is not None and self.diversity_ratio < COLLAPSE_RATIO

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QualityReport:
    rows: list[QualityRow]
    prompt_set: str
    prompt_hash: str
    prompts: int
    images_per_prompt: int
    images_per_row: int  # per draw: prompts x images per prompt (every FD here is at this N)
    features: str
    feature_dim: int
    batch_size: int
    clip_truncated: int = 0
    seconds: float = 0.0
    per_image: Any = None  # a pyarrow Table of the per-image scores
    grid: Path | None = None

    @property
    def teacher(self) -> QualityRow:
        return next(r for r in self.rows if r.model == "teacher")

    def students(self) -> list[QualityRow]:
        return [r for r in self.rows if r.model != "teacher"]

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """The MLflow metrics: ``eval/fd_teacher_{n}nfe``, ``eval/clip_score_{n}nfe``, ``eval/diversity_{n}nfe`` (the
        ratio to the teacher), ``eval/ms_per_image_{n}nfe`` (end to end) ..., and the teacher's as ``eval/teacher_*``."""
        out: dict[str, float] = {}
        for r in self.students():
            out[f"{prefix}/fd_teacher_{r.nfe}nfe"] = r.fd_teacher
            if r.fd_teacher_std is not None:
                out[f"{prefix}/fd_teacher_std_{r.nfe}nfe"] = r.fd_teacher_std
            if r.diversity_ratio is not None:
                out[f"{prefix}/diversity_{r.nfe}nfe"] = r.diversity_ratio
            if r.clip_score is not None:
                out[f"{prefix}/clip_score_{r.nfe}nfe"] = r.clip_score
            if r.fd_real is not None:
                out[f"{prefix}/fd_real_{r.nfe}nfe"] = r.fd_real
            out[f"{prefix}/ms_per_image_{r.nfe}nfe"] = r.ms_per_image
            out[f"{prefix}/ms_transformer_{r.nfe}nfe"] = r.ms_transformer
            if r.speedup is not None:
                out[f"{prefix}/speedup_{r.nfe}nfe"] = r.speedup
        t = self.teacher
        out[f"{prefix}/teacher_fd_floor"] = t.fd_teacher
        out[f"{prefix}/teacher_ms_per_image"] = t.ms_per_image
        if t.clip_score is not None:
            out[f"{prefix}/teacher_clip_score"] = t.clip_score
        if t.fd_real is not None:
            out[f"{prefix}/teacher_fd_real"] = t.fd_real
        return out

    def summary(self) -> dict[str, Any]:
        return {"rows": [r.as_dict() for r in self.rows], "prompt_set": self.prompt_set, "prompt_hash": self.prompt_hash,
                "prompts": self.prompts, "images_per_prompt": self.images_per_prompt, "images_per_row": self.images_per_row,
                "features": self.features, "feature_dim": self.feature_dim, "batch_size": self.batch_size,
                "clip_truncated": self.clip_truncated, "seconds": self.seconds}


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def diversity(features: np.ndarray, groups: np.ndarray) -> float:
    """Mean over groups (prompts) of the mean pairwise Euclidean distance among the group's features."""
    means = []
    for g in np.unique(groups):
        f = features[groups == g].astype(np.float64)
        if f.shape[0] < 2:
            continue
        d = np.sqrt(np.clip(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1), 0, None))
        k = f.shape[0]
        means.append(d.sum() / (k * (k - 1)))
    if not means:
        raise ValueError("diversity needs at least 2 images of one prompt (eval.images_per_prompt >= 2)")
    return float(np.mean(means))


def aggregate(columns: dict[str, np.ndarray], prompt_set: PromptSet, draws: int, teacher_nfe: int,
              real: np.ndarray | None = None) -> list[QualityRow]:
    """The rows of a report from every image's record (``QualityWorker.run`` outputs, concatenated)."""
    model, nfe, draw = columns["model"].astype(str), columns["nfe"].astype(int), columns["draw"].astype(int)
    order = np.lexsort((columns["sample"], columns["prompt_idx"]))  # every set of features in (prompt, sample) order

    def select(name: str, n: int, d: int) -> np.ndarray:
        idx = order[(model[order] == name) & (nfe[order] == n) & (draw[order] == d)]
        if idx.size == 0:
            raise RuntimeError(f"no images for {name} at {n} NFE, draw {d}: the evaluation lost a batch")
        return idx

    feats, prompt_idx, clip = columns["features"], columns["prompt_idx"].astype(int), columns["clip_score"].astype(float)
    reference = feats[select("teacher", teacher_nfe, draws)]
    tags = prompt_set.tags
    arms = [("teacher", teacher_nfe)] + sorted({(m, int(n)) for m, n in zip(model, nfe) if m != "teacher"}, key=lambda a: a[1])
    teacher_div = [diversity(feats[i], prompt_idx[i]) for i in (select("teacher", teacher_nfe, d) for d in range(draws))]
    ms = {a: _median_ms(columns, model == a[0], nfe == a[1]) for a in arms}
    rows = []
    for name, n in arms:
        fds, divs, clips, reals, by_tag = [], [], [], [], {}
        for d in range(draws):
            idx = select(name, n, d)
            fds.append(frechet_distance(feats[idx], reference))
            divs.append(diversity(feats[idx], prompt_idx[idx]))
            if real is not None:
                reals.append(frechet_distance(feats[idx], real))
            if not np.isnan(clip[idx]).all():
                clips.append(clip_score_of(clip[idx]))
                for tag in prompt_set.tag_names():
                    mine = np.array([tag in tags[p] for p in prompt_idx[idx]])
                    by_tag.setdefault(tag, []).append(clip_score_of(clip[idx][mine]))
        e2e, trans = ms[(name, n)]
        ratio = None if name == "teacher" else float(np.mean([a / b if b > 0 else math.nan for a, b in zip(divs, teacher_div)]))
        rows.append(QualityRow(
            model=name, nfe=n, draws=draws, fd_teacher=float(np.mean(fds)), fd_teacher_std=_std(fds), diversity=float(np.mean(divs)),
            diversity_ratio=ratio, clip_score=float(np.mean(clips)) if clips else None, clip_score_std=_std(clips),
            fd_real=float(np.mean(reals)) if reals else None, fd_real_std=_std(reals), ms_per_image=e2e, ms_transformer=trans,
            clip_by_tag={t: float(np.mean(v)) for t, v in by_tag.items()}))
    teacher_ms = rows[0].ms_per_image
    for r in rows[1:]:
        r.speedup = teacher_ms / r.ms_per_image if r.ms_per_image > 0 else None
    return rows


def _median_ms(columns: dict[str, np.ndarray], *masks: np.ndarray) -> tuple[float, float]:
    """Median over the row's batches (each batch's first image carries its per-image times): warm-up batches
    and busy moments do not set the number."""
    sel = np.logical_and.reduce(masks)
    first = {}
    for i in np.flatnonzero(sel):
        first.setdefault(int(columns["batch"][i]), i)
    idx = list(first.values())
    e2e = [float(columns["encode_ms"][i] + columns["transformer_ms"][i] + columns["decode_ms"][i]) for i in idx]
    return statistics.median(e2e), statistics.median(float(columns["transformer_ms"][i]) for i in idx)


# ----------------------------------------------------------------------------- running it


@dataclass
class QualitySpec:
    """What to evaluate, resolved before any compute (prompt set loaded, folders checked)."""

    run: str
    cfg: Any
    prompt_set: PromptSet
    height: int
    width: int
    device: str = "cpu"
    use_ema: bool = True

    @property
    def eval(self) -> Any:
        return self.cfg.eval


def run_prompts(cfg: Any, run_folder: Path | None) -> PromptSet:
    """``eval.prompts``, else the run's own captions (the ten digit captions on the built-in digits), limited
    to ``eval.prompt_limit``."""
    if cfg.eval.prompts:
        return load_prompt_set(cfg.eval.prompts).with_limit(cfg.eval.prompt_limit)
    if cfg.data.source == "digits":
        from apexdistill.data.digits import CAPTIONS

        return prompt_set_from_list(list(CAPTIONS), "the built-in digits' captions").with_limit(cfg.eval.prompt_limit)
    if run_folder is None:
        raise ValueError("eval.prompts: set a prompt set (this run's captions are not known here)")
    from apexdistill.data.preprocess import distinct_captions
    from apexdistill.train.data import DataShapes

    uri = DataShapes.load(run_folder).cache_uri
    captions = [r["caption"] for r in distinct_captions(uri, cfg.eval.prompt_limit or 10**9)]
    return prompt_set_from_list(captions, f"the run's captions ({uri})")


def prepare(run: str, cfg: Any, run_folder: Path | None, height: int, width: int, device: str = "cpu",
            use_ema: bool = True, prompt_set: PromptSet | None = None) -> QualitySpec:
    """Check every input (prompts, model folders, the reference folder) before anything is generated.
    ``prompt_set``: these prompts instead of ``eval.prompts`` / the run's captions."""
    prompt_set = prompt_set or run_prompts(cfg, run_folder)
    check_eval_models(cfg.eval)
    if cfg.eval.reference:
        reference_files(cfg.eval.reference)
    if not cfg.model.path:
        raise ValueError("model.path: this run has no teacher to compare with (it was trained from a random init)")
    return QualitySpec(run, cfg, prompt_set, height, width, device, use_ema)


def evaluate_quality(spec: QualitySpec, actors: int | None = None, out_dir: Path | None = None,
                     worker: QualityWorker | None = None, progress: bool = True) -> QualityReport:
    """Generate every batch (Ray Data actors, or in this process with ``actors=0`` or a ``worker``), aggregate,
    and write the per-image scores (Parquet) and the sample grid under ``out_dir``."""
    e = spec.eval
    actors = e.actors if actors is None else actors
    batches = plan_batches(len(spec.prompt_set), e.images_per_prompt, e.noise_draws, e.pipeline_batch_size, e.seed)
    arms_per_draw = 1 + len(e.nfe)
    total = sum(len(b.seeds) * (1 if b.teacher_only else arms_per_draw) for b in batches)
    started = time.perf_counter()
    meter = _Progress(total, enabled=progress)
    parts: list[dict[str, np.ndarray]] = []
    if worker is not None or actors == 0:
        worker = worker or QualityWorker.from_run(spec.run, e.model_dump(), list(spec.prompt_set.prompts), spec.height,
                                                  spec.width, spec.device, spec.use_ema)
        for b in batches:
            parts.append(worker.run(b))
            meter.add(len(parts[-1]["model"]))
    else:
        for part in _ray_batches(spec, batches, actors):
            parts.append(part)
            meter.add(len(part["model"]))
    meter.done()
    columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    real = reference_features(spec) if e.reference else None
    rows = aggregate(columns, spec.prompt_set, e.noise_draws, e.teacher_nfe, real)
    truncated = clip_truncated(e.clip_model, list(spec.prompt_set.prompts)) if e.clip_model else 0
    report = QualityReport(rows, spec.prompt_set.source, spec.prompt_set.hash, len(spec.prompt_set), e.images_per_prompt,
                           len(spec.prompt_set) * e.images_per_prompt, e.features, int(columns["features"].shape[1]),
                           e.pipeline_batch_size, truncated, time.perf_counter() - started)
    report.per_image = per_image_table(columns, spec.prompt_set)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        import pyarrow.parquet as pq

        pq.write_table(report.per_image, out_dir / "per_image.parquet")
        report.grid = write_grid(columns, out_dir / "samples.png")
        import json

        (out_dir / "quality.json").write_text(json.dumps(report.summary(), indent=1))
    return report


def actor_gpus(spec: QualitySpec) -> float:
    """GPUs per actor: ``eval.actor_gpus``, else one where the run trained on GPUs or the evaluation asks for CUDA."""
    if spec.eval.actor_gpus is not None:
        return float(spec.eval.actor_gpus)
    return 1.0 if spec.cfg.train.use_gpu or str(spec.device).startswith("cuda") else 0.0


def _ray_batches(spec: QualitySpec, batches: list[Batch], actors: int) -> Iterable[dict[str, np.ndarray]]:
    import ray
    import ray.data

    e = spec.eval
    gpus = actor_gpus(spec)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own line says images/s and ETA
    run = spec.run if spec.run.startswith("builtin:") or "://" in spec.run else str(Path(spec.run).resolve())
    actor_spec = {"run": run, "eval_updates": e.model_dump(), "prompts": list(spec.prompt_set.prompts), "height": spec.height,
                  "width": spec.width, "device": "cuda" if gpus > 0 else "cpu", "use_ema": spec.use_ema,
                  "threads": max(1, int(e.actor_cpus))}
    ds = ray.data.from_items([_batch_record(b) for b in batches], override_num_blocks=len(batches))
    out = ds.map_batches(QualityActor, fn_constructor_kwargs={"spec": actor_spec}, batch_size=1,
                         compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=e.actor_cpus,
                         num_gpus=gpus or None, batch_format="numpy",
                         max_restarts=0)  # a failed actor fails the evaluation (nothing is written): rerun it
    for part in out.iter_batches(batch_size=None, batch_format="numpy"):
        yield {k: np.asarray(v) for k, v in part.items()}


class _Progress:
    def __init__(self, total: int, enabled: bool = True, every: float = 10.0) -> None:
        self.total, self.enabled, self.every = total, enabled, every
        self.done_n, self.started, self.last = 0, time.perf_counter(), 0.0

    def add(self, n: int) -> None:
        self.done_n += n
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every or self.done_n >= self.total):
            self.last = now
            rate = self.done_n / max(now - self.started, 1e-9)
            eta = (self.total - self.done_n) / rate if rate > 0 else float("inf")
            print(f"[evaluate] {self.done_n}/{self.total} images ({100 * self.done_n / self.total:.0f}%), {rate:.1f} images/s, "
                  f"ETA {_duration(eta)}", flush=True)

    def done(self) -> None:
        if self.enabled and self.done_n < self.total:
            print(f"[evaluate] {self.done_n}/{self.total} images", flush=True)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def per_image_table(columns: dict[str, np.ndarray], prompt_set: PromptSet) -> Any:
    import pyarrow as pa

    p = columns["prompt_idx"].astype(int)
    return pa.table({
        "model": columns["model"].astype(str), "nfe": columns["nfe"].astype(np.int32), "draw": columns["draw"].astype(np.int32),
        "prompt_idx": p.astype(np.int32), "prompt": [prompt_set.prompts[i] for i in p],
        "tags": [",".join(prompt_set.tags[i]) for i in p], "sample": columns["sample"].astype(np.int32),
        "seed": columns["seed"].astype(np.int64), "clip_score": columns["clip_score"].astype(np.float64),
        "feature_norm": np.linalg.norm(columns["features"].astype(np.float64), axis=1),
        "ms_per_image": (columns["encode_ms"] + columns["transformer_ms"] + columns["decode_ms"]).astype(np.float64),
    })


def write_grid(columns: dict[str, np.ndarray], path: Path) -> Path | None:
    """Rows: the teacher, then the student at each NFE; columns: the first prompts' first image (draw 0)."""
    from PIL import Image

    from apexdistill.eval.grid import save_grid

    keep = [i for i, b in enumerate(columns["png"]) if len(b)]
    if not keep:
        return None
    arms = sorted({(str(columns["model"][i]), int(columns["nfe"][i])) for i in keep}, key=lambda a: (a[0] != "teacher", a[1]))
    prompts = sorted({int(columns["prompt_idx"][i]) for i in keep})
    images, labels = [], []
    for name, n in arms:
        for p in prompts:
            i = next(i for i in keep if str(columns["model"][i]) == name and int(columns["nfe"][i]) == n
                     and int(columns["prompt_idx"][i]) == p)
            arr = np.asarray(Image.open(io.BytesIO(columns["png"][i])), dtype=np.float32)
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            images.append(torch.from_numpy(arr / 127.5 - 1.0))
        labels.append(f"{name} {n} NFE")
    save_grid(torch.stack(images), path, nrow=len(prompts), labels_text=labels)
    return path


# ----------------------------------------------------------------------------- the table


def format_quality_table(report: QualityReport) -> str:
    clip = any(r.clip_score is not None for r in report.rows)
    real = any(r.fd_real is not None for r in report.rows)
    head = ["model", "NFE", "FD to teacher"] + (["FD to real"] if real else []) + (["CLIP"] if clip else []) + \
        ["diversity (x teacher)", "ms/image", "transformer ms", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pm(v: float | None, sd: float | None) -> str:
        return "-" if v is None else f"{v:.3g}" + (f" +- {sd:.2g}" if sd is not None else "")

    for r in report.rows:
        who = "teacher (floor)" if r.model == "teacher" else r.model
        div = f"{r.diversity:.3g}" if r.diversity_ratio is None else f"{r.diversity:.3g} ({r.diversity_ratio:.2f}x)" + \
            (" COLLAPSE?" if r.collapsed else "")
        cells = [who, str(r.nfe), pm(r.fd_teacher, r.fd_teacher_std)] + ([pm(r.fd_real, r.fd_real_std)] if real else []) + \
            ([pm(r.clip_score, r.clip_score_std)] if clip else []) + \
            [div, f"{r.ms_per_image:.1f}", f"{r.ms_transformer:.1f}", "-" if r.speedup is None else f"{r.speedup:.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{report.prompts} prompts ({report.prompt_set}, hash {report.prompt_hash}) x {report.images_per_prompt} images "
             f"= {report.images_per_row} images a row per draw; means over {report.rows[0].draws} noise draw(s) (+- their std)",
             f"FD in the {report.features} space ({report.feature_dim} features): the teacher's row is its own draws against its "
             "reference draw (the noise floor); FD is biased upward at small N, so compare rows at this N only"
             + (f" (N = {report.images_per_row} is not above the {report.feature_dim} features: the covariances are singular)"
                if report.images_per_row <= report.feature_dim else ""),
             f"ms/image end to end (text encoder + transformer + VAE decode) at batch size {report.batch_size}, median over batches"]
    if any(r.collapsed for r in report.rows):
        notes.append(f"COLLAPSE?: diversity below {COLLAPSE_RATIO}x the teacher's: a likely mode collapse")
    if report.clip_truncated:
        notes.append(f"{report.clip_truncated} prompt(s) are longer than the CLIP text encoder's window and were cut")
    tags = sorted({t for r in report.rows for t in r.clip_by_tag})
    out = "\n".join(lines + [""] + [f"({n})" for n in notes])
    if tags:
        t_head = ["CLIP score by tag"] + [f"{r.model} {r.nfe}" for r in report.rows]
        t_lines = ["| " + " | ".join(t_head) + " |", "|" + "---|" * len(t_head)]
        t_lines += ["| " + " | ".join([t] + [f"{r.clip_by_tag.get(t, float('nan')):.2f}" for r in report.rows]) + " |" for t in tags]
        out += "\n\n" + "\n".join(t_lines)
    return out


"""Typed experiment config: one YAML plus dotted ``key=value`` overrides, validated once.

Every section is a pydantic model with ``extra="forbid"``, so a typo is an error that names the key
and suggests the closest valid one. ``load_config`` is the single entry point; ``flatten`` turns a
resolved config into dotted keys (for MLflow params), ``dump_yaml`` writes it next to every run.
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A user-facing config problem; the message names the field and what was expected."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- sections


class RunConfig(_Section):
    name: str = "apex-digits"
    workdir: str = Field("./apex-runs", description="run folders, checkpoints, caches, MLflow store; on a multi-node cluster "
                         "a path every node mounts (NFS, Lustre, ...)")
    seed: int = 0
    shared_storage: bool = Field(False, description="declare run.workdir and a local data.cache_uri shared by every node "
                                 "(for a network filesystem apexdistill does not recognise in /proc/mounts)")
    storage_uri: str | None = Field(None, description="object storage for the run folder and its checkpoints (s3://bucket/prefix, "
                                    "gs://..., hdfs://..., or any fsspec URI): <uri>/runs/<name>/ and Ray Train's storage_path "
                                    "<uri>/ray_results; credentials from the provider's environment (AWS_ACCESS_KEY_ID, "
                                    "AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL; GOOGLE_APPLICATION_CREDENTIALS), "
                                    "never from the config. Default: checkpoints under run.workdir")
    storage_endpoint: str | None = Field(None, description="run.storage_uri on an S3-compatible store (MinIO, Ceph, ...): its "
                                         "endpoint, http(s)://host:port (default AWS_ENDPOINT_URL, else AWS)")

    @model_validator(mode="after")
    def _storage(self) -> "RunConfig":
        if self.storage_uri is not None and "://" not in self.storage_uri:
            raise ValueError(f"run.storage_uri='{self.storage_uri}' must be a URI such as s3://bucket/prefix or gs://bucket/prefix; "
                             "for a local or shared folder use run.workdir")
        if self.storage_endpoint is not None:
            if not (self.storage_uri or "").startswith("s3://"):
                raise ValueError("run.storage_endpoint is the endpoint of an S3-compatible store: it needs run.storage_uri=s3://...")
            if not self.storage_endpoint.startswith(("http://", "https://")):
                raise ValueError(f"run.storage_endpoint='{self.storage_endpoint}' must start with http:// or https://")
        return self


class DataConfig(_Section):
    source: Literal["digits", "imagefolder", "parquet", "teacher"] = Field(
        "digits", description="digits (built-in), imagefolder (images + metadata.jsonl/.csv), parquet (image bytes + captions), "
        "teacher (no images: the teacher in model.path samples data.samples_per_prompt images of each of data.prompts, "
        "`apexdistill synthesize`)"
    )
    path: str | None = Field(None, description="local folder/file or fsspec URI of an imagefolder or parquet source")
    resolution: int = Field(16, ge=8, le=1024, description="square side length in pixels (without data.buckets); with "
                            "data.buckets='sana' the side of the square bin the others are scaled from")
    buckets: list[tuple[int, int]] | Literal["sana"] | None = Field(
        None, description="aspect-ratio buckets: a list of [height, width] in pixels, or 'sana' (Sana's / PixArt's bins, "
        "scaled to data.resolution); each image is resized and centre-cropped to its nearest-aspect bucket and every "
        "training batch comes from one bucket; sides must be multiples of the VAE factor x patch size. Default: none "
        "(every image a data.resolution square)")
    channels: Literal[1, 3] | None = Field(None, description="1 = grayscale, 3 = RGB; default 1 for digits, 3 otherwise")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_seed: int = 0
    image_column: str = Field("image", description="parquet source: column with encoded image bytes (or {bytes, path} structs)")
    caption_column: str = Field("text", description="imagefolder metadata / parquet source: caption column")
    label_column: str | None = Field("label", description="optional integer label column; rows without one get -1")
    limit: int | None = Field(None, ge=1, description="use only the first N source rows (smoke runs, benchmarks)")
    cache_uri: str | None = Field(None, description="where preprocessed caches live (local or fsspec); default <run.workdir>/cache")
    max_reject_fraction: float = Field(0.01, ge=0.0, le=1.0, description="fail (and publish nothing) above this share of rejected rows")
    batch_size: int = Field(64, ge=1, description="rows per Ray Data batch in the preprocessing stages")
    decode_cpus: float = Field(1.0, gt=0, description="CPUs per decode/resize task")
    text_actors: int = Field(1, ge=1, description="text-encoder actors in the preprocessing pool")
    text_actor_cpus: float = Field(0.5, gt=0, description="CPUs per text-encoder actor (fractional, so read tasks are never starved)")
    text_actor_gpus: float = Field(0.0, ge=0)
    vae_actors: int = Field(1, ge=1, description="VAE-encoder actors (only when vae.path is set)")
    vae_actor_cpus: float = Field(0.5, gt=0)
    vae_actor_gpus: float = Field(0.0, ge=0)
    in_memory_max_mb: float = Field(1024, ge=0, description="training shards up to this size are read once into RAM; larger ones stream")
    prompts: str | None = Field(None, description="data.source=teacher: the prompts to synthesize from: a text file (one a "
                                "line), a JSONL (prompt, tags) or Parquet file (#column), local or fsspec, or a built-in set "
                                "(builtin:digits, the ten digit captions; builtin:compositional); default builtin:digits "
                                "without a pipeline, builtin:compositional with one")
    samples_per_prompt: int = Field(1, ge=1, description="data.source=teacher: images the teacher samples per prompt, each "
                                    "from its own seeded noise")
    seed: int = Field(0, description="data.source=teacher: the noise seed; image (prompt p, sample k) starts from its own "
                      "seed of (seed, p, k), whatever the batching or the actors")
    actors: int = Field(1, ge=1, description="data.source=teacher: teacher actors in the Ray Data pool (a GPU each with "
                        "data.actor_gpus=1 on a cluster)")
    actor_cpus: float = Field(0.5, gt=0, description="data.source=teacher: CPUs per teacher actor")
    actor_gpus: float = Field(0.0, ge=0, description="data.source=teacher: GPUs per teacher actor")
    shard_rows: int = Field(256, ge=1, description="data.source=teacher: rows per shard, the unit a synthesis writes, resumes "
                            "by and hands to one actor (a Parquet file each)")
    actor_max_restarts: int = Field(0, ge=-1, description="restarts of a failed encoder actor (-1 = unlimited, for preemptible "
                                    "nodes); 0 fails the build, which publishes nothing, so a rerun starts clean (Ray prints an "
                                    "error-level line about restartable actors otherwise)")

    @model_validator(mode="after")
    def _source_path(self) -> "DataConfig":
        if self.source in ("imagefolder", "parquet") and not self.path:
            raise ValueError(f"data.path is required when data.source='{self.source}' (a local folder or an fsspec URI)")
        if self.source in ("digits", "teacher") and self.path:
            raise ValueError(f"data.path is only used by data.source='imagefolder' or 'parquet'; data.source='{self.source}' needs none"
                             + (" (its prompts are data.prompts)" if self.source == "teacher" else ""))
        if self.buckets is not None and self.source in ("digits", "teacher"):
            what = "the built-in digits are" if self.source == "digits" else "the teacher's samples are at data.resolution,"
            raise ValueError(f"data.buckets is for data.source='imagefolder' or 'parquet': {what} all square")
        if self.source == "teacher" and self.limit is not None:
            raise ValueError("data.limit takes the first N rows of an image source; data.source='teacher' samples "
                             "data.samples_per_prompt images of each of data.prompts: shorten the prompt file instead")
        if self.prompts is not None and self.source != "teacher":
            raise ValueError(f"data.prompts is what data.source='teacher' synthesizes from; data.source is '{self.source}' "
                             "(evaluation prompts are eval.prompts)")
        if isinstance(self.buckets, list):
            if not self.buckets:
                raise ValueError("data.buckets is an empty list: give [height, width] pairs, 'sana', or leave it unset")
            for i, (h, w) in enumerate(self.buckets):
                if h < 1 or w < 1:
                    raise ValueError(f"data.buckets[{i}] = [{h}, {w}]: height and width must be positive")
                if (h, w) in self.buckets[:i]:
                    raise ValueError(f"data.buckets[{i}] = [{h}, {w}] is listed twice")
        return self

    @property
    def image_channels(self) -> int:
        return int(self.channels or (1 if self.source == "digits" else 3))


class TextEncoderConfig(_Section):
    kind: Literal["minilm", "transformers", "pipeline"] | None = Field(
        None, description="minilm (built in), transformers (a local encoder folder), pipeline (a stock diffusers pipeline's own "
        "text encoder and tokenizer, prompts encoded by its encode_prompt); default: pipeline when model.path is a pipeline "
        "folder, else minilm")
    path: str | None = Field(None, description="local folder of a transformers encoder, or a pipeline folder (kind=pipeline; "
                             "default model.path)")
    max_length: int | None = Field(None, ge=1, le=4096, description="tokens per prompt (the pipeline's max_sequence_length); "
                                   "default 16 for MiniLM/transformers, the pipeline's own default for kind=pipeline")
    negative_prompt: str | None = Field(None, description="kind=pipeline: the negative prompt cached for CFG (default: the "
                                        "pipeline's; ' ' for Qwen-Image)")
    complex_human_instruction: list[str] | None = Field(
        None, description="Sana: lines prepended to every prompt (default: what SanaPipeline.__call__ uses; [] for none)")

    @model_validator(mode="after")
    def _path_needed(self) -> "TextEncoderConfig":
        if self.kind == "transformers" and not self.path:
            raise ValueError("text_encoder.path is required when text_encoder.kind='transformers' (a local folder)")
        return self


class TeacherConfig(_Section):
    nfe: int | None = Field(None, ge=1, description="steps of the multi-step teacher with its own scheduler, where it "
                            "writes data (data.source=teacher); default eval.teacher_nfe")
    guidance_scale: float | None = Field(None, ge=0.0, description="CFG scale of the multi-step teacher, in the pipeline's own "
                                         "convention; default the pipeline's (Sana 4.5, Qwen-Image 4.0), 1 (off) without a "
                                         "pipeline; Z-Image must state it (Turbo 0.0, the base model 5.0)")


class LoraConfig(_Section):
    enabled: bool = False
    rank: int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="module-name suffixes that get LoRA adapters (attention and MLP projections)",
    )


class ModelConfig(_Section):
    backbone: Literal["sana", "qwenimage", "zimage"] = Field(
        "sana", description="model family; with a stock pipeline folder in model.path it is read from model_index.json")
    preset: str = Field(
        "tiny", description="without model.path: tiny or small (sized for the data), or a published architecture with random "
        "weights (sana-0.6b, sana-1.6b, qwenimage-20b, zimage-6b; `apexdistill plan` sizes its memory)")
    path: str | None = Field(
        None, description="a stock diffusers pipeline folder (model_index.json: family, transformer, VAE, text encoder and "
        "tokenizer all come from it), a transformer folder, or 'builtin:teacher' (the shipped digits teacher)"
    )
    target_time: bool = Field(False, description="add a target-time embedding (needed by twinflow)")
    lora: LoraConfig = Field(default_factory=LoraConfig)



class VaeConfig(_Section):
    path: str | None = Field(None, description="a VAE folder or a pipeline folder (AutoencoderKL, AutoencoderDC, "
                             "AutoencoderKLQwenImage); default: the pipeline's own when model.path is a pipeline, else pixel space")


class ShiftConfig(_Section):
    """Condition shift c_fake = a*c + b (APEX Eq. 9), applied to the text states."""

    a: float = -1.0
    b: float = 0.0
    learnable: bool = False
    lr_mult: float = Field(1.0, gt=0)


class TimeConfig(_Section):
    dist: Literal["uniform", "logit_normal", "beta"] = "uniform"
    min: float = Field(0.0, ge=0.0, le=1.0)
    max: float = Field(1.0, ge=0.0, le=1.0)
    mean: float = 0.0  # logit-normal location
    std: float = Field(1.0, gt=0)  # logit-normal scale
    alpha: float = Field(1.0, gt=0)  # beta
    beta: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _range(self) -> "TimeConfig":
        if self.min >= self.max:
            raise ValueError(f"time.min ({self.min}) must be below time.max ({self.max})")
        return self


class ApexConfig(_Section):
    """The generator-side self-adversarial form measured to work (APEX_METHOD.md, `apex`)."""

    generator_t: float = Field(0.999, gt=0.0, le=1.0, description="time of the one-step generator query")
    renoise_min: float = Field(0.02, ge=0.0, lt=1.0)
    renoise_max: float = Field(0.98, gt=0.0, le=1.0)
    correction_clamp: float = Field(1.0, gt=0)
    guidance_ratio: float | None = Field(
        None, ge=0.0, description="r (the released code's enhanced_ratio; CFG scale 1 + r): the real anchor's target becomes "
        "(z - x) + r*(v_cond - v_uncond), both from the frozen base (LoRA) or the EMA, without gradient, and every sub-step "
        "of the consistency target takes the teacher's guided velocity (the family's CFG rule at r on its conditional and "
        "negative-prompt calls); default: the teacher's guidance as r (pipelines), 0 without a pipeline")
    guidance_reference: Literal["auto", "frozen", "ema"] = Field(
        "auto", description="weights the guidance velocities come from: frozen (the initial weights, i.e. the teacher: the "
        "base with adapters disabled under LoRA, a kept copy of the trained parameters otherwise), ema (the EMA of the "
        "trained weights), auto = the released code's choice: frozen under LoRA, ema without")
    # The defaults are the measured recipe (README, "The apex recipe"; `apexdistill demo` runs it): the RCGM consistency
    # target from the frozen teacher (4 midpoint sub-steps placed by shift 0.67, kept in a bank of 2048 rows), half the
    # rows driving the generator and half the real anchor, the same target at t=0.6 on half the generator rows re-noised
    # from their data; with it the generator term is on at full weight from the first step. Without the consistency
    # target (consistency_weight=0, the plain form) lambda_g=1 and no warm-up destabilise the shared network: use
    # lambda_g 0.2 with a 100-step warm-up and a 200-step ramp there.
    lambda_g: float = Field(1.0, ge=0, description="weight of the generator term L_gen")
    lambda_p: float = Field(1.0, ge=0, description="weight of the fake-branch flow matching L_fake")
    lambda_r: float = Field(1.0, ge=0, description="weight of the real-data flow-matching anchor L_real")
    generator_warmup_steps: int = Field(0, ge=0, description="steps with lambda_g = 0 so the fake branch first learns the one-step samples")
    generator_ramp_steps: int = Field(0, ge=0, description="then lambda_g ramps linearly to its value over this many steps")
    anchor_t_max: float = Field(
        0.9, gt=0.0, le=1.0, description="the real anchor samples t up to this value, leaving t ~ 1 to the one-step generator"
    )
    generator_fraction: float = Field(
        0.5, gt=0.0, le=1.0, description="share of each batch's rows that drive the generator and the fake branch; the other "
        "rows are the real anchor (the released code's grouping: each row costs one gradient pass). 1.0 = every row does all "
        "three (three gradient passes per row)")
    consistency_weight: float = Field(
        1.0, ge=0, description="lambda_c of the released code's RCGM consistency target on the one-step group: F(z, t0, c) is "
        "pulled to F - clamp(R), R the residual of t0*F = delta*(z - x) + D, D the reference model's consistency_steps "
        "sub-steps (consistency_solver) from t0 - delta to 0 (delta = 0.01); 0 = off")
    consistency_steps: int = Field(4, ge=1, le=64, description="sub-steps of the consistency target's reference (the "
                                   "released code's estimate_order)")
    consistency_solver: Literal["euler", "midpoint"] = Field(
        "midpoint", description="ODE solver of those sub-steps: euler (the released code's; one reference call a sub-step) or "
        "midpoint (explicit midpoint, two calls a sub-step, second order: 2 midpoint sub-steps reach a better target than 8 "
        "Euler ones at half the calls on the shipped teacher)")
    consistency_time_shift: float = Field(
        0.67, gt=0.0, le=10.0, description="where those sub-steps' boundaries fall between t0 and 0: 1 = evenly in time (the "
        "released code's); else warped as diffusers' flow-matching schedulers' `shift` warps sigmas, on the interval: with "
        "u = 1 - i/K the i-th boundary is t*s*u/(1 + (s - 1)*u). s < 1 gives shorter sub-steps near the data (2 midpoint "
        "sub-steps from 0.989 at s = 2/3: 0.989 -> 0.395 -> 0, a better target than the even split on the shipped teacher)")
    consistency_renoise_t: float = Field(
        0.6, ge=0.0, lt=1.0, description="also pull F(x_t, t, c) at this time, on the one-step samples re-noised to it "
        "(x_t = (1-t)*x_src + t*z', x_src per consistency_renoise_source), to the same consistency target from t "
        "to 0, weighted by consistency_weight: the query the released 2-NFE sampler makes at t = 0.6. Costs a no-gradient "
        "generator pass (source student), the reference's sub-steps on those rows (batched with the one-step target's) and "
        "their rows in the generator's gradient pass; 0 = off")
    consistency_renoise_fraction: float = Field(
        0.5, gt=0.0, le=1.0, description="share of the one-step group's rows that also get the re-noised target (the first "
        "rows of the group; at least one): the extra reference and gradient work scales with it")
    consistency_renoise_source: Literal["student", "data"] = Field(
        "data", description="what is re-noised to consistency_renoise_t: student (the current weights' one-step samples, "
        "one no-gradient pass over those rows) or data (the rows' own training samples, no extra pass)")
    consistency_decay_steps: int = Field(
        0, ge=0, description="the consistency weight falls linearly to 0 over this many steps, leaving the one-step student to "
        "the self-adversarial correction once the teacher's few-step target has been reached (0 = constant)")
    consistency_reference: Literal["frozen", "ema"] = Field(
        "frozen", description="weights the consistency target's sub-steps come from: frozen (the initial weights, i.e. the "
        "teacher; the base with adapters disabled under LoRA) or ema (the EMA of the trained weights)")
    consistency_bank_size: int = Field(
        2048, ge=0, description="reuse the frozen teacher's consistency targets: the first steps' one-step rows (noise, prompt, "
        "target; the re-noised rows too) fill a bank of this many rows per worker, then every step draws its generator rows "
        "from it and makes no reference call (the regression baseline's pair bank, for the consistency target). The bank lives "
        "in host memory, each distinct prompt's text states once. Needs "
        "consistency_reference=frozen and, with re-noised rows, consistency_renoise_source=data. 0 = fresh targets every step")
    robust_eps: float = Field(
        0.0, ge=0.0, description="the released code's robust loss: every term becomes sqrt(d^2 + eps^2) - eps per sample, "
        "d^2 the sample's mean squared error (Charbonnier; its gradient is the squared error's over 2*sqrt(d^2 + eps^2), "
        "so each sample's pull is normalised by its own error); 0 = plain squared error. The released code: 1e-3")
    time_weighting: Literal["none", "tan"] = Field(
        "none", description="the released code's time weighting on the teacher-side terms (the anchor and the consistency "
        "targets): tan((1 - (t - r)) * pi / 2.5) + 1 per row, t its time and r its target time (r = t for the anchor's "
        "instantaneous flow: 4.08; r = 0 for a consistency jump: 1.00 from t = 0.999, 1.55 from t = 0.6); none = 1")

    @property
    def uses_frozen_reference(self) -> bool:
        """Whether a target comes from the teacher's own weights (guidance or the consistency target): a full fine-tune
        then keeps a copy of the trained parameters as they start (LoRA uses the base with adapters disabled)."""
        guidance = (self.guidance_ratio or 0) > 0 and self.guidance_reference == "frozen"
        return guidance or (self.consistency_weight > 0 and self.consistency_reference == "frozen")

    @model_validator(mode="after")
    def _range(self) -> "ApexConfig":
        if self.renoise_min >= self.renoise_max:
            raise ValueError("renoise_min must be below renoise_max")
        if self.consistency_bank_size:  # banked targets must not depend on the weights that were live when they were made
            if self.consistency_reference != "frozen":
                raise ValueError(f"consistency_bank_size={self.consistency_bank_size} reuses the consistency targets, which needs "
                                 f"consistency_reference=frozen (the {self.consistency_reference} weights move every step), or "
                                 "consistency_bank_size=0 (fresh targets every step)")
            if self.consistency_renoise_t > 0 and self.consistency_renoise_source == "student":
                raise ValueError(f"consistency_bank_size={self.consistency_bank_size} reuses the re-noised rows too, which needs "
                                 "consistency_renoise_source=data (source student re-noises the current weights' samples), or "
                                 "consistency_bank_size=0 (fresh targets every step)")
        return self


class ApexLiteralConfig(_Section):
    """Eq. 9-25 exactly as the paper writes them."""

    lam: float = Field(0.5, ge=0.0, le=1.0, description="mix between data and fake velocity (Eq. 22)")
    lambda_p: float = Field(1.0, ge=0, description="weight of L_fake (Eq. 25)")
    lambda_e: float = Field(1.0, ge=0, description="weight of L_mix (Eq. 25)")
    fake_detach: bool = Field(False, description="detach x_fake (official code) or not (paper)")
    fresh_noise: bool = Field(False, description="fresh z and t for L_fake instead of the shared ones")
    weight: Literal["paper", "clamped", "uniform"] = "clamped"
    weight_clamp: float = Field(10.0, gt=0, description="upper bound on t^3/(1-t) for weight='clamped'")
    warmup_steps: int = Field(0, ge=0, description="steps of plain flow matching before the adversarial terms")
    ramp_steps: int = Field(0, ge=0, description="steps over which lam and lambda_p ramp up after warm-up")
    mix_on: Literal["real", "generated"] = Field(
        "real", description="where L_mix (Eq. 22-23) is evaluated: real (as written: at x_t, the noised real sample, so no "
        "gradient reaches a generated sample) or generated (a reading that does: at the noised generated sample "
        "t*z + (1-t)*x_fake of Eq. 12, x_fake = Eq. 11's one-step endpoint of x_t with its gradient, in the endpoint form of "
        "Eq. 23 with T_mix = (1-lam)*x + lam*f_x(v_fake) and v_fake of Eq. 14 queried at that point)")


class TwinflowConfig(_Section):
    """The released-code variant (TwinFlow objective with negated condition)."""

    consistency_steps: int = Field(2, ge=1, description="sub-steps of the RCGM consistency target")
    target_guidance: float = Field(0.0, ge=0.0, description="training-time CFG on the target (0 = off)")
    rectify_weight: float = Field(0.5, ge=0.0)
    rectify_clamp: float = Field(1.0, gt=0)
    robust_eps: float = Field(1e-3, gt=0, description="Charbonnier epsilon of the robust loss")


class RegressionConfig(_Section):
    teacher_nfe: int = Field(16, ge=1, description="Euler steps of the teacher ODE endpoint")
    bank_size: int = Field(2048, ge=1, description="noise/endpoint pairs generated once and reused")
    pairs: Literal["auto", "teacher_ode"] = Field(
        "auto", description="auto: a cache that stores each row's initial noise z (data.source=teacher) trains on its stored "
        "(z, x0) pairs, DiffSynth's Direct Distill (no teacher call in training); otherwise, and always with teacher_ode, the "
        "pairs are solved with teacher_nfe Euler steps into the bank")


class ObjectiveConfig(_Section):
    name: Literal["apex", "apex_literal", "twinflow", "fm", "regression"] = "apex"
    shift: ShiftConfig = Field(default_factory=ShiftConfig)
    time: TimeConfig = Field(default_factory=TimeConfig)
    apex: ApexConfig = Field(default_factory=ApexConfig)
    apex_literal: ApexLiteralConfig = Field(default_factory=ApexLiteralConfig)
    twinflow: TwinflowConfig = Field(default_factory=TwinflowConfig)
    regression: RegressionConfig = Field(default_factory=RegressionConfig)


class DeepSpeedConfig(_Section):
    stage: Literal[1, 2, 3] = Field(2, description="ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters")
    offload_optimizer: bool = Field(False, description="keep optimizer states in CPU memory (ZeRO-Offload)")


class TrainConfig(_Section):
    steps: int = Field(1000, ge=1)
    max_minutes: float | None = Field(None, gt=0, description="stop early after this much training time")
    batch_size: int = Field(128, ge=1, description="per-rank batch size")
    lr: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0, description="0 disables EMA")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step (global batch = batch_size x grad_accum_steps x workers)")
    num_workers: int = Field(0, ge=0, description="Ray Train workers; 0 = local mode in the driver process")
    cpus_per_worker: float = Field(1.0, gt=0, description="fractional on small machines, so Ray Data read tasks are never starved")
    use_gpu: bool = Field(False, description="one GPU per worker")
    strategy: Literal["none", "ddp", "fsdp2", "deepspeed"] = Field(
        "none", description="none (one process), ddp, fsdp2 (fully_shard per block + root), deepspeed (ZeRO, see train.deepspeed)"
    )
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU")
    gradient_checkpointing: bool = Field(
        False, description="activation checkpointing of every transformer block (diffusers' enable_gradient_checkpointing): "
        "a block keeps only its inputs and recomputes the rest in backward; same gradients, about a third more compute")
    gpu_memory_gb: float = Field(80.0, gt=0, description="memory of one GPU (GiB): with train.use_gpu, `train` refuses a run "
                                 "whose memory plan (`apexdistill plan`) does not fit")
    host_memory_gb: float = Field(
        64.0, gt=0, description="host memory (GiB) one worker may hold for the consistency bank (objective.apex."
        "consistency_bank_size; its share of the node's RAM: 64 of an 8-GPU node's 512): `train` refuses a bank that does not "
        "fit, naming the largest that would, and `apexdistill plan` shows it")
    log_every: int = Field(25, ge=1)
    checkpoint_every: int = Field(500, ge=0, description="publish a checkpoint every N steps (0 = only at the end)")
    num_to_keep: int = Field(2, ge=1, description="checkpoints kept (the newest ones)")
    max_failures: int = Field(0, ge=0, description="worker-group restarts from the last checkpoint before the run fails")
    fail_at_step: int | None = Field(None, ge=1, description="drill: one worker raises once after this step (needs max_failures >= 1)")

    @property
    def use_bf16(self) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and self.use_gpu)


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str | None = Field(None, description="MLflow tracking URI; default MLFLOW_TRACKING_URI, else sqlite:///<run.workdir>/mlflow.db")
    experiment: str = Field("apexdistill", description="MLflow experiment (one per study)")
    sample_every: int = Field(0, ge=0, description="log a sample grid (fixed prompts and seeds) every N steps; 0 = at the end only")
    sample_nfe: int = Field(1, ge=1, description="NFE of the logged sample grids")


class EvalConfig(_Section):
    nfe: list[int] = Field(default_factory=lambda: [1, 2, 4])
    teacher_nfe: int = Field(50, ge=1)
    samples_per_class: int = Field(100, ge=1)
    use_ema: bool = True
    seed: int = 1234
    batch_size: int = Field(500, ge=1)
    feature_extractor: str | None = Field(None, description="local TorchScript feature network; default: the digit classifier")
    at_end: bool = Field(True, description="after training, score the final weights and log them to MLflow: the digits' "
                         "accuracy and FD proxy, or (a teacher in model.path) the FD to the teacher, CLIP score, diversity and "
                         "speed over eval.prompts")
    every: int = Field(0, ge=0, description="score 1-NFE quality every N training steps and report it (sweeps: ASHA stops "
                                            "poor trials on it): the digits' FD proxy, or the FD to the teacher in the "
                                            "latent space on the fixed prompts; 0 = off")
    during_samples_per_class: int = Field(20, ge=1, description="images per prompt for the in-training scores (2 or more "
                                          "for the in-training diversity)")
    noise_draws: int = Field(1, ge=1, le=64, description="score each row on this many independent noise draws of "
                             "samples_per_class images per prompt and report the means (and the FD's spread across the draws): "
                             "at 100 per prompt one draw's FD proxy moves by 0.25-0.35 (std) with the noise alone, about 10% of the "
                             "teacher's score. Costs one generation per draw; the in-training scores use one")
    teacher_noise_draws: int | None = Field(None, ge=1, le=64, description="noise draws of the teacher's multi-step reference "
                                            "row (teacher_nfe Euler steps: teacher_nfe times a 1-NFE row's cost); its first "
                                            "draws are the other rows' first draws. Default: noise_draws")

    # ---- pipeline runs (eval/quality.py): FD to the teacher, CLIP score, diversity, end-to-end speed
    prompts: str | None = Field(None, description="pipeline runs: the prompt set: a text file (one prompt a line), a JSONL "
                                "file (prompt, optional tags), a Parquet file or folder (path#column; default column prompt, "
                                "caption or text), any fsspec URI, or a built-in set (builtin:compositional: about 200 "
                                "GenEval-style prompts in six tagged categories); default: the run's own captions")
    prompt_limit: int | None = Field(64, ge=1, description="pipeline runs: score the first N prompts of the set (null: all)")
    images_per_prompt: int = Field(4, ge=2, description="pipeline runs: images of each prompt per noise draw (the diversity "
                                   "is their mean pairwise feature distance)")
    features: Literal["latent", "clip", "dinov2"] = Field(
        "latent", description="feature space of the FD to the teacher, the FD to eval.reference and the diversity: latent (the "
        "pipeline's own VAE latents, pooled: no weights needed), clip or dinov2 (a local transformers folder in "
        "eval.feature_model)")
    feature_model: str | None = Field(None, description="local CLIPModel or Dinov2Model folder (with its processor) for "
                                      "eval.features=clip / dinov2")
    clip_model: str | None = Field(None, description="local CLIPModel folder (with tokenizer and processor) for the CLIP "
                                   "score; default: none (no CLIP score)")
    reference: str | None = Field(None, description="real images to also report the FD to: an image folder (resized and "
                                  "centre-cropped to data.resolution)")
    actors: int = Field(1, ge=0, description="pipeline runs: Ray Data actors that generate and featurize (a GPU each with "
                        "eval.actor_gpus); 0 = in this process, no Ray")
    actor_cpus: float = Field(0.5, gt=0, description="CPUs per evaluation actor (fractional on small machines)")
    actor_gpus: float | None = Field(None, ge=0, description="GPUs per evaluation actor; default 1 when the run trains "
                                     "on GPUs (train.use_gpu) or evaluate runs with --device cuda, else 0")
    pipeline_batch_size: int = Field(8, ge=1, description="pipeline runs: images generated at once (the batch size the "
                                     "speed is stated at)")

    @model_validator(mode="after")
    def _features(self) -> "EvalConfig":
        if self.features != "latent" and not self.feature_model:
            raise ValueError(f"eval.features='{self.features}' needs eval.feature_model (a local {self.features} model folder; "
                             "nothing is downloaded), or use eval.features=latent, which needs no weights")
        return self

    @property
    def reference_draws(self) -> int:
        """Noise draws of the teacher's multi-step reference row."""
        return self.teacher_noise_draws or self.noise_draws

    @model_validator(mode="after")
    def _nfe(self) -> "EvalConfig":
        bad = [n for n in self.nfe if n < 1]
        if bad or not self.nfe:
            raise ValueError(f"eval.nfe must be a non-empty list of positive integers, got {self.nfe}")
        twice = sorted({n for n in self.nfe if self.nfe.count(n) > 1})
        if twice:
            raise ValueError(f"eval.nfe lists {', '.join(map(str, twice))} more than once, got {self.nfe}")
        return self


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    vae: VaeConfig = Field(default_factory=VaeConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _combinations(self) -> "Config":
        _check_parallel_setup(self)
        if (self.objective.name == "apex" and (self.objective.apex.guidance_ratio or 0) > 0 and not self.model.lora.enabled
                and self.train.ema_decay == 0 and self.objective.apex.guidance_reference != "frozen"):
            raise ValueError("objective.apex.guidance_ratio > 0 takes its guidance from the frozen base (model.lora.enabled=true "
                             "or objective.apex.guidance_reference=frozen) or the EMA (train.ema_decay > 0): choose one, "
                             "or set objective.apex.guidance_ratio=0")
        if self.objective.name == "apex" and self.objective.apex.generator_fraction < 1 and self.train.batch_size < 2:
            raise ValueError(f"objective.apex.generator_fraction={self.objective.apex.generator_fraction:g} splits each per-rank "
                             f"batch into a generator and a real-anchor group: train.batch_size must be at least 2, got "
                             f"{self.train.batch_size} (or set objective.apex.generator_fraction=1: every row does both, "
                             "three gradient passes a row)")
        if self.data.source == "teacher" and not self.model.path:
            raise ValueError("data.source='teacher' samples its training set from the teacher: set model.path to a stock "
                             "pipeline folder (or 'builtin:teacher', the shipped digits teacher)")
        if self.objective.name == "twinflow":
            if self.objective.shift.learnable:
                raise ValueError("objective.name='twinflow' uses a fixed condition shift: set objective.shift.learnable=false")
            if self.train.batch_size < 4 or self.train.batch_size % 4:
                raise ValueError(
                    f"objective.name='twinflow' splits each per-rank batch into 4 equal groups: "
                    f"train.batch_size must be a multiple of 4 and at least 4, got {self.train.batch_size}"
                )
            if not self.model.target_time:
                raise ValueError("objective.name='twinflow' needs a backbone that accepts a target time: set model.target_time=true")
        return self


def _check_parallel_setup(cfg: "Config") -> None:
    t = cfg.train
    if t.strategy != "none" and t.num_workers == 0:
        raise ValueError(f"train.strategy='{t.strategy}' runs on Ray Train workers: set train.num_workers >= 1 "
                         f"(train.num_workers=0 is local mode, one process without a process group)")
    if t.strategy == "none" and t.num_workers > 1:
        raise ValueError(f"train.num_workers={t.num_workers} needs a parallel strategy: set train.strategy to ddp, fsdp2 or deepspeed")
    if t.precision == "bf16" and not t.use_gpu:
        raise ValueError("train.precision='bf16' is for GPU workers: set train.use_gpu=true, or train.precision=auto/fp32 on CPU")
    if t.strategy == "deepspeed" and t.deepspeed.stage == 3:
        if t.ema_decay > 0:
            raise ValueError("train.strategy='deepspeed' with train.deepspeed.stage=3 partitions the parameters, which the EMA "
                             "cannot follow: set train.ema_decay=0, or use stage 1/2 or train.strategy=fsdp2")
        if cfg.objective.shift.learnable:
            raise ValueError("objective.shift.learnable=true is not supported with DeepSpeed ZeRO-3: use stage 1/2, fsdp2 or ddp")
    if t.fail_at_step is not None:
        if t.max_failures < 1 or t.num_workers == 0:
            raise ValueError("train.fail_at_step injects a worker failure to be survived: it needs train.max_failures >= 1 "
                             "and train.num_workers >= 1")
        if t.fail_at_step >= t.steps:
            raise ValueError(f"train.fail_at_step={t.fail_at_step} must be below train.steps={t.steps}")


def with_absolute_paths(cfg: "Config") -> "Config":
    """The same config with every relative local path made absolute against this process's directory.
    For configs handed to other processes that run elsewhere: Ray Tune starts each trial in its own
    trial folder, where ``./apex-runs`` would be a new, empty work directory."""
    updates = []
    for key in ("run.workdir", "data.cache_uri", "data.path", "text_encoder.path", "model.path", "vae.path"):
        section, field = key.split(".")
        value = getattr(getattr(cfg, section), field)
        if not value or "://" in value or value.startswith("builtin:") or Path(value).expanduser().is_absolute():
            continue
        updates.append(f"{key}={Path(value).expanduser().resolve()}")
    return build_config(cfg.model_dump(mode="json"), updates) if updates else cfg


# ----------------------------------------------------------------------------- loading


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=3`` -> ("a.b", 3); the value is parsed as YAML (numbers, bools, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (for example train.steps=200)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, dotted + "."))
    return keys


def _format_errors(err: ValidationError, source: str) -> str:
    known = _known_keys(Config)
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, known, n=1, cutoff=0.6)
            if not close:  # compare the last part only: 'objective.shift.aa' -> 'a'
                parent = loc.rsplit(".", 1)[0] + "." if "." in loc else ""
                siblings = [k for k in known if k.startswith(parent) and k.count(".") == loc.count(".")]
                close = difflib.get_close_matches(loc, siblings, n=1, cutoff=0.3)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"  - unknown key '{loc}'{hint}")
        else:
            where = f"'{loc}'" if loc else "config"
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  - {where}: {e['msg']}{got_s}")
    return "\n".join(lines)


def _is_string_field(dotted: str) -> bool:
    """True when the config field at ``dotted`` takes text (and no number or bool)."""
    model: Any = Config
    for part in dotted.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        model = fields[part].annotation
    options = set(typing.get_args(model)) or {model}
    options.discard(type(None))
    return str in options and not options & {int, float, bool}


def build_config(data: dict[str, Any] | None = None, overrides: list[str] | None = None, source: str = "<dict>") -> Config:
    tree: dict[str, Any] = copy.deepcopy(dict(data or {}))  # overrides never leak into the caller's dict
    for text in overrides or []:
        key, value = parse_override(text)
        if value is not None and not isinstance(value, str) and _is_string_field(key):
            value = text.split("=", 1)[1].strip()  # run.name=2024 or data.path=no stay text
        _set_dotted(tree, key, value)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    return _RESOLVER(cfg, source) if _RESOLVER is not None else cfg


#: fills the defaults that depend on files (a pipeline folder in model.path, the family's presets): registered by
#: ``apexdistill.resolve`` (the package registers it on import), so this schema reads no folder and imports nothing of ours
_RESOLVER: Any = None


def set_resolver(fn: Any) -> None:
    """``fn(cfg, source) -> Config``: what ``build_config`` and ``load_config`` resolve every validated config with."""
    global _RESOLVER
    _RESOLVER = fn


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or the defaults when ``path`` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(loaded).__name__}")
        data = loaded
        source = str(p)
    return build_config(data, overrides, source=source)


def flatten(cfg: Config | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"train.lr": 0.0002, ...} (lists become strings)."""
    tree = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        elif isinstance(value, (list, tuple)):
            out[dotted] = ",".join(str(v) for v in value)
        else:
            out[dotted] = value
    return out


def dump_yaml(cfg: Config, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text

"""Data-free distillation (`data.source: teacher`): the teacher writes the training set with Ray Data batch inference.

Real pieces only: the shipped digits teacher and a tiny stock Sana pipeline (real diffusers classes, built offline),
local Ray with a teacher actor, Parquet on disk, the stock pipeline's own call for the parity check, a real
`apexdistill synthesize` process killed by its PID for the resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from apexdistill.config import ConfigError, build_config

pytestmark = pytest.mark.timeout(300)

DIGITS = ["data.source=teacher", "model.path=builtin:teacher"]
SIDE, L = 32, 24
PROMPTS = ("a red cube on a table", "a handwritten digit seven", "two cats under a tree")


def _digits_cfg(workdir, *extra):
    return build_config({}, [*DIGITS, f"run.workdir={workdir}", *extra])


def test_bad_input_is_refused_before_any_compute(tmp_path):
    from apexdistill.data.synthesize import run_synthesize

    with pytest.raises(FileNotFoundError, match=r"data.prompts: prompt file not found: .*missing\.txt"):
        run_synthesize(_digits_cfg(tmp_path, f"data.prompts={tmp_path / 'missing.txt'}"))
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match=r"data.prompts: .*empty\.txt holds no prompts"):
        run_synthesize(_digits_cfg(tmp_path, f"data.prompts={tmp_path / 'empty.txt'}"))
    with pytest.raises(ConfigError, match=r"data.samples_per_prompt"):
        _digits_cfg(tmp_path, "data.samples_per_prompt=0")
    with pytest.raises(ConfigError, match=r"data.limit takes the first N rows of an image source"):
        _digits_cfg(tmp_path, "data.limit=5")
    (tmp_path / "not-a-pipeline").mkdir()
    (tmp_path / "not-a-pipeline" / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ConfigError, match=r"model.path: .*not-a-pipeline.* is neither a stock pipeline folder"):
        build_config({}, ["data.source=teacher", f"model.path={tmp_path / 'not-a-pipeline'}", f"run.workdir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data.source='teacher' samples its training set from the teacher: set model.path"):
        build_config({}, ["data.source=teacher", f"run.workdir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data.prompts is what data.source='teacher' synthesizes from"):
        build_config({}, [f"data.prompts={tmp_path / 'empty.txt'}"])
    assert not (tmp_path / "cache").exists()  # nothing was started or written


def _committed(cache: Path) -> list[Path]:
    return sorted(cache.glob(".partial-*/data/shard-*.json"))


def test_a_killed_synthesis_driver_resumes_to_exactly_the_uninterrupted_rows(tmp_path, capsys):
    """`apexdistill synthesize` on the digits teacher (10 prompts x 12 samples, 10 shards of 2 batches), SIGKILLed by its PID once
    its first shard is committed: nothing is published; the rerun says it resumes, samples only the missing shards,
    and ends with exactly 120 rows equal to an uninterrupted build's (same noise, same batches: measured bit-exact)."""
    from apexdistill.data.preprocess import load_cache_tensors
    from apexdistill.data.synthesize import run_synthesize

    settings = ["data.samples_per_prompt=12", "teacher.nfe=20", "data.shard_rows=12", "data.batch_size=6"]
    config = tmp_path / "synth.yaml"
    config.write_text("data:\n  source: teacher\nmodel:\n  path: builtin:teacher\n")
    exe = [sys.executable, "-m", "apexdistill.cli"]
    proc = subprocess.Popen([*exe, "synthesize", "-c", str(config), "--workdir", str(tmp_path / "a"), *settings],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    cache = tmp_path / "a" / "cache"
    try:
        deadline = time.time() + 150
        while not _committed(cache) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        said = proc.communicate(timeout=30)[0]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the Ray processes the killed driver started
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, said
    done = len(_committed(cache))
    assert 1 <= done < 10, (done, said)  # killed mid-run
    assert not list(cache.glob("*/manifest.json"))  # a killed build publishes nothing

    capsys.readouterr()
    resumed = run_synthesize(_digits_cfg(tmp_path / "a", *settings))
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("[synthesize] resuming "))
    already = int(line.split(": ")[-1].split(" of 10 shards")[0])
    assert already >= done, line  # the shards committed before the kill (one more may have landed while it died)
    assert resumed.rows == 120 and not resumed.hit
    assert resumed.manifest["settings"]["rows_sampled_by_this_build"] == 120 - 12 * already

    straight = run_synthesize(_digits_cfg(tmp_path / "b", *settings))
    assert straight.key == resumed.key
    a, b = load_cache_tensors(resumed.uri), load_cache_tensors(straight.uri)
    assert a["row_id"] == b["row_id"] and len(set(a["row_id"])) == 120  # exactly N x K rows, none twice
    for k in ("x", "z", "text", "text_mask", "label"):
        assert torch.equal(a[k], b[k]), k
    assert a["caption"] == b["caption"] and sorted(set(a["label"].tolist())) == list(range(10))
    assert not any(cache.glob(".partial-*"))  # published: the build's records are gone

    # a cache hit samples nothing, and starts no actor
    again = run_synthesize(_digits_cfg(tmp_path / "a", *settings))
    assert again.hit and again.encoder_actors == 0 and again.uri == resumed.uri
    # another seed is another cache
    other = run_synthesize(_digits_cfg(tmp_path / "a", *settings, "data.seed=1", "data.samples_per_prompt=1"))
    assert other.key != resumed.key and other.rows == 10


def test_synthesize_from_a_tiny_stock_pipeline_then_train_and_export(tmp_path, capsys):
    """A tiny stock Sana pipeline writes the set from a prompt file (its scheduler, CFG 4.5, 3 steps): each cached x is
    what SanaPipeline(...) returns from the cached z; regression trains 4 steps on the stored pairs; the export loads
    in the stock pipeline."""
    from diffusers import DiffusionPipeline

    from apexdistill.data.preprocess import load_cache_tensors, read_negative
    from apexdistill.data.synthesize import run_synthesize
    from apexdistill.models.family import get_family
    from apexdistill.train.driver import run_training
    from apexdistill.train.export import export_pipeline

    family = get_family("sana")
    folder = family.build_tiny_pipeline(tmp_path / "sana", seed=0)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = build_config({}, ["data.source=teacher", f"model.path={folder}", f"run.workdir={tmp_path / 'work'}",
                            f"data.prompts={tmp_path / 'prompts.txt'}", "data.samples_per_prompt=2", "teacher.nfe=3",
                            f"data.resolution={SIDE}", f"text_encoder.max_length={L}", "data.shard_rows=4", "data.batch_size=4",
                            "objective.name=regression", "train.num_workers=0", "train.steps=4", "train.batch_size=4",
                            "train.log_every=2", "eval.at_end=false", "run.name=synth"])
    assert cfg.teacher.guidance_scale == 4.5 and cfg.data.image_channels == 3
    info = run_synthesize(cfg)
    assert info.rows == 6 and info.manifest["columns"]["z"]["shape"] == info.manifest["columns"]["x"]["shape"]
    rows = load_cache_tensors(info.uri)
    assert rows["caption"] == [p for p in PROMPTS for _ in range(2)]
    assert rows["row_id"][:2] == ["000000-0000", "000000-0001"] and set(rows["label"].tolist()) == {-1}

    # parity: the stock pipeline, from the cached noise, with its own scheduler, CFG and negative prompt
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    neg = family.prompt_defaults().negative_prompt
    stock = pipe(list(rows["caption"][:4]), negative_prompt=[neg] * 4, height=SIDE, width=SIDE, max_sequence_length=L,
                 num_inference_steps=3, guidance_scale=4.5, latents=rows["z"][:4], output_type="latent",
                 **family.exact_call_kwargs).images
    diff = float((rows["x"][:4] - stock).abs().max())
    assert diff <= 1e-5, f"synthesized x vs SanaPipeline(latents=z): max abs diff {diff:.3g}"
    instruction = family.prompt_defaults().complex_human_instruction
    embeds, emask, neg_embeds, neg_mask = pipe.encode_prompt(rows["caption"][:4], do_classifier_free_guidance=True,
                                                             max_sequence_length=L, complex_human_instruction=instruction)
    assert torch.equal(rows["text"][:4], embeds.float()) and torch.equal(rows["text_mask"][:4], emask.long())
    assert torch.equal(read_negative(info.uri)["text"], neg_embeds[:1].float())

    # the shipped data-free config validates with a pipeline of its family in model.path
    from apexdistill.config import load_config

    shipped = load_config(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "synthesize_sana.yaml",
                          [f"model.path={folder}", f"data.resolution={SIDE}", f"data.prompts={tmp_path / 'prompts.txt'}"])
    assert shipped.data.source == "teacher" and shipped.data.actor_gpus == 1 and shipped.teacher.nfe == 20
    assert shipped.text_encoder.kind == "pipeline" and shipped.objective.apex.guidance_ratio > 0

    capsys.readouterr()
    result = run_training(cfg)  # the cache is found: nothing sampled again
    out = capsys.readouterr().out
    assert "[synthesize] cache hit: " in out and "nothing sampled" in out
    assert result.metrics["step"] == 4 and result.metrics["bank_rows"] == 0  # the stored pairs, no teacher ODE solved
    assert torch.isfinite(torch.tensor(result.metrics["loss"]))

    exported = export_pipeline(result.run_dir, tmp_path / "export", link=True)
    student = DiffusionPipeline.from_pretrained(str(exported), local_files_only=True)
    student.set_progress_bar_config(disable=True)
    image = student(PROMPTS[0], height=SIDE, width=SIDE, max_sequence_length=L, sigmas=[0.999], guidance_scale=1.0,
                    output_type="pt", generator=torch.Generator().manual_seed(0), **family.exact_call_kwargs).images
    assert image.shape == (1, 3, SIDE, SIDE) and torch.isfinite(image).all()

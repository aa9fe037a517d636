"""What is trained is what ships: the conditioning the teacher sees is the one training uses and the export
reproduces. Timesteps stay float32 under FSDP2's bf16 mixed precision (on CPU, a one-process gloo group); the
structure keeps the config a pure schema."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_bf16_keeps_the_timestep_float32():
    """FSDP2's input cast would round the time to bf16 (0.999 -> 1.0, 0.6 -> 0.6016); the sharded backbone keeps it
    float32 while its latents and text run in bf16. Read where Sana's transformer takes it: its time embedding."""
    import torch.distributed as dist

    from apexdistill.config import build_config
    from apexdistill.models.build import build_backbone
    from apexdistill.train.strategy import shard_backbone

    assert torch.tensor(0.999).bfloat16().item() == 1.0 and torch.tensor(0.6).bfloat16().item() == pytest.approx(0.6016, abs=1e-4)
    cfg = build_config({}, [])
    backbone = build_backbone(cfg.model, 1, 16, 384)
    seen = {}
    backbone.transformer.time_embed.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(timestep=args[0] if args else kwargs["timestep"]), with_kwargs=True)
    backbone.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(hidden=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        shard_backbone(backbone, torch.bfloat16)
        t = torch.tensor([0.999, 0.6])
        out = backbone(torch.randn(2, 1, 16, 16), t, torch.randn(2, 16, 384), torch.ones(2, 16, dtype=torch.long))
    finally:
        dist.destroy_process_group()
    assert seen["timestep"].dtype == torch.float32
    assert torch.equal(seen["timestep"], t * 1000)  # Sana's timestep = sigma * 1000, exactly as the pipeline passes it
    assert seen["hidden"].dtype == torch.bfloat16 and out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_the_config_is_a_schema_that_imports_nothing_of_ours():
    """`import apexdistill.config` in a fresh interpreter loads no model, data or family module, and config.py has no
    import of ours anywhere, not even inside a function (resolving a config against a pipeline is apexdistill.resolve's)."""
    import ast
    from pathlib import Path

    import apexdistill.config

    tree = ast.parse(Path(apexdistill.config.__file__).read_text())
    ours = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
            and any(name.startswith("apexdistill") for name in ([a.name for a in n.names] if isinstance(n, ast.Import)
                                                                 else [n.module or ""]))]
    assert not ours, ours
    code = ("import sys, apexdistill.config; bad = sorted(m for m in sys.modules if m.startswith('apexdistill.') and "
            "m not in ('apexdistill.config',)); print(bad); assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


SIDE, L = 32, 24
PROMPTS = ["a handwritten digit seven", "a handwritten digit two"]


@pytest.fixture(scope="module")
def sana_folder(tmp_path_factory):
    from apexdistill.models.family import get_family

    return get_family("sana").build_tiny_pipeline(tmp_path_factory.mktemp("fidelity") / "sana", seed=0)


def _sana_cfg(folder, workdir, *extra):
    from apexdistill.config import build_config

    return build_config({}, [f"model.path={folder}", f"run.workdir={workdir}", f"data.resolution={SIDE}", f"text_encoder.max_length={L}",
                             "data.limit=16", "train.steps=2", "train.batch_size=8", "train.log_every=1", "eval.at_end=false",
                             "objective.apex.generator_warmup_steps=0", *extra])


def test_export_reproduces_the_runs_prompt_settings(sana_folder, tmp_path):
    """A Sana run trained without the complex human instruction and with its own negative prompt: the exported folder's
    recorded call (apexdistill.json, the model card) reproduces `apexdistill sample` within 1e-6; the pipeline's default
    call (its 8-line instruction) gives another result."""
    import json

    from diffusers import DiffusionPipeline

    from apexdistill.cli import sample_run
    from apexdistill.train.driver import run_training
    from apexdistill.train.export import export_pipeline, load_trained_backbone

    import shutil

    teacher = tmp_path / "teacher"  # its own copy: its VAE is replaced below
    shutil.copytree(sana_folder, teacher)
    cfg = _sana_cfg(teacher, tmp_path / "work", "run.name=no-instruction", "text_encoder.complex_human_instruction=[]",
                    "text_encoder.negative_prompt=blurry, low quality")
    result = run_training(cfg)
    out = export_pipeline(result.run_dir, tmp_path / "export")
    meta = json.loads((out / "apexdistill.json").read_text())
    assert meta["call"]["complex_human_instruction"] == [] and meta["call"]["max_sequence_length"] == L
    assert meta["conditioning"]["negative_prompt"] == "blurry, low quality" and meta["dtype"] == "float32"
    assert "complex_human_instruction=[]" in (out / "README.md").read_text()
    model, run_cfg = load_trained_backbone(result.run_dir)
    pipe = DiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for nfe in (1, 2):
        ours = sample_run(model, run_cfg, PROMPTS, 1, nfe, seed=5, latents=True)
        stock = pipe(PROMPTS, sigmas=meta["sigmas"][str(nfe)], height=SIDE, width=SIDE, output_type="latent",
                     generator=torch.Generator().manual_seed(5), **meta["call"]).images
        diff = float((ours - stock).abs().max())
        assert diff <= 1e-6, f"{nfe} NFE: the card's call vs `apexdistill sample`: {diff:.3g} > 1e-6"
    default = {k: v for k, v in meta["call"].items() if k != "complex_human_instruction"}
    stock = pipe(PROMPTS, sigmas=meta["sigmas"]["1"], height=SIDE, width=SIDE, output_type="latent",
                 generator=torch.Generator().manual_seed(5), **default).images
    assert float((sample_run(model, run_cfg, PROMPTS, 1, 1, seed=5, latents=True) - stock).abs().max()) > 1e-4

    # the checkpoint records the conditioning it trained with: a teacher whose VAE changed since is not exported
    state = json.loads(next((result.run_dir / "checkpoints").glob("step_*/trainer_state.json")).read_text())
    assert state["conditioning"]["text_encoder"]["settings"]["complex_human_instruction"] == []
    assert json.loads((result.run_dir / "conditioning.json").read_text()) == state["conditioning"]
    vae_config = teacher / "vae" / "config.json"
    vae_config.write_text(json.dumps({**json.loads(vae_config.read_text()), "scaling_factor": 0.5}))
    with pytest.raises(ValueError, match=r"no longer give the conditioning it trained with \(vae\.identity"):
        export_pipeline(result.run_dir, tmp_path / "export-2")
    assert not (tmp_path / "export-2").exists()


def test_export_refuses_a_text_encoder_the_stock_pipeline_does_not_run(sana_folder, tmp_path):
    """The pipeline's Gemma2 weights loaded as a plain transformers encoder: the same width, other text states (no
    encode_prompt: no instruction, no BOS handling). The export would ship the pipeline's own encoder: refused."""
    from apexdistill.train.export import export_conditioning

    cfg = _sana_cfg(sana_folder, tmp_path, "text_encoder.kind=transformers", f"text_encoder.path={sana_folder / 'text_encoder'}")
    with pytest.raises(ValueError, match=r"text_encoder\.kind='transformers'.*SanaPipeline.*text_encoder\.kind=pipeline"):
        export_conditioning(cfg)
    assert export_conditioning(_sana_cfg(sana_folder, tmp_path))["call"]["max_sequence_length"] == L  # its own: accepted

"""The Ray Train worker loop in local mode (TorchTrainer, num_workers=0): real Ray Train, real files."""

from __future__ import annotations

import json

import torch

import pytest
from safetensors.torch import load_file

from apexdistill.config import build_config
from apexdistill.train.driver import run_training
from apexdistill.train.export import export_pipeline, load_trained_backbone
from apexdistill.train.loop import latest_checkpoint

pytestmark = pytest.mark.timeout(240)

TINY = ["train.batch_size=16", "train.log_every=2", "eval.samples_per_class=2", "eval.at_end=false"]


def _cfg(tmp_path, shared_cache, *overrides):
    return build_config({}, [f"run.workdir={tmp_path}", f"data.cache_uri={shared_cache}", *TINY, *overrides])


def test_fm_trains_checkpoints_and_resumes(tmp_path, shared_cache):
    cfg = _cfg(tmp_path, shared_cache, "run.name=fm", "objective.name=fm", "train.steps=3", "train.lr=1e-3")
    first = run_training(cfg)
    state = json.loads((first.checkpoint_dir / "trainer_state.json").read_text())
    assert state["step"] == 3
    assert first.metrics["loss"] > 0 and first.metrics["step"] == 3
    weights_3 = load_file(str(first.checkpoint_dir / "model.safetensors"))

    # same run name, more steps: resumes at 3 and continues to 5 (does not start over)
    second = run_training(_cfg(tmp_path, shared_cache, "run.name=fm", "objective.name=fm", "train.steps=5", "train.lr=1e-3"))
    assert json.loads((second.checkpoint_dir / "trainer_state.json").read_text())["step"] == 5
    assert second.checkpoint_dir != first.checkpoint_dir
    weights_5 = load_file(str(second.checkpoint_dir / "model.safetensors"))
    changed = [k for k in weights_3 if not (weights_3[k] == weights_5[k]).all()]
    assert changed, "resumed steps did not change any weight"
    assert latest_checkpoint(second.run_dir) == second.checkpoint_dir


def test_apex_with_learnable_shift_updates_shift_and_exports(tmp_path, shared_cache):
    # with guidance from the EMA (guidance_ratio > 0, no LoRA): the swap must not break the step's backward
    cfg = _cfg(tmp_path, shared_cache, "run.name=apex", "objective.shift.learnable=true", "objective.shift.lr_mult=10", "train.steps=3",
               "train.lr=1e-3", "objective.apex.guidance_ratio=1")
    result = run_training(cfg)
    shift = load_file(str(result.checkpoint_dir / "objective.safetensors"))
    assert float(shift["shift.a"]) != -1.0 or float(shift["shift.b"]) != 0.0
    for key in ("loss_gen", "loss_fake", "loss_real", "grad_norm", "samples_per_s"):
        assert key in result.metrics

    student, _ = load_trained_backbone(result.run_dir)
    out = export_pipeline(result.run_dir, tmp_path / "export")
    assert (out / "transformer" / "config.json").is_file()
    # the exported diffusers folder loads back through the same path a real checkpoint uses
    from apexdistill.models.build import build_backbone

    again = build_backbone(cfg.model.model_copy(update={"path": str(out)}), 1, 16, 384)
    import torch

    x, t, c, m = torch.randn(2, 1, 16, 16), torch.rand(2), torch.randn(2, 16, 384), torch.ones(2, 16)
    with torch.no_grad():
        assert torch.equal(student(x, t, c, m), again.eval()(x, t, c, m))


def test_lora_run_exports_an_adapter_that_loads_back(tmp_path, shared_cache):
    """A LoRA run from the shipped teacher (in-process; LoRA on 2 fsdp2 workers is test_pipelines'
    end-to-end test): the adapters train, and the export's ``lora/`` alone on the base model gives the
    trained network exactly, its merged ``transformer/`` to 1e-5."""
    from apexdistill.models.build import build_backbone
    from apexdistill.models.lora import has_lora, load_lora
    from mlflow import MlflowClient

    cfg = _cfg(tmp_path, shared_cache, "run.name=lora", "train.steps=3", "model.path=builtin:teacher", "model.lora.enabled=true",
               "model.lora.rank=4", "train.lr=1e-2", "train.gradient_checkpointing=true")
    result = run_training(cfg)
    trained, _ = load_trained_backbone(result.run_dir, use_ema=False)
    lora_b = [v for k, v in trained.state_dict().items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b)  # B starts at zero: the adapters trained

    out = export_pipeline(result.run_dir, tmp_path / "export", use_ema=False)
    no_lora = cfg.model.lora.model_copy(update={"enabled": False})
    base = build_backbone(cfg.model.model_copy(update={"lora": no_lora}), 1, 16, 384)  # the shipped teacher
    again = load_lora(base, out / "lora")
    assert has_lora(again)
    merged = build_backbone(cfg.model.model_copy(update={"path": str(out), "lora": no_lora}), 1, 16, 384)
    g = torch.Generator().manual_seed(0)
    x, t, c, m = torch.randn(3, 1, 16, 16, generator=g), torch.rand(3, generator=g), torch.randn(3, 16, 384, generator=g), torch.ones(3, 16)
    with torch.no_grad():
        want = trained(x, t, c, m)
        assert torch.equal(again.eval()(x, t, c, m), want)  # the adapter alone on the base model
        assert torch.allclose(merged.eval()(x, t, c, m), want, atol=1e-5)  # merged into transformer/
    tags = MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id).data.tags
    assert tags["apexdistill.export"] == str(out.resolve()) and tags["apexdistill.lora"] == "true"


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        load_trained_backbone(tmp_path)


def test_streaming_shard_trains(tmp_path, shared_cache):
    """With in_memory_max_mb=0 the worker streams its shard with iter_torch_batches over epochs."""
    from apexdistill.data.preprocess import read_cache, run_preprocess
    from apexdistill.train.data import StreamingBatches, shard_batches

    cfg = _cfg(tmp_path, shared_cache, "run.name=stream", "objective.name=fm", "train.steps=2", "data.in_memory_max_mb=0")
    cache = run_preprocess(cfg)
    batches = shard_batches(read_cache(cache.uri), cfg, cache.rows, 10_000, seed=0)
    assert isinstance(batches, StreamingBatches)
    seen = sum(batches.next(16)["x"].shape[0] for _ in range(cache.rows // 16 + 3))  # crosses an epoch boundary
    assert seen == 16 * (cache.rows // 16 + 3) and batches.epoch >= 1
    batches.close()
    assert run_training(cfg).metrics["step"] == 2


def test_resume_is_exact_and_refuses_a_changed_setup(tmp_path, shared_cache):
    """2 steps + resume to 4 == 4 uninterrupted steps, bit for bit (local mode, in-memory shard:
    the torch and sampler RNG states travel in the checkpoint). Tolerance: exact equality."""
    common = ["objective.name=fm", "train.lr=1e-3", "train.checkpoint_every=2"]
    straight = run_training(_cfg(tmp_path / "a", shared_cache, "run.name=s", "train.steps=4", *common))
    assert sorted(p.name for p in (straight.run_dir / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]

    run_training(_cfg(tmp_path / "b", shared_cache, "run.name=r", "train.steps=2", *common))
    resumed = run_training(_cfg(tmp_path / "b", shared_cache, "run.name=r", "train.steps=4", *common))
    a = load_file(str(straight.checkpoint_dir / "model.safetensors"))
    b = load_file(str(resumed.checkpoint_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(Exception, match=r"different setup.*objective\.name"):
        run_training(_cfg(tmp_path / "b", shared_cache, "run.name=r", "train.steps=6", "objective.name=apex", "train.lr=1e-3"))


def test_reference_weights_are_the_frozen_base_under_lora_and_the_ema_without():
    """Guidance targets (objective.apex.guidance_ratio) come from the frozen base under LoRA (adapters
    disabled, then enabled again) and from the EMA otherwise (swapped in, then the live weights back)."""
    from types import SimpleNamespace

    import torch

    from apexdistill.config import LoraConfig, ModelConfig
    from apexdistill.method.ema import EMA
    from apexdistill.models.build import build_backbone
    from apexdistill.models.lora import apply_lora
    from apexdistill.train.loop import reference_weights

    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0.3, 0.7])
    text, mask = torch.randn(2, 4, 384), torch.ones(2, 4, dtype=torch.long)

    base = build_backbone(ModelConfig(), 1, 16, 384).eval()
    with torch.no_grad():
        base_out = base(x, t, text, mask)
    lora = apply_lora(base, LoraConfig(enabled=True, rank=2, targets=[]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if ".lora_B" in n:
                p.add_(0.1)
        adapted = lora(x, t, text, mask)
        with reference_weights(SimpleNamespace(backbone=lora, ema=None)):
            assert torch.allclose(lora(x, t, text, mask), base_out, atol=1e-6)
        assert torch.equal(lora(x, t, text, mask), adapted)
    assert (adapted - base_out).abs().max() > 1e-3

    full = build_backbone(ModelConfig(), 1, 16, 384).eval()
    ema = EMA(full, 0.9)
    with torch.no_grad():
        ema_out = full(x, t, text, mask)
        for p in full.parameters():
            p.add_(0.01)
        live_out = full(x, t, text, mask)
        with reference_weights(SimpleNamespace(backbone=full, ema=ema)):
            assert torch.equal(full(x, t, text, mask), ema_out)
        assert torch.equal(full(x, t, text, mask), live_out)
        # the kept initial weights (guidance_reference=frozen): the teacher, whatever the EMA did
        kept = {n: p.detach().clone() - 0.01 for n, p in full.named_parameters()}
        with reference_weights(SimpleNamespace(backbone=full, ema=ema), "frozen", kept):
            frozen_out = full(x, t, text, mask)
        assert torch.allclose(frozen_out, ema_out, atol=1e-6) and torch.equal(full(x, t, text, mask), live_out)
    try:
        with reference_weights(SimpleNamespace(backbone=full, ema=None)):
            raise AssertionError("no reference weights without LoRA or EMA")
    except ValueError as exc:
        assert "ema_decay" in str(exc)


def test_ctrl_c_then_the_printed_command_resumes_into_the_same_mlflow_run(tmp_path, shared_cache, capsys):
    """`apexdistill train` (the real console script, local mode) stopped with SIGINT after its step-10 checkpoint:
    it says it was interrupted, where the last good checkpoint is and the command that resumes it; that command
    (here with a shorter train.steps, run in-process) says it resumes, from which step and into which MLflow run,
    and finishes into that same run."""
    import os
    import shlex
    import shutil
    import signal
    import subprocess
    import sys

    from mlflow import MlflowClient

    from apexdistill.cli import main

    exe = shutil.which("apexdistill")
    config = tmp_path / "stopped.yaml"
    config.write_text("run:\n  name: stopped\nobjective:\n  name: fm\n")
    args = ["train", "-c", str(config), "--workdir", str(tmp_path), f"data.cache_uri={shared_cache}", *TINY, "train.steps=400", "train.checkpoint_every=10", "train.log_every=1"]
    proc = subprocess.Popen([*([exe] if exe else [sys.executable, "-m", "apexdistill.cli"]), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("[train] step 12/400"):
                proc.send_signal(signal.SIGINT)
                break
        lines += proc.communicate(timeout=120)[0].splitlines()
    finally:
        proc.kill()
    said = "\n".join(lines)
    assert proc.returncode != 0, said
    # a short config summary, not the resolved YAML (that is in the run folder, and printed with --verbose)
    assert lines[0].startswith("[train] sana (tiny preset, random init), objective fm, in-process, 400 steps of batch 16"), said
    assert "[train] full resolved config: " in said and not any(line.startswith(("objective:", "train:", "  steps:")) for line in lines)
    assert (tmp_path / "runs" / "stopped" / "config.yaml").is_file()
    stopped = [line for line in lines if line.startswith("[train] interrupted; the last good checkpoint is step ")]
    assert len(stopped) == 1, said
    step = int(stopped[0].split("checkpoint is step ")[1].split()[0])
    assert 10 <= step < 400
    run_id = stopped[0].split("MLflow run ")[1].split(";")[0]
    command = shlex.split(stopped[0].split("resume with: ")[1])
    assert command[0] == "apexdistill" and command[1:] == args, command
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "KILLED"
    # the Ctrl-C is taken between steps, not inside one (an MLflow write cut in half left SQLite locked): every step
    # the console printed is in MLflow, the last one included
    assert "[train] Ctrl-C: stopping at the end of this step (press Ctrl-C again to stop now)" in said, said
    printed = [int(line.split()[2].split("/")[0]) for line in lines if line.startswith("[train] step ")]
    before = [m.step for m in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(run_id, "loss")]
    assert sorted(before) == list(range(1, max(printed) + 1)), (before, printed)

    capsys.readouterr()
    assert main([*command[1:], f"train.steps={step + 3}"]) == 0
    out = capsys.readouterr().out
    assert f"[train] resuming run 'stopped' from its step-{step} checkpoint" in out and f"into MLflow run {run_id}" in out, out
    assert f"[train] done: {step + 3} steps" in out
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED"
    # the steps replayed from the checkpoint (logged before the interrupt, with the same values: resume is exact) are
    # not logged twice
    logged = [m.step for m in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(run_id, "loss")]
    assert len(logged) == len(set(logged)) and set(range(1, step + 4)) <= set(logged), logged

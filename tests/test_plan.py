"""Real-size presets and `apexdistill plan`: parameter counts of the published architectures on the
meta device, the memory estimate against the peak measured over real training steps on CPU, the
CLI (text and --json), and `train` refusing a GPU run that cannot fit before anything starts."""

from __future__ import annotations

import json
import re

import pytest
import torch
from apexdistill.cli import main
from apexdistill.config import ConfigError, build_config
from apexdistill.method.base import build_objective
from apexdistill.models.build import build_backbone, build_meta_backbone
from apexdistill.plan import (
    check_plan_fits,
    config_shapes,
    format_plan,
    measure_peak_bytes,
    plan_memory,
)
from apexdistill.train.loop import wrap_with_reference
from apexdistill.train.strategy import build_strategy

pytestmark = pytest.mark.timeout(120)

# the published sizes (Sana 0.6B / 1.6B, Qwen-Image 20B, Z-Image 6B); the issue allows 3%
PRESETS = [("sana", "sana-0.6b", 0.6e9, 32, 2304), ("sana", "sana-1.6b", 1.6e9, 32, 2304),
           ("qwenimage", "qwenimage-20b", 20e9, 16, 3584), ("zimage", "zimage-6b", 6e9, 16, 2560)]
#: Qwen-Image 20B, LoRA rank 64, fsdp2 on 8 x 80 GB, 8 per GPU (the paper's global batch 64), 1024 px
QWEN_LORA = ["model.backbone=qwenimage", "model.preset=qwenimage-20b", "data.resolution=1024", "train.use_gpu=true",
             "train.strategy=fsdp2", "train.num_workers=8", "train.batch_size=8", "model.lora.enabled=true",
             "model.lora.rank=64", "model.lora.alpha=64"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module on one torch thread (conftest's ``one_thread``)."""


@pytest.mark.parametrize("family,preset,target,channels,text_dim", PRESETS, ids=[p[1] for p in PRESETS])
def test_published_presets_have_the_published_size_on_meta(family, preset, target, channels, text_dim):
    cfg = build_config({}, [f"model.backbone={family}", f"model.preset={preset}"])
    backbone = build_meta_backbone(cfg.model, channels, 128, text_dim)
    params = list(backbone.parameters())
    assert all(p.device.type == "meta" for p in params)  # nothing allocated
    n = sum(p.numel() for p in params)
    assert abs(n / target - 1) <= 0.03, f"{preset}: {n / 1e9:.3f}B parameters"


def test_presets_are_checked_per_family_and_against_the_data():
    with pytest.raises(ConfigError, match=r"model.preset: unknown preset 'zimage-6b' for sana"):
        build_config({}, ["model.preset=zimage-6b"])
    cfg = build_config({}, ["model.preset=sana-0.6b"])
    with pytest.raises(ValueError, match=r"model.preset='sana-0.6b' is the published architecture: it takes 32 latent channels"), \
            torch.device("meta"):
        build_backbone(cfg.model, 1, 16, 384)
    with pytest.raises(ConfigError, match=r"data.resolution=16 is not a multiple of 32"):
        plan_memory(cfg)


def _measured_peak(cfg) -> int:
    """Peak bytes over model build, wrap and two real apex/fm training steps (AdamW, EMA) on CPU."""
    shapes = config_shapes(cfg)
    c, h, w = shapes.latent
    n = cfg.train.batch_size
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.rand(n, c, h, w, generator=g) * 2 - 1, "text": torch.randn(n, shapes.text_len, shapes.text_dim, generator=g),
             "text_mask": torch.ones(n, shapes.text_len, dtype=torch.long)}

    def train_two_steps():
        torch.manual_seed(0)
        backbone = build_backbone(cfg.model, c, h, shapes.text_dim).train()
        strategy = build_strategy(cfg, 0, 1, torch.device("cpu"))
        wrap_with_reference(strategy, backbone, build_objective(cfg.objective))  # as the worker loop does
        for _ in range(2):
            loss, _ = strategy.objective.loss(strategy.model, batch, 1000)
            strategy.backward(loss)
            strategy.step()

    return measure_peak_bytes(train_two_steps)


CALIBRATION = {
    "sana-apex": ["train.batch_size=16"],
    "sana-apex-checkpointed": ["train.batch_size=16", "train.gradient_checkpointing=true"],
    "qwenimage-apex-lora": ["model.backbone=qwenimage", "train.batch_size=16", "model.lora.enabled=true"],
    "zimage-fm": ["model.backbone=zimage", "train.batch_size=16", "objective.name=fm"],
    # apex's plain form (no consistency target, so no teacher copy; every row in all three terms)
    "sana-apex-plain": ["train.batch_size=16", "objective.apex.consistency_weight=0", "objective.apex.generator_fraction=1",
                        "objective.apex.consistency_renoise_t=0", "objective.apex.consistency_bank_size=0"],
}


@pytest.mark.parametrize("overrides", CALIBRATION.values(), ids=CALIBRATION.keys())
def test_plan_matches_the_measured_peak_within_25_percent(overrides):
    """Measured (the profiler's allocation events; 2 steps): -5.5%, -10.3%, -13.3% (the default recipe; full fine-tunes
    keep a teacher copy), -1.6%, and -6.2% for apex's plain form (plan below measured: the plan leaves out backward's own
    temporaries)."""
    cfg = build_config({}, overrides)
    planned = plan_memory(cfg).per_gpu_gb * 2**30
    measured = _measured_peak(cfg)
    assert abs(planned / measured - 1) <= 0.25, f"plan {planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"


def test_a_target_from_the_frozen_teacher_plans_its_copy_of_the_weights():
    """The teacher copy the consistency target needs (a full fine-tune keeps the trained parameters as they
    start): one fp32 copy of T, sharded like the EMA; none for fm, guidance from the EMA, or LoRA. Found on an
    H200: without it the plan of Sana 1.6B with the recipe and checkpointing was 6.1 GiB (the copy) under the peak."""
    recipe = ["objective.apex.consistency_weight=1", "train.use_gpu=true", "model.preset=sana-1.6b", "train.strategy=fsdp2",
              "train.num_workers=8", "data.resolution=1024", "train.batch_size=4", "train.gradient_checkpointing=true"]
    plan = plan_memory(build_config({}, recipe))
    assert plan.reference_gb == pytest.approx(4 * plan.trainable_parameters / 8 / 2**30) == pytest.approx(plan.ema_gb)
    no_copy = plan_memory(build_config({}, [*recipe, "objective.apex.consistency_reference=ema", "objective.apex.consistency_bank_size=0"]))
    assert no_copy.reference_gb == 0 and plan.per_gpu_gb - no_copy.per_gpu_gb == pytest.approx(plan.reference_gb)
    assert plan_memory(build_config({}, [*recipe, "objective.name=fm"])).reference_gb == 0
    assert plan_memory(build_config({}, [*recipe, "model.lora.enabled=true"])).reference_gb == 0
    assert "teacher copy" in format_plan(plan)


def test_a_plan_of_given_shapes_is_the_plan_of_that_sample():
    """plan_memory(cfg, shapes): a benchmark's synthetic sample instead of the one the config files describe (no
    text encoder read); the config's own shapes give the same plan, longer captions more activations."""
    from dataclasses import replace

    cfg = build_config({}, ["train.batch_size=4"])
    own = config_shapes(cfg)
    assert plan_memory(cfg, own) == plan_memory(cfg)
    longer = plan_memory(cfg, replace(own, text_len=4 * own.text_len))
    assert longer.activations_gb > plan_memory(cfg).activations_gb and longer.text_tokens == 4 * own.text_len


def test_plan_cli_prints_a_table_and_json(capsys):
    assert main(["plan", *QWEN_LORA, "train.gradient_checkpointing=true"]) == 0
    table = capsys.readouterr().out
    assert "qwenimage qwenimage-20b: 20.525B parameters" in table and "| activations |" in table and "fits train.gpu_memory_gb=80" in table

    assert main(["plan", "--json", *QWEN_LORA]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["parameters"] == 20_430_401_088 + plan["trainable_parameters"]  # exact: the base plus its adapters
    assert 0 < plan["trainable_parameters"] < 0.01 * plan["parameters"]  # the adapters only
    assert plan["fits"] is False and plan["per_gpu_gb"] > 80  # 8 per GPU at 1024 px needs checkpointing
    assert {"weights_gb", "gradients_gb", "optimizer_gb", "ema_gb", "activations_gb"} <= plan.keys()


def test_train_refuses_a_gpu_run_that_cannot_fit_and_names_what_would(capsys):
    cfg = build_config({}, QWEN_LORA)
    with pytest.raises(ConfigError) as err:
        check_plan_fits(cfg)
    message = str(err.value)
    assert "train.gpu_memory_gb=80" in message
    assert "train.gradient_checkpointing=true:" in message and "(fits)" in message
    assert "train.batch_size=4 train.grad_accum_steps=2" in message
    # the CLI path: refused before Ray, the cache or a worker start (exit 2, the message on stderr)
    assert main(["train", "-c", "platform/apexdistill/configs/demo.yaml", "model.path=null", *QWEN_LORA]) == 2
    assert "the memory plan needs" in capsys.readouterr().err
    # CPU runs are not planned: the existing CPU tests and the demo never pay for it
    assert check_plan_fits(build_config({}, ["train.batch_size=100000"])) is None


def test_plan_of_a_published_preset_as_typed_brings_its_own_run(capsys):
    """`apexdistill plan model.preset=sana-1.6b`, nothing else: the architecture's native 1024 px, bf16 and FSDP2 on an
    8-GPU node instead of the digits' 16 px on the CPU (which is refused: not a multiple of the VAE's 32), said as an
    assumption; a key the user sets stays theirs."""
    assert main(["plan", "--json", "model.preset=sana-1.6b"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["resolution"] == 1024 and plan["precision"] == "bf16" and plan["strategy"] == "fsdp2" and plan["workers"] == 8
    assert plan["device"] == "cuda" and plan["latent"] == [32, 32, 32]
    # the paper's micro batch 4 at global batch 64 (8 x 4 x 2), not the digits' 128 a rank; and it fits an 80 GB GPU
    assert (plan["batch_size"], plan["grad_accum_steps"]) == (4, 2) and plan["fits"]
    assert any("assumed for sana-1.6b" in n and "data.resolution=1024" in n and "train.batch_size=4" in n for n in plan["notes"])
    assert main(["plan", "--json", "model.preset=sana-1.6b", "data.resolution=512", "train.num_workers=2", "train.strategy=ddp"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["resolution"] == 512 and plan["strategy"] == "ddp" and plan["workers"] == 2 and plan["precision"] == "bf16"
    assert (plan["batch_size"], plan["grad_accum_steps"]) == (4, 8)  # still global 64 on the user's 2 workers
    assert main(["plan", "--json", "model.preset=sana-1.6b", "train.batch_size=16"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (plan["batch_size"], plan["grad_accum_steps"]) == (16, 1)
    # a published architecture that does not fit as typed says what would, each re-planned
    assert main(["plan", "model.backbone=qwenimage", "model.preset=qwenimage-20b"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit train.gpu_memory_gb=80" in out and "change one of (each re-planned):" in out
    assert re.search(r"train\.gradient_checkpointing=true model\.lora\.enabled=true .*GB per GPU \(fits\)", out), out
    # its name under the default family names the family it belongs to
    assert main(["plan", "model.preset=qwenimage-20b"]) == 2
    assert "set model.backbone=qwenimage" in capsys.readouterr().err
    assert main(["plan", "model.preset=tiny"]) == 0  # the sized presets keep the digits' defaults
    assert "assumed" not in capsys.readouterr().out


def test_plan_counts_the_consistency_banks_host_memory_for_sana_at_1024():
    """`apexdistill plan model.preset=sana-1.6b` (1024 px: 32x32x32 latents, 300 tokens of width 2304) prints the default
    recipe's bank per worker: 2048 one-step and 1024 re-noised rows of 3 fp32 latents, plus the text states of at most
    2048 distinct prompts, against train.host_memory_gb."""
    import subprocess
    import sys

    latent = 4 * 32 * 32 * 32
    want = 2048 * (3 * latent + 8) + 1024 * (3 * latent + 12) + 2048 * 300 * (4 * 2304 + 8)
    plan = plan_memory(build_config({}, ["model.preset=sana-1.6b", "data.resolution=1024", "train.use_gpu=true"]))
    assert plan.bank is not None and plan.bank.total_bytes == want and plan.bank.fits
    out = subprocess.run([sys.executable, "-m", "apexdistill.cli", "plan", "model.preset=sana-1.6b"], capture_output=True,
                         text=True, timeout=120).stdout
    line = next(line for line in out.splitlines() if line.startswith("consistency bank (host memory, per worker): "))
    assert f"{want / 2**30:.2f} GB = 2048 one-step rows + 1024 re-noised" in line and "fits train.host_memory_gb=64" in line, out
    # no bank: no line (fm, or the bank off)
    assert plan_memory(build_config({}, ["model.preset=sana-1.6b", "data.resolution=1024", "objective.name=fm"])).bank is None
    assert plan_memory(build_config({}, ["model.preset=sana-1.6b", "data.resolution=1024",
                                         "objective.apex.consistency_bank_size=0"])).bank is None


def test_the_planned_bank_is_the_bytes_a_filled_bank_holds():
    """The plan's bank bytes equal what the real bank holds once full: the default recipe's objective on the tiny Sana,
    its reference bound as the worker loop does, every row a distinct prompt (the plan's upper bound)."""
    from apexdistill.plan import Shapes, plan_bank

    text_len, text_dim, n = 5, 12, 8
    cfg = build_config({}, ["train.batch_size=8", "objective.apex.consistency_bank_size=16", "train.ema_decay=0"])
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model, 1, 16, text_dim).train()
    strategy = build_strategy(cfg, 0, 1, torch.device("cpu"))
    objective = build_objective(cfg.objective)
    wrap_with_reference(strategy, backbone, objective)
    g = torch.Generator().manual_seed(1)
    for step in range(4):  # 4 generator rows a step: full after 4 steps
        batch = {"x": torch.rand(n, 1, 16, 16, generator=g) * 2 - 1, "text": torch.randn(n, text_len, text_dim, generator=g),
                 "text_mask": torch.ones(n, text_len, dtype=torch.long)}
        with torch.no_grad():
            objective.loss(strategy.model, batch, step)
    assert objective.bank_fill_steps(n) == 4
    planned = plan_bank(cfg, Shapes(latent=(1, 16, 16), text_len=text_len, text_dim=text_dim))
    assert planned.rows == 16 and planned.renoised_rows == 8
    assert objective.bank_bytes == planned.total_bytes, (objective.bank_bytes, planned.total_bytes)


def test_train_refuses_a_bank_that_does_not_fit_host_memory_before_any_compute(tmp_path):
    """A bank over train.host_memory_gb is refused by `train` before Ray, data or workers start, naming the field, the
    number and the largest bank that fits (which then plans to fit)."""
    import re

    from apexdistill.train.driver import run_training

    cfg = build_config({}, [f"run.workdir={tmp_path}", "train.host_memory_gb=0.01", f"data.cache_uri={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError, match=r"objective.apex.consistency_bank_size=2048: the bank needs 0.1 GB of host memory "
                                          r"per worker, more than train.host_memory_gb=0.01") as err:
        run_training(cfg)
    largest = int(re.search(r"Set objective.apex.consistency_bank_size=(\d+) or less", str(err.value)).group(1))
    assert 0 < largest < 2048
    from apexdistill.plan import config_shapes, plan_bank

    fitted = build_config({}, ["train.host_memory_gb=0.01", f"objective.apex.consistency_bank_size={largest}"])
    assert plan_bank(fitted, config_shapes(fitted)).fits
    bigger = build_config({}, ["train.host_memory_gb=0.01", f"objective.apex.consistency_bank_size={largest + 8}"])
    assert not plan_bank(bigger, config_shapes(bigger)).fits
    assert not (tmp_path / "cache").exists() and not (tmp_path / "mlflow.db").exists()

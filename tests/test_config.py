"""Config loading, overrides and the errors a user sees."""

from __future__ import annotations

import pytest

from apexdistill.config import ConfigError, build_config, dump_yaml, flatten, load_config


def test_defaults_and_overrides():
    cfg = build_config({}, ["train.steps=7", "objective.shift.a=-0.5", "eval.nfe=[1,4]", "model.path=null"])
    assert cfg.train.steps == 7
    assert cfg.objective.shift.a == -0.5
    assert cfg.eval.nfe == [1, 4]
    assert cfg.objective.name == "apex"


def test_yaml_round_trip_and_flatten(tmp_path):
    cfg = build_config({"train": {"lr": 1e-3}}, ["run.name=x"])
    path = tmp_path / "cfg.yaml"
    dump_yaml(cfg, path)
    again = load_config(path)
    assert again == cfg
    flat = flatten(cfg)
    assert flat["train.lr"] == 1e-3
    assert flat["objective.shift.b"] == 0.0
    assert flat["eval.nfe"] == "1,2,4"
    assert all("." in k for k in flat)


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'train\.stpes'.*did you mean 'train\.steps'"):
        build_config({}, ["train.stpes=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'objectiv'.*did you mean 'objective'"):
        build_config({"objectiv": {}})


def test_wrong_type_names_field():
    with pytest.raises(ConfigError, match=r"'train\.batch_size'.*(integer|int).*'many'"):
        build_config({}, ["train.batch_size=many"])


def test_out_of_range_lam():
    with pytest.raises(ConfigError, match=r"'objective\.apex_literal\.lam'.*less than or equal to 1"):
        build_config({}, ["objective.apex_literal.lam=1.5"])
    with pytest.raises(ConfigError, match=r"'objective\.apex_literal\.lam'.*greater than or equal to 0"):
        build_config({}, ["objective.apex_literal.lam=-0.1"])


def test_twinflow_batch_constraint():
    with pytest.raises(ConfigError, match=r"twinflow.*multiple of 4.*got 2"):
        build_config({}, ["objective.name=twinflow", "train.batch_size=2", "model.target_time=true"])
    with pytest.raises(ConfigError, match=r"twinflow.*target time.*model\.target_time=true"):
        build_config({}, ["objective.name=twinflow", "train.batch_size=8"])
    ok = build_config({}, ["objective.name=twinflow", "train.batch_size=8", "model.target_time=true"])
    assert ok.objective.name == "twinflow"


def test_unknown_objective_lists_choices():
    with pytest.raises(ConfigError, match=r"'objective\.name'.*'apex'.*'apex_literal'.*'twinflow'.*'fm'.*'regression'"):
        build_config({}, ["objective.name=gan"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        build_config({}, ["train.steps"])


def test_other_range_checks():
    with pytest.raises(ConfigError, match="time.min"):
        build_config({}, ["objective.time.min=0.9", "objective.time.max=0.1"])
    with pytest.raises(ConfigError, match="eval.nfe"):
        build_config({}, ["eval.nfe=[0]"])
    with pytest.raises(ConfigError, match="text_encoder.path is required"):
        build_config({}, ["text_encoder.kind=transformers"])


def test_shipped_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = list((root / "jobs" / "configs").glob("*.yaml")) + list((root / "platform" / "apexdistill" / "configs").glob("*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_text_fields_keep_override_text():
    cfg = build_config({}, ["run.name=2024", "data.source=imagefolder", "data.path=no", "run.workdir=2024-05-01"])
    assert cfg.run.name == "2024" and cfg.data.path == "no" and cfg.run.workdir == "2024-05-01"
    assert build_config({}, ["train.steps=12"]).train.steps == 12  # numbers stay numbers


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.strategy=ddp"], r"train.strategy='ddp' runs on Ray Train workers: set train.num_workers >= 1"),
        (["train.num_workers=2"], r"train.num_workers=2 needs a parallel strategy"),
        (["train.strategy=fsdp3", "train.num_workers=2"], r"'train.strategy'.*'none', 'ddp', 'fsdp2' or 'deepspeed'"),
        (["train.precision=bf16"], r"train.precision='bf16' is for GPU workers"),
        (["train.num_workers=2", "train.strategy=deepspeed", "train.deepspeed.stage=3"], r"stage=3.*EMA.*train.ema_decay=0"),
        (["train.num_workers=2", "train.strategy=deepspeed", "train.deepspeed.stage=3", "train.ema_decay=0", "objective.shift.learnable=true"],
         r"learnable=true is not supported with DeepSpeed ZeRO-3"),
        (["train.deepspeed.stage=4"], r"train.deepspeed.stage"),
        (["train.fail_at_step=3"], r"fail_at_step.*max_failures >= 1"),
        (["train.fail_at_step=3", "train.max_failures=1", "train.num_workers=1", "train.steps=3"], r"fail_at_step=3 must be below train.steps=3"),
        (["train.grad_accum_steps=0"], r"train.grad_accum_steps"),
        (["tracking.sample_every=-1"], r"tracking.sample_every"),
    ],
)
def test_parallel_setup_is_checked_at_config_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config({}, overrides)


def test_parallel_setups_that_are_fine():
    for overrides in (["train.num_workers=1"], ["train.num_workers=4", "train.strategy=fsdp2", "model.lora.enabled=true"],
                      ["train.num_workers=2", "train.strategy=deepspeed", "train.deepspeed.stage=3", "train.ema_decay=0"],
                      ["train.use_gpu=true", "train.precision=bf16", "train.num_workers=8", "train.strategy=fsdp2"]):
        cfg = build_config({}, overrides)
        assert cfg.train.num_workers >= 1
    assert build_config({}, ["train.use_gpu=true"]).train.use_bf16 and not build_config({}).train.use_bf16


def test_overrides_never_modify_the_callers_dict():
    base = {"objective": {"shift": {"a": -1.0}}}
    build_config(base, ["objective.shift.learnable=true"])
    assert base == {"objective": {"shift": {"a": -1.0}}}


def test_with_absolute_paths_resolves_local_relative_paths_only(tmp_path, monkeypatch):
    """Sweeps hand their base config to trials that run in Tune's trial folders."""
    from apexdistill.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(build_config({}, ["run.workdir=./runs", "data.cache_uri=s3://bucket/cache",
                                                "model.path=builtin:teacher", "data.source=parquet", "data.path=data/x.parquet"]))
    assert cfg.run.workdir == str(tmp_path / "runs") and cfg.data.path == str(tmp_path / "data" / "x.parquet")
    assert cfg.data.cache_uri == "s3://bucket/cache" and cfg.model.path == "builtin:teacher"


#: the measured recipe (README, "The apex recipe"): what `apexdistill demo` runs and what the README's tables score
RECIPE = {"lambda_g": 1.0, "lambda_p": 1.0, "lambda_r": 1.0, "generator_warmup_steps": 0, "generator_ramp_steps": 0,
          "anchor_t_max": 0.9, "consistency_weight": 1.0, "consistency_steps": 4, "consistency_solver": "midpoint",
          "consistency_time_shift": 0.67, "consistency_reference": "frozen", "consistency_bank_size": 2048,
          "generator_fraction": 0.5, "consistency_renoise_t": 0.6, "consistency_renoise_source": "data",
          "consistency_renoise_fraction": 0.5}


def test_the_default_apex_is_the_demo_recipe():
    """`objective: {name: apex}` and nothing else (how a user starts on a pipeline) trains the recipe the demo measured:
    the demo's config sets nothing under objective.apex, its resolved objective.apex is the library default, and that
    default carries every key of the recipe."""
    import yaml

    from apexdistill.config import ApexConfig
    from apexdistill.demo import DEMO_CONFIG, demo_config

    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    assert set(raw["objective"]) == {"name"} and raw["objective"]["name"] == "apex", raw["objective"]
    demo, user = demo_config("/tmp/unused").objective.apex, build_config({"objective": {"name": "apex"}}).objective.apex
    # the digits have no CFG: resolving a config turns the guidance ratio's "the teacher's" (None) into 0
    assert demo.guidance_ratio == user.guidance_ratio == 0
    assert demo == user and user.model_copy(update={"guidance_ratio": None}) == ApexConfig()
    assert {k: getattr(ApexConfig(), k) for k in RECIPE} == RECIPE
    assert build_config({}).objective.shift.a == -1.0 and build_config({}).objective.shift.b == 0.0


def test_the_recipe_needs_two_rows_a_batch_and_says_so():
    """generator_fraction 0.5 splits each per-rank batch in two: a batch of 1 is refused before any compute, naming both
    fields and the way out."""
    with pytest.raises(ConfigError, match=r"generator_fraction=0.5 .* train.batch_size must be at least 2, got 1 .*generator_fraction=1"):
        build_config({}, ["train.batch_size=1"])
    assert build_config({}, ["train.batch_size=1", "objective.apex.generator_fraction=1"]).train.batch_size == 1
    assert build_config({}, ["train.batch_size=1", "objective.name=fm"]).train.batch_size == 1


def test_every_shipped_config_and_sweep_states_its_recipe():
    """Each file under jobs/configs/ and sweeps/ says in a `# Recipe:` line which recipe it runs (the default apex recipe,
    the literal objective, or none), and it loads."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = sorted([*(root / "jobs" / "configs").glob("*.yaml"), *(root / "sweeps").glob("*.yaml")])
    assert len(files) >= 10
    for f in files:
        said = [line for line in f.read_text().splitlines() if line.lstrip().startswith("# Recipe: ")]
        assert len(said) == 1, f"{f.name}: one '# Recipe:' line, found {len(said)}"
    for f in (root / "jobs" / "configs").glob("distill_*.yaml"):
        assert load_config(f).objective.name == "apex"

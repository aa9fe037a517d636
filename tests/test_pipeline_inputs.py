"""What a stock pipeline folder in ``model.path`` feeds the platform, against the stock pipelines
themselves (diffusers 0.42): the cached latents, the prompt embeddings, the config defaults read from
the folder, the refusals of broken folders, and the cache key.

Three tiny pipelines (Sana, Qwen-Image, Z-Image) are built once offline from the real classes
(``Family.build_tiny_pipeline``) and loaded back with ``DiffusionPipeline.from_pretrained`` as a
user's checkpoint is.

Measured on CPU (fp32, torch single-threaded): latents from ``load_vae(folder).encode`` equal the
pipelines' own normalisation applied to the stock VAE with max abs difference 0.0 for all three
families (the same operations in the same order); ``decode`` equals the pipelines' decode with 0.0
for Sana and Z-Image and 6.6e-7 for Qwen-Image (QwenImagePipeline divides by ``1/std`` where the
adapter multiplies by ``std``: last-bit differences, amplified by the decoder). The embeddings from
``build_text_encoder(cfg.text_encoder)`` equal ``pipe.encode_prompt`` exactly (0.0), negative
prompts included. Asserted: ``TOL`` = 1e-6 for latents and embeddings, ``DECODE_TOL`` = 1e-5 for
decoded images (room for other BLAS builds).
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch

from apexdistill.config import ConfigError, build_config
from apexdistill.models.family import get_family

FAMILIES = ["sana", "qwenimage", "zimage"]
RES = 32
L = 24  # text_encoder.max_length for the tests (the pipelines default to 300 / 512)
PROMPTS = ["a red cat", "two dogs on grass, photo", "A big blue house in the sun"]
TOL = 1e-6  # latents and embeddings
DECODE_TOL = 1e-5  # decoded images (Qwen-Image: 1/std vs std)
#: measured max abs differences, printed at the end of the module (pytest -s) for the report
MEASURED: dict[str, float] = {}


def _overrides(folder: Path, *extra: str) -> list[str]:
    # Z-Image must state its teacher's guidance (Turbo 0.0, the base model 5.0): the base model's, the pipeline default
    index = json.loads((Path(folder) / "model_index.json").read_text()) if (Path(folder) / "model_index.json").is_file() else {}
    stated = ["teacher.guidance_scale=5.0"] if index.get("_class_name") == "ZImagePipeline" else []
    return [f"model.path={folder}", f"data.resolution={RES}", f"text_encoder.max_length={L}", *stated, *extra]


def test_zimage_refuses_a_teacher_guidance_it_cannot_guess(folders):
    """Z-Image-Turbo runs at guidance 0.0, the base model at ZImagePipeline's default 5.0: unstated, it is refused
    with the reason; stated, it is taken as given (Turbo: no CFG, so no guidance to distil)."""
    base = [f"model.path={folders['zimage']}", f"data.resolution={RES}", f"text_encoder.max_length={L}"]
    msg = _refused(base)
    assert "teacher.guidance_scale" in msg and "Turbo" in msg and "0.0" in msg and "5.0" in msg, msg
    turbo = build_config({}, [*base, "teacher.guidance_scale=0.0"])
    assert turbo.teacher.guidance_scale == 0.0 and turbo.objective.apex.guidance_ratio == 0.0
    assert build_config({}, _overrides(folders["sana"])).teacher.guidance_scale == 4.5  # Sana's documented default


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The three tiny stock pipelines, each in its own folder (built once for the module)."""
    return {name: get_family(name).build_tiny_pipeline(tmp_path_factory.mktemp(f"tiny-{name}") / "pipe", seed=0)
            for name in FAMILIES}


@pytest.fixture(scope="module")
def pipes(folders):
    from diffusers import DiffusionPipeline

    out = {}
    for name, folder in folders.items():
        pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        out[name] = pipe
    return out


@pytest.fixture(scope="module", autouse=True)
def report_measured():
    yield
    if MEASURED:
        print("\nmeasured max abs differences:\n" + "\n".join(f"  {k}: {v:.3g}" for k, v in sorted(MEASURED.items())))


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------- 1. cached latents


def _stock_encode(name: str, vae, images: torch.Tensor) -> torch.Tensor:
    """The pipelines' own normalisation on the stock VAE (DIFFUSERS_NOTES.md, "VAEs and latents")."""
    conf = vae.config
    if name == "sana":
        return vae.encode(images).latent * conf.scaling_factor
    if name == "qwenimage":
        latent = vae.encode(images[:, :, None]).latent_dist.mean  # (B, C, 1, h, w)
        mean = torch.tensor(conf.latents_mean).view(1, conf.z_dim, 1, 1, 1).to(latent)
        std = torch.tensor(conf.latents_std).view(1, conf.z_dim, 1, 1, 1).to(latent)
        return ((latent - mean) / std)[:, :, 0]
    return (vae.encode(images).latent_dist.mean - conf.shift_factor) * conf.scaling_factor


def _stock_decode(name: str, vae, z: torch.Tensor) -> torch.Tensor:
    """As each pipeline's ``__call__`` decodes its final latents."""
    conf = vae.config
    if name == "sana":
        return vae.decode(z / conf.scaling_factor, return_dict=False)[0]
    if name == "qwenimage":
        z5 = z[:, :, None]
        mean = torch.tensor(conf.latents_mean).view(1, conf.z_dim, 1, 1, 1).to(z5)
        std_inv = 1.0 / torch.tensor(conf.latents_std).view(1, conf.z_dim, 1, 1, 1).to(z5)  # QwenImagePipeline's form
        return vae.decode(z5 / std_inv + mean, return_dict=False)[0][:, :, 0]
    return vae.decode(z / conf.scaling_factor + conf.shift_factor, return_dict=False)[0]


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_cached_latents_match_stock_pipeline(name, folders, pipes):
    from apexdistill.models.vae import DCVae, QwenVae, Vae, load_vae

    vae = load_vae(folders[name])
    expected_cls = {"sana": DCVae, "qwenimage": QwenVae, "zimage": Vae}[name]
    assert type(vae) is expected_cls
    stock = pipes[name].vae.eval()
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, RES, RES, generator=gen) * 2 - 1  # [-1, 1] RGB

    latents = vae.encode(images)
    ref = _stock_encode(name, stock, images)
    diff = _maxdiff(latents, ref)
    MEASURED[f"{name} latents (encode)"] = diff
    assert diff <= TOL, f"{name}: load_vae(...).encode differs from the pipeline's normalised latents by {diff}"
    assert latents.dtype == torch.float32 and latents.std() > 0.01  # a real latent, not zeros
    assert tuple(latents.shape[1:]) == vae.latent_shape(RES), f"{name}: latent_shape({RES}) != encoded {tuple(latents.shape)}"

    decoded = vae.decode(latents)
    ref_img = _stock_decode(name, stock, latents)
    diff = _maxdiff(decoded, ref_img)
    MEASURED[f"{name} images (decode)"] = diff
    assert diff <= DECODE_TOL, f"{name}: decode differs from the pipeline's decode by {diff}"
    assert decoded.shape == images.shape


def test_vae_identities_differ(folders):
    from apexdistill.models.vae import load_vae

    identities = {name: load_vae(folders[name]).identity for name in FAMILIES}
    assert len(set(identities.values())) == 3, identities
    assert "AutoencoderDC" in identities["sana"] and "AutoencoderKLQwenImage" in identities["qwenimage"]
    assert ":AutoencoderKL:" in identities["zimage"]


# ----------------------------------------------------------------------------- 2. embeddings through config


def _call_default(cls, argument: str):
    return inspect.signature(cls.__call__).parameters[argument].default


def _reference(name: str, pipe) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(per-prompt valid states from ``pipe.encode_prompt``, the negative's valid states (n, D))."""
    if name == "sana":
        from diffusers import SanaPipeline

        chi = _call_default(SanaPipeline, "complex_human_instruction")
        emb, mask, neg, neg_mask = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=True, negative_prompt="",
                                                      clean_caption=False, max_sequence_length=L,
                                                      complex_human_instruction=chi)
        assert emb.shape[1] == L and neg.shape[1] == L
        # Sana keeps all L positions (padding included) with the mask: compare them all
        return [emb[i] for i in range(len(PROMPTS))], neg[0], mask, neg_mask
    if name == "qwenimage":
        emb, mask = pipe.encode_prompt(list(PROMPTS), max_sequence_length=L)
        neg, neg_mask = pipe.encode_prompt([" "], max_sequence_length=L)
        mask = torch.ones(emb.shape[:2], dtype=torch.long) if mask is None else mask
        neg_mask = torch.ones(neg.shape[:2], dtype=torch.long) if neg_mask is None else neg_mask
        valid = [emb[i, : int(mask[i].sum())] for i in range(len(PROMPTS))]
        return valid, neg[0, : int(neg_mask[0].sum())], None, None
    emb, _ = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False, max_sequence_length=L)
    _, neg = pipe.encode_prompt([""], do_classifier_free_guidance=True, negative_prompt=[""], max_sequence_length=L)
    return list(emb), neg[0], None, None


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_config_embeddings_match_encode_prompt(name, folders, pipes):
    from apexdistill.models.text import build_text_encoder

    folder = folders[name]
    cfg = build_config({}, _overrides(folder))
    family = get_family(name)
    pipe_cls = family.pipeline_cls()
    # what the config read from the pipeline folder
    assert cfg.model.backbone == name
    assert cfg.text_encoder.kind == "pipeline" and cfg.text_encoder.path == str(folder)
    assert cfg.text_encoder.max_length == L
    assert cfg.vae.path == str(folder) and cfg.data.channels == 3
    argument = {"sana": "guidance_scale", "qwenimage": "true_cfg_scale", "zimage": "guidance_scale"}[name]
    scale = _call_default(pipe_cls, argument)
    assert cfg.teacher.guidance_scale == pytest.approx(scale)
    assert scale == {"sana": 4.5, "qwenimage": 4.0}.get(name, scale)
    ratio = scale if name == "zimage" else scale - 1.0
    assert cfg.objective.apex.guidance_ratio == pytest.approx(ratio)

    encoder = build_text_encoder(cfg.text_encoder)
    states, mask = encoder.encode(list(PROMPTS))
    neg, neg_mask = encoder.encode_negative()
    pipe = pipes[name]
    dim = family.text_dim(dict(pipe.transformer.config))  # the width the transformer takes
    assert states.shape == (len(PROMPTS), L, dim) and states.dtype == torch.float32 and mask.dtype == torch.int64
    assert neg.shape == (1, L, dim) and neg_mask.shape == (1, L)
    assert encoder.dim == dim

    valid, neg_ref, ref_mask, ref_neg_mask = _reference(name, pipe)
    worst = 0.0
    for i, r in enumerate(valid):
        n = r.shape[0]
        worst = max(worst, _maxdiff(states[i, :n], r))
        if ref_mask is None:  # Qwen-Image / Z-Image: valid tokens, then zeros with mask 0
            assert mask[i, :n].eq(1).all() and mask[i, n:].eq(0).all(), f"{name} prompt {i}: mask is not {n} ones then zeros"
            assert states[i, n:].eq(0).all(), f"{name} prompt {i}: padding is not zero"
    if ref_mask is not None:
        assert torch.equal(mask, ref_mask.long()) and torch.equal(neg_mask, ref_neg_mask[:1].long())
    MEASURED[f"{name} embeddings"] = worst
    assert worst <= TOL, f"{name}: embeddings differ from pipe.encode_prompt by {worst}"

    n = neg_ref.shape[0]
    diff = _maxdiff(neg[0, :n], neg_ref)
    MEASURED[f"{name} negative embedding"] = diff
    assert diff <= TOL, f"{name}: negative embedding differs from the pipeline's by {diff}"
    if ref_mask is None:
        assert neg_mask[0, :n].eq(1).all() and neg_mask[0, n:].eq(0).all() and neg[0, n:].eq(0).all()
    # the prompts really differ (no degenerate encoder): different lengths or states
    assert not torch.equal(states[0], states[1])


# ----------------------------------------------------------------------------- 3. refused inputs


def _copy(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))


def _refused(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        build_config({}, overrides)
    return str(info.value)


def test_refuses_unsupported_pipeline_class(folders, tmp_path):
    copy = _copy(folders["sana"], tmp_path)
    _edit_json(copy / "model_index.json", _class_name="FluxPipeline")
    msg = _refused(_overrides(copy))
    assert "FluxPipeline" in msg
    for supported in ("SanaPipeline", "QwenImagePipeline", "ZImagePipeline"):
        assert supported in msg, msg


@pytest.mark.parametrize("name", ["sana", "zimage"])
def test_refuses_missing_vae(name, folders, tmp_path):
    copy = _copy(folders[name], tmp_path)
    shutil.rmtree(copy / "vae")
    msg = _refused(_overrides(copy))
    assert "has no vae" in msg and str(copy / "vae") in msg, msg


def test_refuses_unlisted_tokenizer(folders, tmp_path):
    copy = _copy(folders["qwenimage"], tmp_path)
    _edit_json(copy / "model_index.json", tokenizer=None)
    msg = _refused(_overrides(copy))
    assert "has no tokenizer" in msg and "model_index.json does not list it" in msg, msg


def test_refuses_text_width_mismatch(folders, tmp_path):
    copy = _copy(folders["sana"], tmp_path)
    width = json.loads((copy / "text_encoder" / "config.json").read_text())["hidden_size"]
    _edit_json(copy / "transformer" / "config.json", caption_channels=width + 8)
    msg = _refused(_overrides(copy))
    assert f"width {width + 8}" in msg and f"gives {width}" in msg, msg


def test_refuses_an_own_text_encoder_of_the_wrong_width(folders):
    msg = _refused(_overrides(folders["sana"], "text_encoder.kind=minilm"))
    assert "gives 384" in msg and "text_encoder.kind=pipeline" in msg, msg


def test_refuses_resolution_off_the_grid(folders):
    msg = _refused([f"model.path={folders['sana']}", "data.resolution=30", f"text_encoder.max_length={L}"])
    # tiny Sana: AutoencoderDC f2 x patch 2 = 4
    assert "data.resolution=30" in msg and "VAE factor 2" in msg and "patch size 2" in msg and "= 4" in msg, msg


def test_refuses_text_encoder_without_tokenizer(folders, tmp_path):
    copy = _copy(folders["sana"], tmp_path)
    shutil.rmtree(copy / "tokenizer")
    encoder = copy / "text_encoder"
    msg = _refused(_overrides(folders["sana"], "text_encoder.kind=pipeline", f"text_encoder.path={encoder}"))
    assert "no tokenizer" in msg and f"'{encoder}'" in msg and f"'{copy / 'tokenizer'}'" in msg, msg


def test_refuses_backbone_that_contradicts_the_pipeline(folders):
    msg = _refused(_overrides(folders["sana"], "model.backbone=qwenimage"))
    assert "qwenimage" in msg and "SanaPipeline" in msg and "sana" in msg, msg


# ----------------------------------------------------------------------------- 4. cache key


def _key(overrides: list[str]) -> str:
    from apexdistill.data.cache import cache_spec
    from apexdistill.data.sources import build_source

    cfg = build_config({}, overrides)
    return cache_spec(cfg, build_source(cfg.data)).key


def test_cache_key_follows_prompt_settings(folders):
    sana, qwen = _overrides(folders["sana"]), _overrides(folders["qwenimage"])
    assert _key(sana) == _key(list(sana))  # identical configs, same key
    assert _key(sana) != _key(sana + ["text_encoder.complex_human_instruction=[]"])
    assert _key(sana) != _key(sana + ["text_encoder.negative_prompt=blurry"])
    assert _key(qwen) == _key(list(qwen))
    assert _key(qwen) != _key(qwen + ["text_encoder.negative_prompt=blurry"])
    assert _key(sana) != _key(qwen)

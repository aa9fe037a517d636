"""eval/: the digit classifier and its cache, Frechet distance, the evaluator, generation, grids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from apexdistill.data.digits import load_digits_split
from apexdistill.eval import (
    DigitClassifier,
    DigitEvaluator,
    EvalRow,
    evaluate_rows,
    frechet_distance,
    frechet_distance_from_stats,
    generate,
    image_grid_array,
    load_feature_extractor,
    load_or_train_classifier,
    save_grid,
)
from apexdistill.eval.classifier import train_classifier
from apexdistill.eval.runner import format_table

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated upstream


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The networks here are tiny: one thread is as fast as two and does not collapse (measured 30x)
    when other processes share the machine's cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("classifier_cache")
    model, info = load_or_train_classifier(cache, resolution=16, shipped=False)  # trained here, not the shipped one
    return cache, model, info


@pytest.fixture(scope="module")
def evaluator(trained):
    return DigitEvaluator(trained[1], resolution=16, test_fraction=0.2, split_seed=0)


# ----------------------------------------------------------------------------- classifier


def test_classifier_accuracy_on_real_test_split(trained):
    _, model, info = trained
    assert info["from_cache"] is False
    assert info["test_accuracy"] >= 0.95, info
    assert info["n_test"] == 360 and info["n_train"] == 1437
    logits = model(torch.zeros(3, 1, 16, 16))
    assert logits.shape == (3, 10) and model.features(torch.zeros(3, 1, 16, 16)).shape == (3, 64)


@pytest.mark.parametrize("resolution", [8, 16, 33, 64])
def test_classifier_shapes_at_any_resolution(resolution):
    model = DigitClassifier()
    x = torch.rand(2, 1, resolution, resolution) * 2 - 1
    assert model(x).shape == (2, 10) and model.features(x).shape == (2, 64)
    with pytest.raises(ValueError, match="expects"):
        model(torch.zeros(2, 3, 16, 16))


def test_second_load_hits_the_cache(trained):
    cache, model, info = trained
    weights, meta = cache / "digit_classifier_v1_r16_tf0.2_split0_seed0.safetensors", cache / "digit_classifier_v1_r16_tf0.2_split0_seed0.json"
    assert str(weights) == info["weights_path"] and weights.is_file() and meta.is_file()
    before = (weights.stat().st_mtime_ns, meta.stat().st_mtime_ns)
    again, info2 = load_or_train_classifier(cache, resolution=16, shipped=False)
    assert info2["from_cache"] is True and info2["shipped"] is False
    assert (weights.stat().st_mtime_ns, meta.stat().st_mtime_ns) == before
    assert info2["test_accuracy"] == info["test_accuracy"]
    assert json.loads(meta.read_text())["test_accuracy"] == info["test_accuracy"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]  # atomic writes left no temp files


def test_the_default_split_scores_with_the_shipped_classifier(tmp_path):
    """The evaluator's default classifier is the package's (the same network on every machine): loaded,
    not trained, nothing written to the cache folder; measured here, it is a trained classifier."""
    from apexdistill.assets import EVALUATOR
    from apexdistill.eval.classifier import classifier_accuracy

    model, info = load_or_train_classifier(tmp_path / "cache", resolution=16)
    assert info["shipped"] is True and Path(info["weights_path"]).parent == EVALUATOR
    assert not (tmp_path / "cache").exists()
    test = load_digits_split("test", 16, 0.2, 0)
    assert classifier_accuracy(model, test.images, test.labels) >= 0.95


def test_training_is_deterministic():
    a, info_a = train_classifier(16, epochs=1)
    b, info_b = train_classifier(16, epochs=1)
    assert info_a["test_accuracy"] == info_b["test_accuracy"]
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


# ----------------------------------------------------------------------------- Frechet distance


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(500, 16, generator=gen) @ torch.randn(16, 16, generator=gen)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    small, large = frechet_distance(feats, feats + 0.5), frechet_distance(feats, feats + 1.0)
    # A pure mean shift by s in every one of 16 dimensions leaves the covariance: FD = 16 s^2.
    assert small == pytest.approx(16 * 0.25, rel=1e-6)
    assert large == pytest.approx(16 * 1.0, rel=1e-6)
    assert frechet_distance(feats, feats * 1.5) > 0.1


def test_fd_matches_closed_form_for_two_gaussians():
    rng = np.random.default_rng(0)
    d = 6
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # shared eigenbasis: the covariances commute
    var_a, var_b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    cov_a, cov_b = (q * var_a) @ q.T, (q * var_b) @ q.T
    closed = float(((mu_a - mu_b) ** 2).sum() + (var_a + var_b - 2 * np.sqrt(var_a * var_b)).sum())
    # exact statistics
    assert frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) == pytest.approx(closed, rel=1e-9)
    # large samples
    xa = rng.multivariate_normal(mu_a, cov_a, size=200_000)
    xb = rng.multivariate_normal(mu_b, cov_b, size=200_000)
    assert frechet_distance(torch.from_numpy(xa), torch.from_numpy(xb)) == pytest.approx(closed, rel=0.03)


def test_fd_agrees_with_scipy_sqrtm_for_non_commuting_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    cov_a, cov_b = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu_a, mu_b = rng.normal(size=5), rng.normal(size=5)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    reference = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
    assert frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) == pytest.approx(reference, rel=1e-8)


def test_fd_rejects_bad_shapes():
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="at least 2 rows"):
        frechet_distance(torch.randn(1, 3), torch.randn(10, 3))


# ----------------------------------------------------------------------------- evaluator


def test_real_images_score_well_and_noise_scores_badly(evaluator):
    train = load_digits_split("train", 16, 0.2, 0)
    real = evaluator.score(train.images, train.labels)
    assert real["accuracy"] >= 0.95
    assert real["fd"] == pytest.approx(evaluator.floor_fd, rel=1e-9)  # train vs test is the floor itself
    assert evaluator.real_accuracy >= 0.95
    noise = torch.rand(1000, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = evaluator.score(noise, torch.arange(10).repeat(100))
    assert bad["fd"] > 20 * evaluator.floor_fd
    assert bad["accuracy"] < 0.5


def test_scripted_classifier_and_plain_feature_network(evaluator, trained, tmp_path):
    torch.jit.script(trained[1]).save(str(tmp_path / "clf.pt"))
    scripted = DigitEvaluator(load_feature_extractor(tmp_path / "clf.pt"), resolution=16)
    assert scripted.is_classifier
    assert scripted.floor_fd == pytest.approx(evaluator.floor_fd, rel=1e-5)
    assert scripted.real_accuracy == evaluator.real_accuracy

    class PixelFeatures(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.avg_pool2d(x, 4).flatten(1)

    torch.jit.trace(PixelFeatures(), torch.zeros(2, 1, 16, 16)).save(str(tmp_path / "feat.pt"))
    plain = DigitEvaluator(load_feature_extractor(tmp_path / "feat.pt"), resolution=16)
    assert not plain.is_classifier
    test = load_digits_split("test", 16, 0.2, 0)
    scores = plain.score(test.images, test.labels)
    assert scores["accuracy"] is None and scores["fd"] == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_feature_extractor(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- generation


class ExactVelocity(torch.nn.Module):
    """v = (x_t - target) / t: the exact velocity of the straight path toward a per-class target,
    read from a one-hot text table. Any sampler that integrates it correctly lands on the target."""

    def __init__(self, targets: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("targets", targets)
        self.scale = torch.nn.Parameter(torch.ones(()))  # so the model has a device and a training flag

    def forward(self, x, t, text, text_mask):
        target = self.targets[text[:, 0, :10].argmax(1)]
        return self.scale * (x - target) / t.clamp_min(1e-6).view(-1, 1, 1, 1)


def _tables():
    text = torch.zeros(10, 3, 12)
    text[torch.arange(10), 0, torch.arange(10)] = 1.0
    return text, torch.ones(10, 3, dtype=torch.bool)


@pytest.mark.parametrize("sampler,nfe", [("few_step", 1), ("few_step", 4), ("euler", 8)])
def test_generate_with_exact_velocity_returns_the_target(sampler, nfe):
    targets = torch.linspace(-0.9, 0.9, 10).view(10, 1, 1, 1).expand(10, 1, 16, 16).contiguous()
    model = ExactVelocity(targets).train()
    text, mask = _tables()
    images, labels, ms = generate(model, text, mask, nfe, sampler, samples_per_class=7, batch_size=16, resolution=16)
    assert images.shape == (70, 1, 16, 16) and labels.shape == (70,)
    assert torch.bincount(labels, minlength=10).tolist() == [7] * 10
    assert torch.allclose(images, targets[labels], atol=1e-4)
    assert ms > 0
    assert model.training  # the caller's mode is restored


def test_generate_uses_the_same_noise_whatever_the_batch_size():
    text, mask = _tables()
    identity = lambda x, t, text, text_mask: x  # noqa: E731  1 NFE gives x - 0.999 x = 0.001 z
    a, _, _ = generate(identity, text, mask, 1, "few_step", samples_per_class=5, batch_size=7, seed=3)
    b, _, _ = generate(identity, text, mask, 1, "few_step", samples_per_class=5, batch_size=50, seed=3)
    c, _, _ = generate(identity, text, mask, 1, "few_step", samples_per_class=5, batch_size=50, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="sampler"):
        generate(identity, text, mask, 1, "heun", samples_per_class=1)  # type: ignore[arg-type]


def test_evaluate_rows_scores_each_nfe(evaluator):
    test = load_digits_split("test", 16, 0.2, 0)
    first_of_class = torch.stack([test.images[test.labels == k][0] for k in range(10)])
    text, mask = _tables()
    rows = evaluate_rows("exact", ExactVelocity(first_of_class), evaluator, text, mask, [1, 2], "few_step", samples_per_class=10)
    assert [r.nfe for r in rows] == [1, 2] and all(isinstance(r, EvalRow) for r in rows)
    assert all(r.accuracy is not None and r.accuracy >= 0.9 for r in rows)
    assert set(rows[0].as_dict()) == {"model", "nfe", "accuracy", "fd", "ms_per_image", "fd_std", "draws"}
    assert rows[0].as_dict()["model"] == "exact" and rows[0].fd > evaluator.floor_fd  # 10 images, no diversity
    assert rows[0].draws == 1 and rows[0].fd_std is None


def test_evaluate_rows_averages_independent_noise_draws(evaluator):
    test = load_digits_split("test", 16, 0.2, 0)
    first_of_class = torch.stack([test.images[test.labels == k][0] for k in range(10)])
    text, mask = _tables()
    model = ExactVelocity(first_of_class)
    with torch.no_grad():
        model.scale.fill_(0.7)  # 1 NFE lands at 0.7*target + 0.3*z: every noise draw scores differently
    (both,) = evaluate_rows("m", model, evaluator, text, mask, [1], "few_step", draws=2, samples_per_class=10, seed=5)
    singles = [evaluate_rows("m", model, evaluator, text, mask, [1], "few_step", samples_per_class=10, seed=5 + 1000 * i)[0]
               for i in range(2)]
    assert abs(singles[0].fd - singles[1].fd) > 1e-3
    assert both.fd == pytest.approx((singles[0].fd + singles[1].fd) / 2, rel=1e-9)
    assert both.fd_std == pytest.approx(abs(singles[0].fd - singles[1].fd) / 2**0.5, rel=1e-9)
    assert both.accuracy == pytest.approx((singles[0].accuracy + singles[1].accuracy) / 2)
    assert both.draws == 2 and both.ms_per_image > 0
    table = format_table([both], evaluator.floor_fd)
    assert f"+-{both.fd_std:.2f}" in table and "means over 2 noise draws" in table
    assert "spread" not in format_table(singles)
    mixed = [EvalRow("teacher", 50, 0.99, 3.0, 28.0, fd_std=0.2, draws=3), EvalRow("student", 1, 0.99, 3.7, 0.5, fd_std=0.3, draws=10)]
    assert "means over 10 noise draws; teacher at 50 NFE: the first 3;" in format_table(mixed)
    with pytest.raises(ValueError, match="draws"):
        evaluate_rows("m", model, evaluator, text, mask, [1], "few_step", draws=0, samples_per_class=10)


# ----------------------------------------------------------------------------- grids


def test_save_grid_writes_png_of_expected_size(tmp_path):
    images = torch.full((20, 1, 16, 16), -1.0)
    images[3] = 1.0
    path = save_grid(images, tmp_path / "sub" / "grid.png", nrow=10, scale=4)
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (10 * 64 + 11 * 2, 2 * 64 + 3 * 2)
        pixels = np.asarray(img.convert("L"))
    assert pixels[2 + 10, 2 + 3 * 66 + 10] == 255 and pixels[2 + 10, 2 + 10] == 0  # tile 3 white, tile 0 black
    titled = image_grid_array(images, nrow=10, scale=4, labels_text=["first", "second"])
    assert titled.dtype == np.uint8 and titled.shape[0] == 134 and titled.shape[1] > 662 and titled.shape[2] == 3
    with pytest.raises(ValueError, match="labels_text"):
        image_grid_array(images, nrow=10, labels_text=["only one"])

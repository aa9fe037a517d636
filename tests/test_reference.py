"""The teacher's 50-step reference row that the demo ships (assets/teacher_reference.json): recomputed here
from the shipped teacher and evaluator, and used only for exactly the settings it was scored with."""

from __future__ import annotations

import pytest

from apexdistill.demo import demo_config
from apexdistill.eval.runner import DigitsBench, load_references, shipped_reference, shipped_reference_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bench(tmp_path_factory, minilm_states):
    cfg = demo_config(str(tmp_path_factory.mktemp("reference")))
    text, mask = minilm_states
    return cfg, DigitsBench(cfg, text, mask)


def test_the_shipped_row_is_the_teacher_scored_again(bench, one_thread):
    """Its first noise draw is scored again, 1000 images at 50 Euler steps (the other draws differ only in
    the seed). Tolerance: 1% of the FD proxy and 3 images of accuracy, for another CPU's float round-off
    (measured on the machine that wrote it: equal to the last digit)."""
    from apexdistill.models.build import build_backbone

    cfg, b = bench
    e = cfg.eval
    entry = shipped_reference(cfg, b.classifier_info, e.teacher_nfe, "euler", e.reference_draws)
    assert entry is not None, "the demo's settings have no shipped reference row: regenerate it with python jobs/teacher_reference.py"
    assert len(entry["fd_draws"]) == len(entry["accuracy_draws"]) == e.reference_draws == 3
    assert entry["provenance"]["command"].startswith("python jobs/teacher_reference.py") and entry["provenance"]["commit"]
    teacher = build_backbone(cfg.model, 1, cfg.data.resolution, b.text_table.shape[-1]).eval()
    (row,) = b.score("teacher", teacher, [e.teacher_nfe], "euler", draws=1)
    assert row.fd == pytest.approx(entry["fd_draws"][0], rel=1e-2)
    assert row.accuracy == pytest.approx(entry["accuracy_draws"][0], abs=0.003)
    # the row the demo prints: the mean of the shipped draws, with their spread
    shipped, provenance = b.reference("teacher", teacher, e.teacher_nfe, "euler", e.reference_draws)
    assert provenance == entry["provenance"] and shipped.draws == 3
    assert shipped.fd == pytest.approx(sum(entry["fd_draws"]) / 3) and shipped.fd_std > 0


def test_other_settings_are_scored_not_looked_up(bench, tmp_path):
    cfg, b = bench
    e = cfg.eval
    assert shipped_reference_for(cfg)  # the demo's estimate up front knows it needs no reference draws
    assert shipped_reference(cfg, b.classifier_info, e.teacher_nfe, "euler", e.reference_draws) is not None
    for overrides in (["eval.samples_per_class=50"], ["eval.seed=1"], ["eval.teacher_nfe=10"], ["eval.teacher_noise_draws=2"]):
        other = demo_config(str(tmp_path), overrides=overrides)
        assert shipped_reference(other, b.classifier_info, other.eval.teacher_nfe, "euler", other.eval.reference_draws) is None, overrides
        assert not shipped_reference_for(other), overrides
    # a user's own feature network, or another classifier: nothing shipped applies
    assert shipped_reference(cfg, {**b.classifier_info, "classifier_shipped": False}, e.teacher_nfe, "euler", 3) is None
    assert all(r["key"]["model"]["path"] == "builtin:teacher" for r in load_references())

"""Evaluation: quality metrics (FD proxy, prompt accuracy) and speed, sample grids.

Pure PyTorch, no Ray and no MLflow: the train and tracking layers wrap these functions.
"""

from apexdistill.eval.classifier import DigitClassifier, load_or_train_classifier
from apexdistill.eval.generate import evaluate_rows, generate
from apexdistill.eval.grid import image_grid_array, save_grid
from apexdistill.eval.metrics import (
    DigitEvaluator,
    EvalRow,
    FeatureExtractor,
    build_evaluator,
    frechet_distance,
    frechet_distance_from_stats,
    load_feature_extractor,
)

__all__ = [
    "DigitClassifier",
    "DigitEvaluator",
    "EvalRow",
    "FeatureExtractor",
    "build_evaluator",
    "evaluate_rows",
    "frechet_distance",
    "frechet_distance_from_stats",
    "generate",
    "image_grid_array",
    "load_feature_extractor",
    "load_or_train_classifier",
    "save_grid",
]

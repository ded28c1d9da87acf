"""Each tracker's settings (config key export.<tracker>, or the options of `ckpt-stability export <tracker>`),
with their defaults: the trackers' local stores under results/export/. Light to import: the command line
reads the defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ckpt_stability import layout


@dataclass(frozen=True)
class TensorBoardSettings:
    logdir: Path = Path(layout.EXPORT_DIR) / "tensorboard"
    """TensorBoard's log directory, e.g. the training's own"""


@dataclass(frozen=True)
class WandbSettings:
    project: str
    entity: str | None = None
    """the team or user; None: W&B's default entity"""
    group: str | None = None
    """the runs' group; None: each training run's name"""
    mode: str = "offline"
    """offline (runs written under dir, for `wandb sync`) or online"""
    dir: Path = Path(layout.EXPORT_DIR) / "wandb"


@dataclass(frozen=True)
class MlflowSettings:
    tracking_uri: str = f"sqlite:///{layout.EXPORT_DIR}/mlflow.db"
    experiment: str = "ckpt-stability"

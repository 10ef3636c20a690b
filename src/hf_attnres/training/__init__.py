"""Continued pretraining of AttnRes models with Accelerate: `hf-attnres train`, `hf-attnres eval` and the
end-to-end job `hf-attnres run` (see `pipeline.py`).

    from hf_attnres.training import TrainConfig, train
    result = train(TrainConfig(model="converted/", output_dir="runs/x", max_steps=100))
"""

from .config import TrainConfig
from .evaluate import evaluate
from .trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "evaluate", "train"]

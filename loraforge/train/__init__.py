"""Training: `train(config)` runs one fine-tuning job in its run folder (see loop.py, read top to bottom)."""

from loraforge.train.loop import TrainResult, total_steps, train

__all__ = ["TrainResult", "total_steps", "train"]

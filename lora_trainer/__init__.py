"""lora-scripts core: captions → dataset → latents → model → lora → train → export → sample.

Importing this package loads nothing heavy: torch, diffusers and the models are imported by the
functions that need them.
"""

from .callbacks import Callbacks, HostInterface
from .config import TrainConfig, config_from_dict, field_help, load_config
from .errors import ConfigError, DatasetError, LoraTrainerError, ModelError, ResumeError, TrainingError

__all__ = [
    "Callbacks", "HostInterface", "TrainConfig", "config_from_dict", "field_help", "load_config",
    "ConfigError", "DatasetError", "LoraTrainerError", "ModelError", "ResumeError", "TrainingError", "train",
]


def train(*args, **kwargs):
    """See `lora_trainer.training.loop.train` (imported lazily: it pulls in torch)."""
    from .training.loop import train as _train

    return _train(*args, **kwargs)

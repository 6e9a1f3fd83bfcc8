"""ofsdpo: online and continual preference alignment (DPO, OFS-DPO, COFS-DPO) on transformers + peft."""

from .config import ConfigError, OFSDPOConfig
from .data import DataError, PreferenceData, load_preference_data
from .losses import chase_loss, dpo_loss
from .trainer import OFSDPOTrainer

__version__ = "0.1.0"
__all__ = ["OFSDPOConfig", "OFSDPOTrainer", "ConfigError", "DataError", "PreferenceData", "load_preference_data",
           "dpo_loss", "chase_loss", "__version__"]

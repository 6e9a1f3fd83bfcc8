"""ofsdpo: online and continual preference alignment (DPO, OFS-DPO, COFS-DPO) on transformers + peft."""

from importlib import import_module

__version__ = "0.1.0"
__all__ = ["OFSDPOConfig", "OFSDPOTrainer", "ConfigError", "DataError", "PreferenceData", "load_preference_data",
           "dpo_loss", "chase_loss", "__version__"]

# imported on first use (PEP 562): the CLI's `--help` must not wait for torch and transformers
_WHERE = {"OFSDPOConfig": "config", "ConfigError": "errors", "DataError": "errors", "PreferenceData": "data",
          "load_preference_data": "data", "dpo_loss": "losses", "chase_loss": "losses", "OFSDPOTrainer": "trainer"}


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

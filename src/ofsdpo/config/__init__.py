"""Typed configuration, loadable from YAML and overridable from the CLI: one dataclass per command.

One field per flag: `ofsdpo train --max-steps 10` sets `max_steps`, and a YAML file given with `--config` uses the
same names (dashes or underscores). Validation happens in `__post_init__`, before any model is loaded, and every
message names the flag to change.

- `base`: the help and type check of a field, `ModelOptions` (the model fields, defined once), YAML reading;
- `train`: `TrainingOptions` (what every training stage receives) and `OFSDPOConfig` (`ofsdpo train`);
- `continual`: `ContinualConfig`, its `--domain` specs and the `--search` policy;
- `commands`: generate, eval and export; `demo`: the demo and its scale settings;
- `experiment`: an experiment file's schema, `ofsdpo compare` and `ofsdpo experiment`.

Everything is re-exported here: `from ofsdpo.config import X` is the import to use.
"""

from ..errors import ConfigError, NonFiniteError
from .base import (CADENCE, COMPUTED, OPTION_TAGS, OUTPUT, ROLES, RUNTIME, ModelOptions, changed_options,
                   check_field_types, field_names, option_roles, options_with_role, read_config_file)
from .commands import EvalConfig, ExportConfig, GenerateConfig
from .continual import (RESUME_MAY_CHANGE, SAFE_NAME, TRAIN_ONLY, WEIGHTS_ONLY, ContinualConfig, ContinualOptions, DomainSpec,
                        refuse_train_only, resolve_search)
from .demo import DEMO_DOMAINS, DEMO_FULL, DEMO_QUICK, DemoConfig, DemoSettings
from .experiment import (EXPERIMENT_KINDS, IN_DOMAIN_METHODS, CompareConfig, CompareOptions, ExperimentCommandConfig,
                         ExperimentConfig)
from .train import ON_PROMPTS, OFSDPOConfig, TrainingOptions

__all__ = ["CADENCE", "COMPUTED", "OPTION_TAGS", "OUTPUT", "ROLES", "RUNTIME", "option_roles", "options_with_role",
           "WEIGHTS_ONLY",
           "DEMO_DOMAINS", "DEMO_FULL", "DEMO_QUICK", "EXPERIMENT_KINDS", "IN_DOMAIN_METHODS", "ON_PROMPTS",
           "RESUME_MAY_CHANGE", "SAFE_NAME", "TRAIN_ONLY", "CompareConfig", "CompareOptions", "ConfigError",
           "ContinualConfig", "ContinualOptions", "DemoConfig", "DemoSettings", "DomainSpec", "EvalConfig",
           "ExperimentCommandConfig", "ExperimentConfig", "ExportConfig", "GenerateConfig", "ModelOptions",
           "NonFiniteError", "OFSDPOConfig", "TrainingOptions", "changed_options", "check_field_types", "field_names",
           "read_config_file", "refuse_train_only", "resolve_search"]

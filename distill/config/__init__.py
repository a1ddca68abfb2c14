"""The run config: the typed schema (`schema.py`) and how a YAML file becomes one (`files.py`)."""

from distill.config.files import apply_override, build_config, dump_config, load_config, read_yaml
from distill.config.schema import (
    DataConfig,
    EvalConfig,
    FeatureConfig,
    LayerPair,
    ModelConfig,
    ObjectiveConfig,
    OnPolicyConfig,
    RationaleConfig,
    RunConfig,
    Section,
    TrainConfig,
)

__all__ = [
    "DataConfig", "EvalConfig", "FeatureConfig", "LayerPair", "ModelConfig", "ObjectiveConfig", "OnPolicyConfig",
    "RationaleConfig", "RunConfig", "Section", "TrainConfig", "apply_override", "build_config", "dump_config",
    "load_config", "read_yaml",
]

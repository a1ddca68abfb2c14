"""The run config: the typed schema (`schema.py`, with `base.py`, `model.py`, `evaluation.py`, `methods.py`) and how a
YAML file becomes one (`files.py`)."""

from distill.config.base import Section
from distill.config.evaluation import EvalConfig
from distill.config.files import apply_override, build_config, dump_config, load_config, read_yaml
from distill.config.methods import FeatureConfig, LayerPair, OnPolicyConfig, RationaleConfig
from distill.config.model import ModelConfig
from distill.config.quant import QuantConfig
from distill.config.schema import DataConfig, ObjectiveConfig, RunConfig, TrainConfig

__all__ = [
    "DataConfig", "EvalConfig", "FeatureConfig", "LayerPair", "ModelConfig", "ObjectiveConfig", "OnPolicyConfig", "QuantConfig",
    "RationaleConfig", "RunConfig", "Section", "TrainConfig", "apply_override", "build_config", "dump_config",
    "load_config", "read_yaml",
]

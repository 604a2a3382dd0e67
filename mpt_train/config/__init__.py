"""Run specs: typed sections, loaded from YAML with CLI overrides and checked before any build."""

from mpt_train.config.loader import load_config, load_config_dict, to_container
from mpt_train.config.redact import redact
from mpt_train.config.schema import RunConfig
from mpt_train.errors import ConfigError

__all__ = ["ConfigError", "RunConfig", "load_config", "load_config_dict", "redact", "to_container"]

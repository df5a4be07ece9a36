"""Moved: the config base classes live in nanopipe.configs.base, the command line in nanopipe.configs.flags."""

from nanopipe.configs.base import (CommonConfig, ConfigError, DownstreamConfig, NanoConfig,  # noqa: F401
                                   build_config, config_digest, describe_range, non_semantic_fields,
                                   unwrap_optional as _unwrap_optional, validation_error_message)
from nanopipe.configs.flags import (coerce_cli_value as _coerce_cli_value, format_help,  # noqa: F401
                                    parse_config as parse_cli, to_cli_args)

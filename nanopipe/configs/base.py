"""Base classes of the stage configs (moving here from nanopipe.config)."""

from nanopipe.config import CommonConfig, ConfigError, DownstreamConfig, NanoConfig  # noqa: F401

"""Config loading for hcpdiff: `_base_` merging, overrides, `hcp.*` resolvers, target and field checks."""
from hcpdiff.config.fields import Bound, read_fields
from hcpdiff.config.loader import load_config, load_config_with_origins
from hcpdiff.config.overrides import Override, parse_overrides
from hcpdiff.config.resolvers import RunClock, register_resolvers
from hcpdiff.config.targets import check_targets, instantiate
from hcpdiff.errors import ConfigError

register_resolvers()

__all__ = [
    "Bound",
    "ConfigError",
    "Override",
    "RunClock",
    "check_targets",
    "instantiate",
    "load_config",
    "load_config_with_origins",
    "parse_overrides",
    "read_fields",
    "register_resolvers",
]

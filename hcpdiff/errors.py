"""User-facing errors: each message is one sentence naming the file, key, pattern or layer at fault."""


class HcpError(Exception):
    """An error caused by the user's input; entry points print its message without a traceback."""


class ConfigError(HcpError):
    """A config file, key, override, resolver or `_target_` is wrong."""


class DataError(HcpError):
    """An image folder, caption file or bucket setting is wrong."""


class ModelError(HcpError):
    """A model or LoRA file cannot be found, reached or read."""

"""User-facing errors: each message is one sentence naming the file, key, pattern or layer at fault."""


class HcpError(Exception):
    """An error caused by the user's input; entry points print its message without a traceback."""


class ConfigError(HcpError):
    """A config file, key, override, resolver or `_target_` is wrong."""


class ConfigProblems:
    """Config problems gathered while reading many keys, so that one ConfigError names them all."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        self.messages.append(message)

    def collect(self, fn, *args):
        """`fn(*args)`, or None with its ConfigError's message kept."""
        try:
            return fn(*args)
        except ConfigError as err:
            self.messages.append(str(err))
            return None

    def raise_any(self) -> None:
        if self.messages:  # each message may end its own sentence; the joined line ends once
            raise ConfigError("; ".join(message.rstrip(".") for message in self.messages) + ".")


class DataError(HcpError):
    """An image folder, caption file or bucket setting is wrong."""


class ModelError(HcpError):
    """A model or LoRA file cannot be found, reached or read."""

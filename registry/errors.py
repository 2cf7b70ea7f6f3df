"""User-facing errors: the CLI prints the message alone (no traceback) and exits with the code."""


class LoraplexError(Exception):
    """A mistake in what the user asked for, or a refusal to do something unsafe."""

    exit_code = 1


class UsageError(LoraplexError, ValueError):
    """Bad input: a config key, a file, a reference. Exit code 2, as for command-line misuse.

    `param` names the request field at fault, where there is one (OpenAI's error `param`)."""

    exit_code = 2

    def __init__(self, *args, param: str | None = None):
        super().__init__(*args)
        self.param = param


class ConfigError(UsageError):
    """A config file or override that does not validate."""


class NotFoundError(UsageError):
    """A registered adapter, version or alias that does not exist."""


class UnknownAdapterError(NotFoundError):
    """No adapter of that name is registered at all."""


class AdapterError(UsageError):
    """A folder that is not a usable LoRA adapter for this base."""


class BaseMismatchError(AdapterError):
    """An adapter trained against a different base model than the one it is loaded onto."""

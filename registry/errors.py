"""User-facing errors: the CLI prints the message alone (no traceback) and exits with the code."""


class LoraplexError(Exception):
    """A mistake in what the user asked for, or a refusal to do something unsafe."""

    exit_code = 1


class UsageError(LoraplexError, ValueError):
    """Bad input: a config key, a file, a reference. Exit code 2, as for command-line misuse."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file or override that does not validate."""


class NotFoundError(UsageError):
    """A registered adapter, version or alias that does not exist."""


class AdapterError(UsageError):
    """A folder that is not a usable LoRA adapter for this base."""


class BaseMismatchError(AdapterError):
    """An adapter trained against a different base model than the one it is loaded onto."""

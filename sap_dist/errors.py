"""The error every layer raises for input the user must fix (a config key, a file, a row)."""


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key or file."""

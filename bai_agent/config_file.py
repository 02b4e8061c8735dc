"""
The agent's configuration file (``--config PATH``): TOML whose keys are the command line's
options without their dashes, one per line at the top level::

    etcd-addr = "10.0.0.5:2379"      # or etcd_addr: both spellings name --etcd-addr
    namespace = "prod"
    reserved-mem = "2g"               # text, or a number where the option takes one
    destroy-kernels-on-stop = false   # a flag: true or false
    allowed-mount-root = ["/data"]    # a repeatable option: an array

This module only reads the file and checks its shape against the options it is given
(``load_config_file(path, options)``): which keys exist, and whether each value is a
value, a flag or an array. Whether a value is good (a size, an address) is
``AgentConfig``'s to say, as for the command line; ``bai_agent.tap`` merges the two (the
command line wins) and names the file and the key when ``AgentConfig`` refuses a value
that came from the file. Every error here is a ``ConfigFileError`` naming the file, and the
key when there is one.
"""

from __future__ import annotations

import difflib
import enum
import sys
from collections.abc import Mapping

import attrs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9 and 3.10
    import tomli as tomllib

__all__ = ["ConfigFile", "ConfigFileError", "OptionKind", "load_config_file", "options_of"]


class OptionKind(enum.Enum):
    """What a key of the file takes: the kind of command-line option it stands for."""

    #: An option with a value (``--etcd-addr HOST:PORT``): a TOML string or number.
    VALUE = "value"
    #: A flag (``--destroy-kernels-on-stop``): true or false.
    FLAG = "flag"
    #: A repeatable option (``--allowed-mount-root`` given more than once): an array of strings.
    LIST = "list"


class ConfigFileError(ValueError):
    """A configuration file that cannot be used: ``PATH: KEY: what is wrong``."""

    def __init__(self, path: str, key: str | None, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        super().__init__(f"{path}: {key}: {problem}" if key is not None else f"{path}: {problem}")


@attrs.frozen
class ConfigFile:
    """What one configuration file says: its values by option name, and each one's key as written."""

    path: str
    #: ``{"etcd-addr": "10.0.0.5:2379"}``; an array as a tuple.
    values: Mapping[str, object]
    #: The key each option was written as (``{"etcd-addr": "etcd_addr"}``), for messages.
    keys: Mapping[str, str]

    def error(self, option: str, problem: str) -> ConfigFileError:
        """The error saying that this file's value of ``option`` is wrong: ``PATH: KEY: problem``."""
        return ConfigFileError(self.path, self.keys.get(option, option), problem)


def load_config_file(path: str, options: Mapping[str, OptionKind]) -> ConfigFile:
    """
    What the file at ``path`` says. ``options``: every option the file may set, by its name
    without dashes, and its kind. ``ConfigFileError`` when the file cannot be read, is not
    TOML, or has a key or a value of the wrong shape.
    """
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as e:
        raise ConfigFileError(path, None, f"cannot read it: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(path, None, f"not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigFileError(path, None, f"not valid TOML: not UTF-8 ({e.reason} at byte {e.start})") from None
    return options_of(document, path, options)


def options_of(document: Mapping[str, object], path: str, options: Mapping[str, OptionKind]) -> ConfigFile:
    """``load_config_file``'s checks, on a document already parsed (``path`` names it in errors)."""
    values: dict[str, object] = {}
    spelled: dict[str, str] = {}
    for key, value in document.items():
        name = key.replace("_", "-")
        kind = options.get(name)
        if kind is None:
            raise ConfigFileError(path, key, _unknown(name, value, options))
        if name in spelled:
            raise ConfigFileError(path, key, f"given twice (also as {spelled[name]!r})")
        spelled[name] = key
        values[name] = _checked(path, key, kind, value)
    return ConfigFile(path, values, spelled)


def _unknown(name: str, value: object, options: Mapping[str, OptionKind]) -> str:
    if isinstance(value, dict):
        return "unknown key: a table; the keys are the agent's options, at the top level, without tables"
    close = difflib.get_close_matches(name, list(options), n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return "unknown key; the keys are the agent's options without the dashes: " + ", ".join(sorted(options))


def _checked(path: str, key: str, kind: OptionKind, value: object) -> object:
    if kind is OptionKind.FLAG:
        if not isinstance(value, bool):
            raise ConfigFileError(path, key, f"expected true or false, not {_shown(value)}")
        return value
    if kind is OptionKind.LIST:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigFileError(path, key, f'expected an array of strings (e.g. ["/data"]), not {_shown(value)}')
        return tuple(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigFileError(path, key, f"expected a string or a number, not {_shown(value)}")
    return value


def _shown(value: object) -> str:
    """``value`` as a TOML reader would recognise it in an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, (str, int, float)):
        return repr(value)
    return f"a {type(value).__name__}"  # dates and times

"""
``--config PATH``: a TOML file of the agent's options (``bai_agent.config_file``, merged by
``bai_agent.tap.Options``): keys are the options without dashes, the command line wins, and
every error names the file and the key.
"""

import inspect
import pathlib
import re

import pytest
from twisted.python import usage

from bai_agent.config import AgentConfig
from bai_agent.config_file import ConfigFileError, OptionKind, load_config_file
from bai_agent.tap import FILE_OPTIONS, FLAG_FIELDS, OPTION_FIELDS, REPEATABLE_FIELDS, Options

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "agent.example.toml"


def dirs(tmp_path):
    return ["--scratch-root", str(tmp_path / "scratch"), "--state-dir", str(tmp_path / "state")]


def parse(tmp_path, text, *argv):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    options = Options()
    options.parseOptions(["--config", str(path), *dirs(tmp_path), *argv])
    return options.config


def refusal(tmp_path, text, *argv):
    with pytest.raises(usage.UsageError) as raised:
        parse(tmp_path, text, *argv)
    return str(raised.value)


def test_the_example_loads_and_makes_a_valid_config(tmp_path):
    options = Options()
    options.parseOptions(["--config", str(EXAMPLE), *dirs(tmp_path)])
    config = options.config
    assert isinstance(config, AgentConfig)
    # The example's values are the defaults, whatever it sets.
    defaults = AgentConfig(
        agent_id=config.agent_id,
        advertise_host=config.advertise_host,
        **{
            "scratch_root": config.scratch_root,
            "state_dir": config.state_dir,
            "docker_host": config.docker_host,
        },
    )
    assert config == defaults
    # The command line won over the file's scratch-root and state-dir.
    assert config.scratch_root == str(tmp_path / "scratch")
    assert load_config_file(str(EXAMPLE), FILE_OPTIONS).values["scratch-root"] == "/var/cache/scratches"


def test_the_example_shows_every_option(tmp_path):
    text = EXAMPLE.read_text()
    shown = set(re.findall(r"^#? ?([a-z][a-z0-9-]*) =", text, flags=re.M))
    missing = sorted(set(FILE_OPTIONS) - shown)
    assert not missing, f"docs/agent.example.toml does not show {', '.join(missing)} (add a line, commented or not)"
    unknown = sorted(shown - set(FILE_OPTIONS))
    assert not unknown, f"docs/agent.example.toml shows {', '.join(unknown)}, which the agent lacks"


def test_every_option_but_config_itself_may_be_in_the_file():
    # Derived from Options: an option added there is accepted in the file with no other change.
    parameters = {str(parameter[0]) for parameter in Options.optParameters} - {"config"}
    assert set(OPTION_FIELDS) == parameters
    assert {name for name, kind in FILE_OPTIONS.items() if kind is OptionKind.VALUE} == parameters
    assert {name for name, kind in FILE_OPTIONS.items() if kind is OptionKind.FLAG} == set(FLAG_FIELDS)
    assert {name for name, kind in FILE_OPTIONS.items() if kind is OptionKind.LIST} == set(REPEATABLE_FIELDS)
    assert "config" not in FILE_OPTIONS
    fields = set(attribute.name for attribute in AgentConfig.__attrs_attrs__)
    assert set(OPTION_FIELDS.values()) | set(FLAG_FIELDS.values()) | set(REPEATABLE_FIELDS.values()) <= fields


def test_every_repeatable_option_has_a_field_and_a_file_key():
    # Options.postOptions fills AgentConfig from FIELDS alone: a repeatable option (an
    # opt_* method of the agent's own) missing from REPEATABLE_FIELDS would be dropped.
    own = {
        attribute[len("opt_") :].replace("_", "-")
        for attribute, _ in inspect.getmembers(Options, inspect.isfunction)
        if attribute.startswith("opt_") and not hasattr(usage.Options, attribute)
    }
    missing = sorted(own - set(REPEATABLE_FIELDS))
    assert not missing, f"add {', '.join(missing)} to bai_agent.tap.REPEATABLE_FIELDS (option: AgentConfig field)"


def test_keys_with_dashes_or_underscores_set_options(tmp_path):
    config = parse(
        tmp_path,
        'etcd-addr = "10.0.0.5:2379"\n'
        'namespace = "prod"\n'
        'reserved_mem = "2g"\n'
        "reserved-cpu = 1.5\n"
        "heartbeat_interval = 0.5\n"
        "kernel-pids-limit = 2048\n"
        "destroy-kernels-on-stop = true\n",
    )
    assert config.etcd_addr == "10.0.0.5:2379"
    assert config.namespace == "prod"
    assert config.reserved_mem == 2 << 30
    assert config.reserved_cpu == 1.5
    assert config.heartbeat_interval == 0.5
    assert config.kernel_pids_limit == 2048
    assert config.destroy_kernels_on_stop is True


def test_a_repeatable_option_takes_an_array(tmp_path):
    one, two = tmp_path / "data", tmp_path / "sets"
    one.mkdir()
    two.mkdir()
    config = parse(tmp_path, f'allowed-mount-root = ["{one}", "{two}"]\n')
    assert config.allowed_mount_roots == (str(one), str(two))
    # Given on the command line, it replaces the file's array.
    config = parse(tmp_path, f'allowed-mount-root = ["{one}"]\n', "--allowed-mount-root", str(two))
    assert config.allowed_mount_roots == (str(two),)


def test_the_command_line_wins_even_with_the_default_value(tmp_path):
    config = parse(tmp_path, 'namespace = "prod"\netcd-addr = "10.0.0.5:2379"\n', "--namespace", "local")
    assert config.namespace == "local"
    assert config.etcd_addr == "10.0.0.5:2379"


def test_an_unknown_key_names_the_file_and_the_key_and_suggests_one(tmp_path):
    message = refusal(tmp_path, 'etcd-adress = "10.0.0.5:2379"\n')
    assert message == f"{tmp_path / 'agent.toml'}: etcd-adress: unknown key; did you mean 'etcd-addr'?"
    message = refusal(tmp_path, "zzz = 1\n")
    assert message.startswith(f"{tmp_path / 'agent.toml'}: zzz: unknown key; the keys are ")
    assert "etcd-addr" in message


def test_a_table_is_refused(tmp_path):
    message = refusal(tmp_path, '[agent]\nnamespace = "prod"\n')
    assert message.startswith(f"{tmp_path / 'agent.toml'}: agent: unknown key: a table")


@pytest.mark.parametrize(
    "line, key, problem",
    [
        ('reserved-mem = "12q"', "reserved-mem", ""),
        ("heartbeat_interval = 1000", "heartbeat_interval", ""),
        ('etcd-addr = "nohost"', "etcd-addr", ""),
        ("namespace = 5", "namespace", ""),
        ('kernel-network = "no network"', "kernel-network", ""),
        ('service-port-range = "1-2"', "service-port-range", ""),
        ('destroy-kernels-on-stop = "yes"', "destroy-kernels-on-stop", "expected true or false, not 'yes'"),
        ('allowed-mount-root = "/data"', "allowed-mount-root", "expected an array of strings"),
        ('allowed-mount-root = ["/nonexistent-root"]', "allowed-mount-root", "is not an existing absolute directory"),
        ("namespace = true", "namespace", "expected a string or a number, not true"),
        ('namespace = ["a"]', "namespace", "expected a string or a number, not an array"),
        ("namespace = 1979-05-27", "namespace", "expected a string or a number, not a date"),
    ],
)
def test_a_bad_value_names_the_file_and_the_key(tmp_path, line, key, problem):
    message = refusal(tmp_path, line + "\n")
    assert message.startswith(f"{tmp_path / 'agent.toml'}: {key}: "), message
    assert problem in message
    assert "--" not in message.split(": ", 2)[1]


def test_a_bad_value_on_the_command_line_still_names_the_option(tmp_path):
    message = refusal(tmp_path, 'reserved-mem = "2g"\n', "--reserved-mem", "12q")
    assert message.startswith("--reserved-mem: "), message


def test_a_directory_the_file_names_that_cannot_be_made_names_the_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = tmp_path / "agent.toml"
    path.write_text(f'scratch-root = "{blocker / "sub"}"\n')
    with pytest.raises(usage.UsageError) as raised:
        Options().parseOptions(["--config", str(path), "--state-dir", str(tmp_path / "state")])
    assert str(raised.value).startswith(f"{path}: scratch-root: cannot create scratch root"), str(raised.value)


def test_an_option_given_twice_is_refused(tmp_path):
    message = refusal(tmp_path, 'etcd-addr = "a:1"\netcd_addr = "b:2"\n')
    assert message == f"{tmp_path / 'agent.toml'}: etcd_addr: given twice (also as 'etcd-addr')"


def test_a_file_that_is_not_toml_names_the_file_and_the_line(tmp_path):
    message = refusal(tmp_path, 'namespace = "prod"\netcd-addr = \n')
    assert message.startswith(f"{tmp_path / 'agent.toml'}: not valid TOML: "), message
    assert "line 2" in message


def test_a_file_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_bytes(b'namespace = "\xff"\n')
    with pytest.raises(ConfigFileError) as raised:
        load_config_file(str(path), FILE_OPTIONS)
    assert str(raised.value).startswith(f"{path}: not valid TOML")


def test_a_missing_file_names_the_file(tmp_path):
    with pytest.raises(usage.UsageError) as raised:
        Options().parseOptions(["--config", str(tmp_path / "nope.toml"), *dirs(tmp_path)])
    assert str(raised.value) == f"{tmp_path / 'nope.toml'}: cannot read it: No such file or directory"


def test_config_itself_is_not_a_key(tmp_path):
    message = refusal(tmp_path, 'config = "/etc/other.toml"\n')
    assert message.startswith(f"{tmp_path / 'agent.toml'}: config: unknown key")


def test_without_a_file_nothing_changes(tmp_path):
    options = Options()
    options.parseOptions([*dirs(tmp_path), "--namespace", "prod"])
    assert options.config.namespace == "prod"
    assert options["config"] is None

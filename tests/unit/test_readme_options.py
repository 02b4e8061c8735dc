"""README.md's table of options says what ``twistd bai-agent`` accepts: the same options, the same defaults."""

import inspect
import pathlib
import re

from twisted.python import usage

from bai_agent.tap import Options

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"

# A default cell that is one code span, `like this`, gives a literal default.
LITERAL = re.compile(r"^`([^`]*)`$")


def readme_options():
    """``{option: default cell}`` of the table under README.md's ``## Options``."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("## Options")
    rows = {}
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        name = LITERAL.match(cells[0])
        if name is None or not name.group(1).startswith("--"):
            continue  # the header and the line under it
        assert name.group(1) not in rows, f"README.md names {name.group(1)} twice"
        rows[name.group(1)] = cells[1]
    return rows


def agent_options():
    """``{option: default}``: None where the agent works one out, False for a flag, [] repeatable."""
    options = {f"--{name}": default for name, _, default, _ in Options.optParameters}
    options.update({f"--{name}": False for name, *_ in Options.optFlags})
    # opt_* methods of Options itself; usage.Options' own (--help, --version) are twistd's.
    for attribute, _ in inspect.getmembers(Options, inspect.isfunction):
        if attribute.startswith("opt_") and not hasattr(usage.Options, attribute):
            options["--" + attribute[len("opt_") :].replace("_", "-")] = []
    return options


def test_the_readme_has_an_options_table():
    assert len(readme_options()) >= 10, "README.md: no table of options under '## Options'"


def test_every_option_is_in_the_readme():
    missing = sorted(set(agent_options()) - set(readme_options()))
    assert not missing, f"README.md's options table lacks {', '.join(missing)}"


def test_the_readme_names_no_option_the_agent_lacks():
    extra = sorted(set(readme_options()) - set(agent_options()))
    assert not extra, f"README.md's options table names {', '.join(extra)}, which bai_agent.tap.Options lacks"


def test_the_readme_gives_each_option_its_default():
    readme = readme_options()
    wrong = []
    for option, default in sorted(agent_options().items()):
        if option not in readme:
            continue  # test_every_option_is_in_the_readme says so
        cell = readme[option]
        literal = LITERAL.match(cell)
        if default is False or default == []:
            expected = "off" if default is False else "none"
            if cell != expected:
                wrong.append(f"{option}: README says {cell!r}, expected {expected!r}")
        elif default is None:
            # The agent works it out (from the host, the environment): the README says how,
            # in words, not as one literal value.
            if literal is not None:
                wrong.append(f"{option}: README gives the literal default {cell}, but the option has none")
        elif literal is None or literal.group(1) != default:
            wrong.append(f"{option}: README says the default is {cell!r}, Options says `{default}`")
    assert not wrong, "README.md's options table has wrong defaults:\n" + "\n".join(wrong)

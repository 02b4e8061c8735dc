"""
The import rules that keep the layout telling, checked on the source (``ast``, nothing
imported):

- ``bai_agent.protocol`` (shared with managers) imports nothing else of the agent;
- the runner (stdlib only, it runs inside kernels) imports only the standard library and
  its sibling modules;
- the backends (``docker``, ``etcd``, ``node``) know no kernels;
- the core (kernels, backends, stats, runtime, the record and the health) knows no wire
  (``rpc``), no page (``status``) and no command line (``ctl``);
- the global reactor is imported only by ``tap.py`` and the command line's ``main``.

Each rule is a function over ``{module: imported names}``; the tests at the end feed them
a made-up tree that breaks each rule, so that a rule that can no longer fail is noticed.
"""

import ast
import os
import sys

import pytest

import bai_agent

PACKAGE_DIR = os.path.dirname(os.path.abspath(bai_agent.__file__))
RUNNER = "bai_agent.runner"
BACKENDS = ("bai_agent.docker", "bai_agent.etcd", "bai_agent.node")
CORE = BACKENDS + (
    "bai_agent.kernels",
    "bai_agent.stats",
    "bai_agent.runtime",
    "bai_agent.report",
    "bai_agent.health",
    "bai_agent.config",
    "bai_agent.values",
)
NOT_FOR_THE_CORE = ("bai_agent.rpc", "bai_agent.status", "bai_agent.ctl", "bai_agent.tap", "bai_agent.service")
GLOBAL_REACTOR = "twisted.internet.reactor"
MAY_IMPORT_THE_REACTOR = {"bai_agent.tap", "bai_agent.ctl.cli"}


def module_name(path, root):
    relative = os.path.relpath(path, os.path.dirname(root))[: -len(".py")].replace(os.sep, ".")
    return relative[: -len(".__init__")] if relative.endswith(".__init__") else relative


def imports_of(path, name):
    """Every module ``name``'s source imports, anywhere in it (functions included)."""
    with open(path, encoding="utf-8") as source:
        tree = ast.parse(source.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            # ``from twisted.internet import reactor`` imports the module twisted.internet.reactor
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def import_graph(root=PACKAGE_DIR):
    graph = {}
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d != "__pycache__"]
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(directory, file)
                name = module_name(path, root)
                graph[name] = imports_of(path, name)
    return graph


def within(module, packages):
    if isinstance(packages, str):
        packages = (packages,)
    return any(module == package or module.startswith(package + ".") for package in packages)


def protocol_violations(graph):
    return [
        (module, imported)
        for module, names in graph.items()
        if within(module, "bai_agent.protocol")
        for imported in names
        if within(imported, "bai_agent") and not within(imported, "bai_agent.protocol")
    ]


def runner_violations(graph):
    siblings = {module.rpartition(".")[2] for module in graph if within(module, RUNNER)}
    allowed = set(sys.stdlib_module_names) | siblings | {"__future__"}
    return [
        (module, imported)
        for module, names in graph.items()
        if within(module, RUNNER) and module != RUNNER  # the package's __init__ is the agent's view of it
        for imported in names
        if imported.split(".")[0] not in allowed and not within(imported, RUNNER)
    ]


def backend_violations(graph):
    return [
        (module, imported)
        for module, names in graph.items()
        if within(module, BACKENDS)
        for imported in names
        if within(imported, "bai_agent.kernels")
    ]


def core_violations(graph):
    return [
        (module, imported)
        for module, names in graph.items()
        if within(module, CORE)
        for imported in names
        if within(imported, NOT_FOR_THE_CORE)
    ]


def reactor_violations(graph):
    return [
        (module, GLOBAL_REACTOR)
        for module, names in graph.items()
        if GLOBAL_REACTOR in names and module not in MAY_IMPORT_THE_REACTOR
    ]


RULES = [protocol_violations, runner_violations, backend_violations, core_violations, reactor_violations]


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_sees_the_whole_package(graph):
    assert {"bai_agent.tap", "bai_agent.service", "bai_agent.protocol.commands", "bai_agent.runner.server"} <= set(
        graph
    )
    assert "bai_agent.protocol.errors" in graph["bai_agent.protocol.client"] or any(
        within(name, "bai_agent.protocol") for name in graph["bai_agent.protocol.client"]
    )


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
def test_the_agent_keeps_its_import_rules(graph, rule):
    assert rule(graph) == []


def test_the_command_lines_main_exists_where_the_reactor_rule_allows_it(graph):
    # Otherwise the allowance would name a module that no longer exists, and silently allow nothing.
    assert MAY_IMPORT_THE_REACTOR <= set(graph)
    assert all(GLOBAL_REACTOR in graph[module] for module in MAY_IMPORT_THE_REACTOR)


# -- the rules fail when they are broken ---------------------------------------------------


def write_tree(root, files):
    for name, text in files.items():
        path = root / "bai_agent" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(root).parents:
            init = root / parent / "__init__.py"
            if parent != type(parent)(".") and not init.exists():
                init.write_text("")
        path.write_text(text)
    return import_graph(str(root / "bai_agent"))


@pytest.mark.parametrize(
    "rule, files, expected",
    [
        (
            protocol_violations,
            {"protocol/commands.py": "from bai_agent.kernels import registry\n"},
            ("bai_agent.protocol.commands", "bai_agent.kernels"),
        ),
        (
            protocol_violations,
            {"protocol/client.py": "from ..config import AgentConfig\n"},
            ("bai_agent.protocol.client", "bai_agent.config"),
        ),
        (
            runner_violations,
            {"runner/server.py": "import twisted.internet\n"},
            ("bai_agent.runner.server", "twisted.internet"),
        ),
        (
            runner_violations,
            {"runner/query.py": "from bai_agent.protocol import errors\n"},
            ("bai_agent.runner.query", "bai_agent.protocol"),
        ),
        (
            backend_violations,
            {"docker/service.py": "def f():\n    from bai_agent.kernels.kernel import Kernel\n"},
            ("bai_agent.docker.service", "bai_agent.kernels.kernel"),
        ),
        (
            core_violations,
            {"kernels/registry.py": "from bai_agent.rpc.server import AmpContext\n"},
            ("bai_agent.kernels.registry", "bai_agent.rpc.server"),
        ),
        (
            core_violations,
            {"stats/collector.py": "import bai_agent.status.page\n"},
            ("bai_agent.stats.collector", "bai_agent.status.page"),
        ),
        (
            reactor_violations,
            {"kernels/files.py": "def f():\n    from twisted.internet import reactor\n"},
            ("bai_agent.kernels.files", GLOBAL_REACTOR),
        ),
    ],
)
def test_each_rule_reports_a_module_that_breaks_it(tmp_path, rule, files, expected):
    graph = write_tree(tmp_path, files)
    assert expected in rule(graph)


def test_what_the_rules_allow_is_not_reported(tmp_path):
    graph = write_tree(
        tmp_path,
        {
            "protocol/client.py": "from bai_agent.protocol import errors\nfrom . import commands\nimport twisted\n",
            "runner/server.py": "import os, json\nimport framing\nfrom connection import Outbox\n",
            "runner/framing.py": "import struct\n",
            "runner/connection.py": "",
            "kernels/registry.py": (
                "from bai_agent.docker.service import DockerService\nfrom bai_agent.protocol import errors\n"
            ),
            "tap.py": "def main():\n    from twisted.internet import reactor\n",
        },
    )
    assert [rule(graph) for rule in RULES] == [[]] * len(RULES)

"""
``twistd bai-agent`` / ``twist bai-agent``: options and ``makeService``.

This is the only module that imports the global reactor.
"""

from __future__ import annotations

import getopt
import sys
from typing import Any

from twisted.python import usage

from bai_agent.config import AgentConfig, ensure_private_dir
from bai_agent.config_file import ConfigFile, ConfigFileError, OptionKind, load_config_file
from bai_agent.kernels.workspace import check_socket_room


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a bai-agent: register this machine in etcd under a namespace and serve "
        "managers over AMP. See README.md and PROTOCOL.md."
    )

    optParameters = [
        [
            "config",
            None,
            None,
            "TOML file of options: keys are the option names without the dashes "
            "(etcd-addr = '10.0.0.5:2379'); the command line wins over the file.",
        ],
        ["etcd-addr", None, "127.0.0.1:2379", "etcd client address, HOST:PORT."],
        ["namespace", None, "local", "Cluster namespace: keys live under /bai/NAMESPACE/."],
        ["agent-id", None, None, "This agent's id (default: derived from the host name, stable across restarts)."],
        ["amp-endpoint", None, "tcp:6001", "Twisted server endpoint managers connect to."],
        ["advertise-host", None, None, "Host managers dial (default: the address of the default route)."],
        ["http-endpoint", None, "tcp:6003:interface=127.0.0.1", "Twisted server endpoint of the status page."],
        ["scratch-root", None, "/var/cache/scratches", "Directory of kernel home dirs (created 0700)."],
        ["state-dir", None, "/var/lib/bai-agent", "Directory of the agent's own state (created 0700)."],
        ["docker-host", None, None, "Docker Engine address (default: $DOCKER_HOST, else unix:///var/run/docker.sock)."],
        ["heartbeat-interval", None, "3", "Seconds between etcd record refreshes (0.5 to 300)."],
        ["secret-file", None, None, "File holding the namespace secret (hex); overrides etcd's."],
        ["reserved-cpu", None, "0", "CPU cores kept back for the host."],
        ["reserved-mem", None, "0", "Memory kept back for the host: bytes, or 512m, 2g."],
        ["kernel-network", None, "bridge", "Docker network of kernels ('none' for no network)."],
        ["kernel-pids-limit", None, "1024", "Most processes one kernel may run."],
        ["max-upload-size", None, "100m", "Largest file UploadFile may make in a kernel's home."],
        [
            "stop-grace-period",
            None,
            "10",
            "Seconds a graceful stop (SIGTERM) waits for commands in flight (0 to 3600).",
        ],
        [
            "default-scratch-size",
            None,
            "10g",
            "Most a kernel's home may hold when CreateKernel names no scratch (at least 16m).",
        ],
        ["service-port-range", None, "30000-31000", "Host ports of the relays to kernels' services, LOW-HIGH."],
        ["service-host", None, None, "Host the relays to kernels' services listen on (default: the advertise host)."],
        ["image-pull-timeout", None, "1800", "Seconds an image pull may take before it is aborted (10 to 86400)."],
        [
            "image-pull-stall-timeout",
            None,
            "120",
            "Seconds an image pull may go without progress before it is aborted (1 to 3600).",
        ],
        [
            "scratch-type",
            None,
            "auto",
            "How homes are limited: quota (project quotas of the scratch root), hostfile "
            "(a loop-mounted image per kernel), dir (not limited), or auto (quota where supported, else hostfile).",
        ],
    ]

    optFlags = [
        [
            "destroy-kernels-on-stop",
            None,
            "Destroy all kernels on a graceful stop (default: they keep running and the next start takes them over).",
        ],
    ]

    def __init__(self):
        super().__init__()
        self["allowed-mount-root"] = []
        self["warm-pool"] = []

    def opt_allowed_mount_root(self, path):
        """A host directory whose subtrees managers may mount into kernels (repeatable)."""
        self["allowed-mount-root"].append(path)

    def opt_warm_pool(self, spec):
        """IMAGE=N: keep N containers of the kernel image IMAGE ready for creates (repeatable)."""
        self["warm-pool"].append(spec)

    def parseOptions(self, options=None):
        # Which options the command line names, before they are parsed: a value given there
        # wins over the config file's even when it equals the default.
        self.given = self._named(sys.argv[1:] if options is None else list(options))
        super().parseOptions(options)

    def _named(self, argv):
        try:
            pairs, _ = getopt.getopt(argv, self.shortOpt, self.longOpt)
        except getopt.GetoptError:
            return set()  # parseOptions says what is wrong
        named = set()
        for option, _ in pairs:
            name = option.lstrip("-")
            named.add(self.synonyms.get(name) or self.synonyms.get(name.replace("-", "_"), name))
        return named

    def postOptions(self):
        # AgentConfig checks every value, and names the option in what it raises; an option
        # given neither on the command line nor in the file (None) leaves the field to
        # AgentConfig's default.
        config_file = self._config_file()
        fields = {}
        for option, field in FIELDS.items():
            value = self[option]
            if config_file is not None and option in config_file.values and option not in self.given:
                value = config_file.values[option]
            if option in FLAG_FIELDS:
                value = bool(value)
            if value is not None:
                fields[field] = value
        try:
            self.config = AgentConfig(**fields)
            prepare_directories(self.config)
        except ValueError as e:
            raise usage.UsageError(self._blame(str(e), config_file)) from None

    def _config_file(self) -> ConfigFile | None:
        if self["config"] is None:
            return None
        try:
            return load_config_file(self["config"], FILE_OPTIONS)
        except ConfigFileError as e:
            raise usage.UsageError(str(e)) from None

    def _blame(self, message: str, config_file: ConfigFile | None) -> str:
        """``message`` (``--option: problem``), naming the file and its key when the value came from there."""
        option, separator, problem = message.partition(": ")
        name = option[2:] if option.startswith("--") else ""
        if config_file is None or not separator or name not in config_file.values or name in self.given:
            return message
        return str(config_file.error(name, problem))


#: The field of ``AgentConfig`` each of ``Options.optParameters`` sets (``--config`` names the file).
OPTION_FIELDS: dict[str, str] = {
    str(parameter[0]): str(parameter[0]).replace("-", "_") for parameter in Options.optParameters
}
del OPTION_FIELDS["config"]
#: The field each of ``Options.optFlags`` sets.
FLAG_FIELDS: dict[str, str] = {str(flag[0]): str(flag[0]).replace("-", "_") for flag in Options.optFlags}
#: The field each repeatable option (an ``opt_*`` method that appends) fills.
REPEATABLE_FIELDS: dict[str, str] = {"allowed-mount-root": "allowed_mount_roots", "warm-pool": "warm_pool"}
FIELDS: dict[str, str] = {**OPTION_FIELDS, **FLAG_FIELDS, **REPEATABLE_FIELDS}
#: What a ``--config`` file may set: every option but ``--config`` itself, with its kind.
FILE_OPTIONS: dict[str, OptionKind] = {
    **dict.fromkeys(OPTION_FIELDS, OptionKind.VALUE),
    **dict.fromkeys(FLAG_FIELDS, OptionKind.FLAG),
    **dict.fromkeys(REPEATABLE_FIELDS, OptionKind.LIST),
}


def prepare_directories(config: AgentConfig) -> None:
    """
    Create the scratch root and the state dir (0700) if absent, and check that runner
    sockets fit under the state dir: ``ValueError`` naming the option when they cannot be.
    """
    for option, path, what in (
        ("--scratch-root", config.scratch_root, "scratch root"),
        ("--state-dir", config.state_dir, "state dir"),
    ):
        try:
            ensure_private_dir(path, what)
        except ValueError as e:
            raise ValueError(f"{option}: {e}") from None
    try:
        check_socket_room(config.state_dir)
    except ValueError as e:
        raise ValueError(f"--state-dir: {e}") from None


def makeService(options):
    from twisted.internet import reactor

    from bai_agent.runtime.rlimits import raise_open_file_limit
    from bai_agent.service import build_agent_service

    raise_open_file_limit()
    compile_runner()
    try:
        backends = make_backends(reactor, options.config)
    except ValueError as e:
        raise SystemExit(f"bai-agent: {e}") from None
    service = build_agent_service(reactor, options.config, backends)
    reactor.callWhenRunning(_stop_gracefully_on_sigterm, reactor)
    return service


def make_backends(reactor, config):
    """
    The real backends of an agent: the Docker Engine client, the etcd client, runner
    connections, a thread pool for disk work, the cgroup reader, the scratch volumes (their
    kind detected on the scratch root), and the machine's GPUs (NVML) and capacity.
    ``ValueError`` when the machine cannot give what ``config`` asks (a scratch type the
    scratch root does not support).
    """
    from twisted.internet.threads import deferToThreadPool
    from twisted.logger import Logger
    from twisted.python.threadpool import ThreadPool

    from bai_agent.docker.engine import DockerEngineClient
    from bai_agent.etcd.txetcd import TxEtcd
    from bai_agent.kernels.cgroup_limits import CgroupLimits
    from bai_agent.kernels.runner_link import connect_runner
    from bai_agent.node import scratch
    from bai_agent.node.capacity import detect_capacity
    from bai_agent.node.gpus import discover_gpus
    from bai_agent.service import Backends
    from bai_agent.stats.cgroups import CgroupReader

    log = Logger()
    scratch_volumes = scratch.detect(config.scratch_root, config.scratch_type)
    if not scratch_volumes.enforced:
        log.warn(
            "--scratch-type dir: kernels' homes are not limited; one kernel can fill the disk of {root}",
            root=config.scratch_root,
        )
    else:
        log.info("kernels' homes limited by {kind} on {root}", kind=scratch_volumes.kind, root=config.scratch_root)
    nvml = _import_nvml()
    gpus = tuple(discover_gpus(nvml))
    capacity = detect_capacity(
        config.reserved_cpu,
        config.reserved_mem,
        cuda_devices=len(gpus),
        scratch=scratch.capacity_of(config.scratch_root),
    )
    etcd = TxEtcd(reactor, config.etcd_url)
    disk_pool = ThreadPool(minthreads=0, maxthreads=4, name="bai-agent-disk")
    return Backends(
        docker=DockerEngineClient(reactor, config.docker_host),
        etcd=etcd,
        connect_runner=connect_runner,
        run_blocking=lambda f, *args: deferToThreadPool(reactor, disk_pool, f, *args),
        cgroups=CgroupReader(),
        cgroup_limits=CgroupLimits(),
        scratch_volumes=scratch_volumes,
        capacity=capacity,
        gpus=gpus,
        nvml=nvml if gpus else None,
        thread_pool=disk_pool,
        owned=(etcd,),
    )


def _import_nvml() -> Any:
    """The NVML module (nvidia-ml-py), or None where it is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def compile_runner():
    """
    Write the runner's bytecode next to it, once, before the reactor runs: the runner
    directory is mounted read-only into kernels, and without a cache each kernel's Python
    would compile the runner again at start. A read-only install (bytecode written at
    install time, or not writable) is fine as it is.
    """
    import compileall

    from twisted.logger import Logger

    from bai_agent.runner import RUNNER_DIR

    try:
        compileall.compile_dir(RUNNER_DIR, quiet=2, workers=1)
    except OSError as e:
        Logger().info("runner bytecode not written: {error}", error=e)


def _stop_gracefully_on_sigterm(reactor):
    """
    SIGTERM is how supervisors ask for a graceful stop, and a graceful stop exits 0.
    Twisted's own handler records the signal and ``twist`` re-raises it after shutdown,
    so the process would die "by SIGTERM"; this handler stops the reactor the same way
    (services stop in reverse order, the lease is revoked) without that.
    """
    import signal

    signal.signal(signal.SIGTERM, sigterm_handler(reactor))
    # Once the reactor has stopped the process is exiting anyway; Python would put back the
    # default action while it finalizes, and a late SIGTERM would then kill it "by signal".
    reactor.addSystemEventTrigger("after", "shutdown", signal.signal, signal.SIGTERM, signal.SIG_IGN)


def sigterm_handler(reactor):
    """The first SIGTERM starts the graceful stop; later ones only say it is under way."""
    from twisted.logger import Logger

    log = Logger()
    received: list[int] = []

    def handler(signum, frame):
        if received:
            reactor.callFromThread(log.info, "SIGTERM again: the graceful stop is already under way")
            return
        received.append(signum)
        reactor.callFromThread(reactor.stop)

    return handler

"""
The ``docker`` command line, for tests and benchmarks that set up or inspect what the
agent made (``docker ps``, ``docker rm -f``, ``docker exec`` as a baseline). Blocking, so
for fixtures, set-up and threads, never for the reactor thread.

``docker_host`` names the daemon (``DOCKER_HOST``); without it the command talks to the
daemon the environment names, as a user's ``docker`` would.
"""

import os
import subprocess

__all__ = ["DockerCommandFailed", "agent_containers", "docker", "remove_containers"]


class DockerCommandFailed(subprocess.CalledProcessError):
    """A ``docker`` command that exited non-zero; its message carries the command's stderr."""

    def __str__(self) -> str:
        stderr = (self.stderr or "").strip()
        return f"docker {' '.join(self.cmd[1:3])} failed (exit status {self.returncode}): {stderr}"


def docker(
    *args: str, docker_host: str | None = None, check: bool = True, timeout: float = 60
) -> "subprocess.CompletedProcess[str]":
    """
    Run ``docker *args`` to its end (at most ``timeout`` seconds); its text output. With
    ``check``, a non-zero exit raises ``DockerCommandFailed``.
    """
    env = None if docker_host is None else dict(os.environ, DOCKER_HOST=docker_host)
    argv = ["docker", *args]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise DockerCommandFailed(result.returncode, argv, result.stdout, result.stderr)
    return result


def agent_containers(agent_id: str, docker_host: str | None = None, check: bool = True) -> list[str]:
    """Short ids of every container labelled with ``agent_id`` (running or not)."""
    label = f"label=ai.backend.agent-id={agent_id}"
    listed = docker("ps", "-aq", "--filter", label, docker_host=docker_host, check=check)
    return listed.stdout.split()


def remove_containers(containers: list[str], docker_host: str | None = None, timeout: float = 300) -> None:
    """``docker rm -f`` these containers, if any; one already gone is no error."""
    if containers:
        docker("rm", "-f", *containers, docker_host=docker_host, check=False, timeout=timeout)

"""
The Docker labels of the protocol: those the agent puts on kernel containers (to find its
own after a restart), and those that make an image a kernel image (PROTOCOL.md section 5).

Stdlib only: managers and image builders import this module too.
"""

from __future__ import annotations

from typing import Final

# -- on kernel containers -----------------------------------------------------------------

KERNEL_ID_LABEL: Final = "ai.backend.kernel-id"
# The agent that made the container: an agent never touches another agent's containers.
AGENT_ID_LABEL: Final = "ai.backend.agent-id"
# "1" on the containers of the warm pool (section 9); labels cannot change, so a claimed
# one keeps it: it is then known by its name (kernel.{agent_id}.{kernel_id}) and its state.
POOL_LABEL: Final = "ai.backend.pool"
# Which pool container it is: its directories are named after it.
POOL_ID_LABEL: Final = "ai.backend.pool-id"

# -- on kernel images ---------------------------------------------------------------------

# "1" makes a local image a kernel image; any other value, or none, leaves it out.
KERNELSPEC_LABEL: Final = "ai.backend.kernelspec"
# "python" or "shell": what the runner runs code with.
RUNTIME_TYPE_LABEL: Final = "ai.backend.runtime-type"
# The absolute path of the image's interpreter, which also starts the runner.
RUNTIME_PATH_LABEL: Final = "ai.backend.runtime-path"
# Space-separated features ("query batch user-input"); unknown ones are dropped.
FEATURES_LABEL: Final = "ai.backend.features"
# The least memory a kernel of the image may be given, as a size ("256m").
MIN_MEM_LABEL: Final = "ai.backend.resource.min.mem"
# Space-separated names of environment variables set to the kernel's core count.
CORECOUNT_ENVS_LABEL: Final = "ai.backend.envs.corecount"
# Comma-separated services the image serves, "name:protocol:port" (section 7).
SERVICE_PORTS_LABEL: Final = "ai.backend.service-ports"

"""
Services: applications inside kernels (Jupyter, sshd, ...) reached from outside the
container without any container network (docs/protocol.md section 7).

- ``declarations``: what an image declares (the ``ai.backend.service-ports`` label, the
  service definition files) as validated values;
- ``ports``: the pool of host TCP ports the agent listens on for services;
- ``relay``: the host TCP listener that pipes every connection to the kernel's UNIX socket.
"""

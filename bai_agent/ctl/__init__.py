"""
``bai-agent-ctl``: a manager's view of the agents of a namespace, from the command line.

    bai-agent-ctl agents                 # agents registered in etcd
    bai-agent-ctl info AGENT             # the agent's record, over AMP
    bai-agent-ctl images AGENT           # its kernel images, over AMP
    bai-agent-ctl create AGENT KERNEL    # create a kernel (--image, --cpu, --mem, ...)
    bai-agent-ctl kernels AGENT          # list its kernels
    bai-agent-ctl destroy AGENT KERNEL   # destroy / restart one
    bai-agent-ctl stats AGENT KERNEL     # its latest statistics sample
    bai-agent-ctl top AGENT              # its kernels' CPU, memory, status, age, live (--once: one table)
    bai-agent-ctl events AGENT --follow  # print its events as they happen
    bai-agent-ctl upload/download/ls/logs AGENT KERNEL ...
    bai-agent-ctl run AGENT KERNEL -c CODE  # run code (or FILE; - is stdin), output as it comes
    bai-agent-ctl interrupt AGENT KERNEL    # interrupt the run active on a kernel
    bai-agent-ctl repl AGENT             # a Python prompt on a new kernel, destroyed at the end

AGENT is an agent id (looked up in etcd) or a HOST:PORT to dial directly. The etcd address,
namespace and secret are found like the agent finds them: ``--etcd-addr``, ``--namespace``,
``--secret-file`` (else the secret in etcd).

The package, one job a module:

- ``cli``: the argument parser and ``main``, the command line's composition root (the one
  place that takes the global reactor);
- ``connection``: finding etcd, the agent's address and the secret, and connecting;
- ``commands``: the commands that are one exchange with etcd or an agent (agents, info,
  images, kernels, create, destroy, restart, stats, events, interrupt, upload, download,
  ls, logs), and the dispatch of a parsed command line;
- ``run``: ``bai-agent-ctl run``: one run driven to its end, its output, ``input()``
  prompts and Ctrl-C;
- ``top``: ``bai-agent-ctl top``: the kernels' table, busiest first, redrawn every 2 s;
- ``repl``: ``bai-agent-ctl repl``: the interactive prompt, with the terminal in the main
  thread and the reactor in a thread of its own;
- ``output``: what ``run`` and ``repl`` show of a console: text, pictures saved in the
  output directory (``--output-dir``) with their paths printed, html as text;
- ``errors``: ``CtlError``, a failure reported in one line.
"""

from bai_agent.ctl.cli import main

__all__ = ["main"]

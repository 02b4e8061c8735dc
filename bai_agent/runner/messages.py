"""
The agent's messages to the runner (wire protocol: see ``server.py``): the handshake,
then one handler per message type, each checking its message and answering errors on
the connection it came from before the runner acts on it.

Standard library only, Python 3.8+ (see ``__init__.py``).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time matters
if TYPE_CHECKING:
    from typing import Any

PROTOCOL = 1
RUNNER_VERSION = "1.0"

#: Input sent to the interpreter but not yet taken: beyond this, completions are refused.
TO_CHILD_LIMIT = 16 * 1024 * 1024


def error(code: str, message: str, run_id: object = None) -> dict:
    """An ``error`` message; ``run_id`` when it concerns one."""
    answer: dict = {"type": "error", "code": code, "message": message}
    if run_id is not None:
        answer["run_id"] = run_id
    return answer


def service_error(code: str, message: str, name: object) -> dict:
    """An ``error`` message about a service: with its ``name`` when that is a short string."""
    answer = error(code, message)
    if isinstance(name, str) and len(name) <= 64:
        answer["name"] = name
    return answer


class AgentMessages:
    """
    Handles what the agent sends on ``runner.conn`` (an ``AgentConnection``): only the
    current connection is listened to, ``ping`` is answered even before the handshake.
    ``runner`` is the ``server.Runner`` whose runs, interpreter and outbox they act on.
    """

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def handle(self, conn: Any, message: dict) -> None:
        runner = self.runner
        if conn is not runner.conn or conn.closed:
            return
        kind = message["type"]
        if kind == "ping":
            conn.reply({"type": "pong", "id": message.get("id")})
            return
        if not conn.handshaken:
            self._handshake(conn, message)
            return
        handler = self._handlers.get(kind)
        if handler is None:
            conn.reply(error("UNKNOWN_MESSAGE", f"unknown message type {kind[:64]!r}"))
            return
        handler(self, conn, message)

    def _handshake(self, conn, message: dict) -> None:
        if message["type"] != "hello":
            conn.reply(error("PROTOCOL_ERROR", "the first message must be hello"))
            conn.closing = True
        elif message.get("protocol") != PROTOCOL:
            conn.reply(
                error(
                    "PROTOCOL_MISMATCH",
                    f"this runner speaks protocol {PROTOCOL}, not {message.get('protocol')!r}",
                )
            )
            conn.closing = True
        else:
            conn.handshaken = True
            run = self.runner.run
            if run is not None and run.waiting is not None and run.waiting["delivered"]:
                # The last connection got the question; this one must see it too.
                self.runner.announce_waiting(run)

    def _on_hello(self, conn, message: dict) -> None:
        pass  # already shaken hands

    def _on_execute(self, conn, message: dict) -> None:
        runner = self.runner
        run_id, mode, code = message.get("run_id"), message.get("mode"), message.get("code", "")
        options = message.get("options") or {}
        if not isinstance(run_id, str) or not run_id:
            conn.reply(error("BAD_REQUEST", "execute needs a run_id (a non-empty string)"))
            return
        if not isinstance(code, str) or not isinstance(options, dict):
            conn.reply(error("BAD_REQUEST", "code must be a string and options an object", run_id))
            return
        if mode not in ("query", "batch"):
            conn.reply(error("BAD_REQUEST", "mode must be query or batch", run_id))
            return
        if runner.run is not None:
            conn.reply(error("RUN_CONFLICT", f"run {runner.run.run_id} is active", run_id))
            return
        if mode == "query":
            if not runner.supports_query:
                conn.reply(
                    error(
                        "NOT_SUPPORTED",
                        f"a {runner.options.runtime_type} runtime runs batch only",
                        run_id,
                    )
                )
                return
            runner.start_query(run_id, code)
        else:
            for key in ("build", "exec"):
                if options.get(key) is not None and not isinstance(options.get(key), str):
                    conn.reply(error("BAD_REQUEST", f"options.{key} must be a string", run_id))
                    return
            runner.start_batch(run_id, options, code)

    def _on_input(self, conn, message: dict) -> None:
        run_id, data = message.get("run_id"), message.get("data", "")
        run = self.runner.run
        if run is None or run.run_id != run_id or run.waiting is None:
            conn.reply(error("NOT_WAITING_INPUT", f"run {run_id!r} is not waiting for input", run_id))
            return
        if not isinstance(data, str):
            conn.reply(error("BAD_REQUEST", "input data must be a string", run_id))
            return
        request = run.waiting["request"]
        run.waiting = None
        run.interp.send({"type": "input", "request": request, "data": data})

    def _on_interrupt(self, conn, message: dict) -> None:
        run = self.runner.run
        ok = run is not None and bool(run.interrupt())
        answer = {"type": "interrupt-result", "ok": ok}
        if "id" in message:
            answer["id"] = message["id"]
        conn.reply(answer)

    def _on_complete(self, conn, message: dict) -> None:
        runner = self.runner
        agent_id, text = message.get("id"), message.get("text")
        interp = runner.interp
        if (
            not isinstance(text, str)
            or runner.run is not None  # the interpreter is busy: do not wait for it
            or interp is None
            or not interp.channel_open
            or interp.queued_to_child > TO_CHILD_LIMIT
        ):
            conn.reply({"type": "completions", "id": agent_id, "items": []})
            return
        runner.request_completions(interp, conn, agent_id, text[-4096:])

    def _on_cancel(self, conn, message: dict) -> None:
        run_id = message.get("run_id")
        run = self.runner.run
        if run is None or run.run_id != run_id:
            conn.reply(error("NO_SUCH_RUN", f"run {run_id!r} is not active", run_id))
            return
        run.cancel()  # "finished" (137) follows once the process is gone

    def _on_start_service(self, conn, message: dict) -> None:
        why = self.runner.services.start(message)
        if why is not None:
            code = "BAD_REQUEST"
            if why.startswith("SERVICE_CONFLICT: "):
                code, why = "SERVICE_CONFLICT", why[len("SERVICE_CONFLICT: ") :]
            conn.reply(service_error(code, f"start-service: {why}", message.get("name")))

    def _on_stop_service(self, conn, message: dict) -> None:
        name = message.get("name")
        if not isinstance(name, str) or not self.runner.services.stop(name):
            conn.reply(service_error("NO_SUCH_SERVICE", f"no service {str(name)[:64]!r}", name))

    def _on_claim(self, conn, message: dict) -> None:
        environ = message.get("environ")
        if not isinstance(environ, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v
            for k, v in environ.items()
        ):
            conn.reply(error("BAD_REQUEST", "claim needs environ, an object of strings"))
            return
        if self.runner.run is not None:
            conn.reply(error("RUN_CONFLICT", "a run is active: a claimed runner has none"))
            return
        self.runner.claim(environ)

    def _on_list_services(self, conn, message: dict) -> None:
        answer = {"type": "services", "services": self.runner.services.describe()}
        if "id" in message:
            answer["id"] = message["id"]
        conn.reply(answer)

    _handlers = {
        "hello": _on_hello,
        "execute": _on_execute,
        "input": _on_input,
        "interrupt": _on_interrupt,
        "complete": _on_complete,
        "cancel": _on_cancel,
        "start-service": _on_start_service,
        "stop-service": _on_stop_service,
        "list-services": _on_list_services,
        "claim": _on_claim,
    }

"""E2B's code interpreter protocol, served inside a sandbox: what `e2b-code-interpreter`
(the SDK, unchanged) talks to on port 49999 of a sandbox of its default template.

This program runs in the guest, with the guest's own python3 and its standard library only
(it never imports qemubox): ``qemubox serve`` writes it into a sandbox of an interpreter
template and starts it as a kept command, as the template's user; it says ``ready`` on its
stdout once it listens (on the guest's loopback: requests reach it through the server's
relay).

- ``POST /execute`` ({code, context_id, language, env_vars}): the code runs in its context's
  kernel; the answer streams as it runs, one JSON object a line (E2B's shapes): ``stdout`` and
  ``stderr`` (a line at a time, with a nanosecond timestamp), ``result`` (the value of a last
  expression, as text), ``error`` (name, value, traceback), ``number_of_executions``. A
  client that goes away mid-run interrupts the code (SIGINT, as a notebook's stop button).
- ``POST /contexts`` ({language, cwd}), ``GET /contexts``, ``DELETE /contexts/ID``,
  ``POST /contexts/ID/restart``.

A kernel is a python3 process of its own per context: its variables live on between
executions; what it prints at the file-descriptor level (a subprocess's output) is read from
its stdout and stderr pipes, what the code prints through sys.stdout from a channel of its
own (fd 3), in order. Python is the one language (others: 400)."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

MAX_REQUEST = 16 << 20  # bytes of a request body

# The kernel: a request a line on stdin ({"code", "env"}); messages a line on the channel
# (its fd named by its argument).
KERNEL = r"""
import ast, json, os, signal, sys, time, traceback
chan = os.fdopen(int(sys.argv[1]), "w", buffering=1)
requests = os.fdopen(os.dup(0), "r")
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the code's stdin (and its children's): empty
sys.stdin = open(os.devnull)
signal.signal(signal.SIGINT, signal.SIG_IGN)  # an interrupt stops code, not the kernel
def say(kind, **fields):
    chan.write(json.dumps({"type": kind, **fields}) + "\n")
class Lines:
    encoding, errors = "utf-8", "strict"
    def __init__(self, kind):
        self.kind, self.pending = kind, ""
    def write(self, text):
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        for line in lines:
            say(self.kind, text=line + "\n", timestamp=time.time_ns())
        return len(text)
    def flush(self):
        if self.pending:
            say(self.kind, text=self.pending, timestamp=time.time_ns())
            self.pending = ""
    def isatty(self):
        return False
sys.stdout, sys.stderr = Lines("stdout"), Lines("stderr")
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
count = 0
for request in requests:
    request = json.loads(request)
    count += 1
    saved = dict(os.environ)
    os.environ.update(request.get("env") or {})
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tree = ast.parse(request["code"], "<cell>", "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<cell>", "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
            if value is not None:
                namespace["_"] = value
                say("result", text=repr(value), is_main_result=True)
    except BaseException as err:
        sys.stdout.flush()
        sys.stderr.flush()
        tb = err.__traceback__.tb_next or err.__traceback__  # from the cell's frame on
        text = "".join(traceback.format_exception(type(err), err, tb))
        say("error", name=type(err).__name__, value=str(err), traceback=text)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.environ.clear()
        os.environ.update(saved)
    sys.stdout.flush()
    sys.stderr.flush()
    say("number_of_executions", execution_count=count)
    say("end")
"""


class Kernel:
    def __init__(self, language: str, cwd: str) -> None:
        self.id = str(uuid.uuid4())
        self.language, self.cwd = language, cwd
        self.lock = threading.Lock()  # one execution at a time
        self.start()

    def start(self) -> None:
        read, write = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-c", KERNEL, str(write)],
            cwd=self.cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(write,),
        )
        os.close(write)
        self.chan = os.fdopen(read, "rb")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.chan, self.proc.stdin, self.proc.stdout, self.proc.stderr):
            pipe.close()

    def as_json(self) -> dict:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    def execute(self, code: str, env: dict, emit, client: socket.socket) -> None:
        """Run ``code``; each message to ``emit``. A client that leaves (``emit`` says False,
        or its connection ends while the code is silent) has the code interrupted."""
        if self.proc.poll() is not None:  # killed (out of memory, os._exit): a new one
            self.stop()
            self.start()
        request = json.dumps({"code": code, "env": env}) + "\n"
        self.proc.stdin.write(request.encode())
        self.proc.stdin.flush()
        streams = {self.chan.fileno(): None, self.proc.stdout.fileno(): "stdout"}
        streams[self.proc.stderr.fileno()] = "stderr"
        buffered = b""
        interrupted = False

        def stop_code() -> None:
            nonlocal interrupted
            if not interrupted:
                interrupted = True
                self.proc.send_signal(signal.SIGINT)

        watched = [*streams, client.fileno()]
        while True:
            ready, _, _ = select.select(watched, [], [], 1.0)
            if client.fileno() in ready:
                watched.remove(client.fileno())  # looked at once: its end, or bytes not ours
                try:
                    more = client.recv(1, socket.MSG_PEEK)
                except OSError:
                    more = b""
                if not more:
                    stop_code()
                continue
            if not ready and self.proc.poll() is not None:
                emit({"type": "error", "name": "KernelDied", "value": "the kernel exited",
                      "traceback": ""})  # fmt: skip
                return
            for fd in ready:
                data = os.read(fd, 65536)
                kind = streams[fd]
                if kind is not None:
                    if data and not emit({"type": kind, "text": data.decode(errors="replace"),
                                          "timestamp": time.time_ns()}):  # fmt: skip
                        stop_code()
                    continue
                buffered += data
                *lines, buffered = buffered.split(b"\n")
                for line in lines:
                    message = json.loads(line)
                    if message["type"] == "end":
                        self._drain(emit)
                        return
                    if not emit(message):
                        stop_code()

    def _drain(self, emit) -> None:
        """What its subprocesses wrote just before the code ended, said with it (for a
        second at most: one left running in the background may write on)."""
        pipes = {self.proc.stdout.fileno(): "stdout", self.proc.stderr.fileno(): "stderr"}
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline and (
            ready := select.select(list(pipes), [], [], 0.05)[0]
        ):
            for fd in ready:
                data = os.read(fd, 65536)
                if not data:
                    return
                emit({"type": pipes[fd], "text": data.decode(errors="replace"),
                      "timestamp": time.time_ns()})  # fmt: skip


class Kernels:
    def __init__(self, cwd: str) -> None:
        self.lock = threading.Lock()
        self.default = Kernel("python", cwd)
        self.all = {self.default.id: self.default}

    def get(self, context_id: str | None) -> Kernel | None:
        with self.lock:
            return self.default if context_id is None else self.all.get(context_id)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    kernels: Kernels

    def log_message(self, *args) -> None:  # no line per request on stderr
        pass

    def _json(self, status: int, value) -> None:
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> dict | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_REQUEST:
            self._json(413, {"error": f"a request of at most {MAX_REQUEST} bytes"})
            return None
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._json(400, {"error": "the body must be a JSON object"})
            return None
        return body

    def _language(self, body: dict) -> bool:
        language = body.get("language") or "python"
        if language != "python":
            self._json(400, {"error": f"language {language!r}: only python is served here"})
            return False
        return True

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, "OK")
        elif self.path == "/contexts":
            with self.kernels.lock:
                self._json(200, [k.as_json() for k in self.kernels.all.values()])
        else:
            self._json(404, {"error": f"no {self.path}"})

    def do_DELETE(self) -> None:
        found = re.fullmatch(r"/contexts/([\w-]+)", self.path)
        with self.kernels.lock:
            kernel = self.kernels.all.get(found.group(1)) if found else None
            if kernel is not None and kernel is not self.kernels.default:
                del self.kernels.all[kernel.id]
        if kernel is None:
            self._json(404, {"error": f"no context {self.path[10:]}"})
            return
        if kernel is not self.kernels.default:
            kernel.stop()
        self._json(200, {})

    def do_POST(self) -> None:
        body = self._body()
        if body is None:
            return
        if self.path == "/execute":
            self._execute(body)
        elif self.path == "/contexts":
            if self._language(body):
                kernel = Kernel("python", body.get("cwd") or self.kernels.default.cwd)
                with self.kernels.lock:
                    self.kernels.all[kernel.id] = kernel
                self._json(200, kernel.as_json())
        elif found := re.fullmatch(r"/contexts/([\w-]+)/restart", self.path):
            kernel = self.kernels.get(found.group(1))
            if kernel is None:
                self._json(404, {"error": f"no context {found.group(1)}"})
                return
            with kernel.lock:
                kernel.stop()
                kernel.start()
            self._json(200, {})
        else:
            self._json(404, {"error": f"no {self.path}"})

    def _execute(self, body: dict) -> None:
        if body.get("context_id") and body.get("language"):
            self._json(400, {"error": "a context or a language, not both"})
            return
        if not self._language(body):
            return
        kernel = self.kernels.get(body.get("context_id"))
        if kernel is None:
            self._json(404, {"error": f"no context {body.get('context_id')}"})
            return
        code, env = body.get("code"), body.get("env_vars") or {}
        if not isinstance(code, str) or not isinstance(env, dict):
            self._json(400, {"error": "code: a string; env_vars: an object"})
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        alive = [True]

        def emit(message: dict) -> bool:
            if alive[0]:
                data = json.dumps(message).encode() + b"\n"
                try:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                except OSError:
                    alive[0] = False
            return alive[0]

        with kernel.lock:
            kernel.execute(code, {str(k): str(v) for k, v in env.items()}, emit, self.connection)
        if alive[0]:
            with contextlib.suppress(OSError):
                self.wfile.write(b"0\r\n\r\n")  # the body's end


def main() -> None:
    port = int(sys.argv[1])
    Handler.kernels = Kernels(os.getcwd())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

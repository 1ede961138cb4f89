"""A scripted HTTP mirror on 127.0.0.1 for download tests, and what it can answer.

A test says, per file, what the mirror answers to successive requests (`serve`,
`status`, `cut_off`, `stall`, ...); the last answer repeats.
"""

import gzip
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Answer = Callable[[BaseHTTPRequestHandler], None]


def send(handler: BaseHTTPRequestHandler, body: bytes, headers: dict[str, str] | None = None) -> None:
    """200 with the body, its Content-Length and any other `headers`."""
    handler.send_response(200)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def serve(body: bytes) -> Answer:
    return lambda handler: send(handler, body)


def status(code: int) -> Answer:
    def answer(handler):
        handler.send_response(code)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return answer


def cut_off(body: bytes) -> Answer:
    """Promise the whole body in Content-Length, send half of it, hang up."""

    def answer(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[: len(body) // 2])
        handler.wfile.flush()
        handler.connection.shutdown(socket.SHUT_RDWR)

    return answer


def gzip_if_accepted(body: bytes) -> Answer:
    """Compress on the fly for clients that accept gzip, as many web servers do."""

    def answer(handler):
        if "gzip" not in handler.headers.get("Accept-Encoding", ""):
            return send(handler, body)
        send(handler, gzip.compress(body), {"Content-Encoding": "gzip"})

    return answer


def stall(seconds: float) -> Answer:
    def answer(handler):
        threading.Event().wait(seconds)  # longer than the client's timeout

    return answer


def stall_after_headers(seconds: float) -> Answer:
    """Answer 200 with a Content-Length, then send no byte of the body."""

    def answer(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        handler.wfile.flush()
        threading.Event().wait(seconds)  # longer than the client's timeout

    return answer


class Mirror:
    """A scripted HTTP mirror: `answers[name]` lists its replies to successive requests."""

    def __init__(self):
        self.answers: dict[str, list[Answer]] = {}
        self.requested: list[str] = []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                mirror.requested.append(name)
                replies = mirror.answers.get(name, [status(404)])
                (replies.pop(0) if len(replies) > 1 else replies[0])(self)

            def log_message(self, *args):  # keep pytest's output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/mnist/"
        # A short poll interval: shutdown() waits for the serving loop's next look at its flag.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def trickle(body: bytes, pause: float) -> Answer:
    """Send the body one byte at a time, `pause` seconds apart: never silent long enough to time out."""

    def answer(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        for byte in body:
            try:
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
            except OSError:  # the client gave up: what the test wants
                return
            time.sleep(pause)

    return answer

"""An OpenAI-compatible HTTP server for a llama_ref model (install with `pip install -e ".[server]"`).

    app = llama_ref.server.create_app(llama_ref.load("smollm2-135m-instruct"))   # an ASGI app
    llama_ref.server.serve(model, port=8321)                                       # or run it here

app.py: the endpoints and the OpenAI request/response shapes; batcher.py: the one thread that runs the
model, with continuous batching and prefix reuse; guard.py: Llama Guard shields; metrics.py: /metrics.
"""

from __future__ import annotations

import socket
import threading
import time

from .app import APIError, create_app
from .batcher import Batcher, Job, QueueFull
from .guard import LlamaGuard

__all__ = ["APIError", "Batcher", "Job", "LlamaGuard", "QueueFull", "BackgroundServer", "create_app", "serve"]


def serve(model, *, host: str = "127.0.0.1", port: int = 8321, guard=None, log_level: str = "info",
          **options) -> None:
    """Serve `model` until interrupted (Ctrl-C). options go to create_app (max_batch, max_queue, ...)."""
    import uvicorn

    uvicorn.run(create_app(model, guard, **options), host=host, port=port, log_level=log_level)


class BackgroundServer:
    """A uvicorn server on a thread of this process, on a free port (tests, benchmarks):

        with BackgroundServer(app) as url: ... requests to url ...
    """

    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, 0))  # the system picks a free port; the server takes the bound socket
        self.url = f"http://{host}:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()

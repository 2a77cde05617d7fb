"""The FastAPI application of `tipslab serve` (routes, request validation, errors as one-line 4xx),
and `ServerThread` for tests and the load bench. The work itself is in `retrieval.service`.
"""

from __future__ import annotations

import socket
import threading
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from tipslab.errors import TipslabError
from tipslab.retrieval import service

MAX_BODY_BYTES = 1 << 20


class Region(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_id: int = Field(ge=0)
    box: Annotated[list[float], Field(min_length=4, max_length=4)]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: str | None = None
    query: Annotated[str, Field(max_length=service.MAX_QUERY_CHARS)] | None = None
    region: Region | None = None
    k: int = Field(default=10, gt=0, le=service.MAX_K)
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    per_image: int | None = Field(default=None, gt=0, le=16)
    filters: dict | None = None


def create_app(indexes: dict):
    """The app over already loaded indexes (`service.load_indexes`)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response

    app = FastAPI(title="tipslab region search", docs_url="/api/docs", openapi_url="/api/openapi.json")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.middleware("http")
    async def refuse_huge_bodies(request: Request, call_next):
        # Parsing comes before validation: a 100 MB body would be read and decoded whole first.
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return error(413, f"body: larger than {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        if first.get("type") == "json_invalid":
            return error(400, f"body: malformed JSON ({first.get('ctx', {}).get('error', 'cannot parse')})")
        return error(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(TipslabError)
    async def tipslab_error(_request: Request, exc: TipslabError):
        return error(400, str(exc))

    @app.exception_handler(FileNotFoundError)
    async def gone(_request: Request, exc: FileNotFoundError):
        return error(404, str(exc))

    def pick(name: str | None):
        if name is None:
            if len(indexes) == 1:
                return next(iter(indexes.values()))
            raise LookupError(f"index: several are served ({', '.join(indexes)}); say which")
        if name not in indexes:
            raise LookupError(f"index {name!r}: not served here; expected one of {', '.join(indexes)}")
        return indexes[name]

    @app.exception_handler(LookupError)
    async def unknown(_request: Request, exc: LookupError):
        return error(404, exc.args[0] if exc.args else "not found")

    @app.get("/api/health")
    def health():
        return {"status": "ok", "indexes": list(indexes)}

    @app.get("/api/indexes")
    def index_info():
        return {"indexes": [served.info() for served in indexes.values()]}

    @app.post("/api/search")
    def search(request: SearchRequest):
        if (request.query is None) == (request.region is None):
            raise TipslabError("body: expected exactly one of 'query' (text) or 'region' ({image_id, box})")
        if request.query is not None and not request.query.strip():
            raise TipslabError("query: expected non-empty text")
        served = pick(request.index)
        return service.run_search(served, request.model_dump())

    def ints(text: str, what: str) -> list[int]:
        try:
            return [int(float(v)) for v in text.split(",")]
        except ValueError:
            raise TipslabError(f"{what}: expected comma-separated integers, got {text!r}") from None

    @app.get("/api/image/{name}/{image_id}")
    def image(name: str, image_id: int):
        return FileResponse(service.image_file(pick(name), image_id))

    @app.get("/api/crop/{name}/{image_id}")
    def crop(name: str, image_id: int, box: str):
        return Response(service.crop_png(pick(name), image_id, ints(box, "box")), media_type="image/png")

    @app.get("/api/heatmap/{name}/{image_id}")
    def heatmap(name: str, image_id: int, query: str | None = None, region: str | None = None):
        if query is not None and len(query) > service.MAX_QUERY_CHARS:
            raise TipslabError(f"query: longer than {service.MAX_QUERY_CHARS} characters")
        png = service.heatmap_png(pick(name), image_id, query, None if region is None else ints(region, "region"))
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/")
    def page():
        return Response(service.page_file("index.html"), media_type="text/html; charset=utf-8")

    @app.get("/page/{name}")
    def page_asset(name: str):
        kinds = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in kinds:
            raise LookupError(f"/page/{name}: no such file")
        return Response(service.page_file(name), media_type=kinds[name])

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), or a one-line error: taken before the models load,
    so a busy port fails at once, and handed to uvicorn, so nothing can take it in between."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        raise TipslabError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None
    return sock


def run(indexes: dict, sock: socket.socket) -> None:
    """Serve until interrupted (Ctrl-C) on a socket from `bind`."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(indexes), log_level="warning"))
    server.run(sockets=[sock])


class ServerThread:
    """The app served by uvicorn from a background thread on a free loopback port."""

    def __init__(self, indexes: dict, host: str = "127.0.0.1"):
        import uvicorn

        self.socket = bind(host, 0)
        self.url = f"http://{host}:{self.socket.getsockname()[1]}"
        config = uvicorn.Config(create_app(indexes), log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("tipslab serve: the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()

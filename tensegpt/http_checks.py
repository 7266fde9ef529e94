"""
The HTTP harness beneath serve.py: every refusal in OpenAI's error shape, the checks every
request passes before a route sees it (its size, its key, its origin and host), and the port
checked at start.
"""

import hmac
import json
import re
import socket
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from tensegpt.common import UserError
from tensegpt.openai_api import ApiError


def check_port(host, port):
    """Refuses, before the model loads, an address another server is listening on (as uvicorn would bind it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            message = f"cannot listen on {host}:{port} ({e.strerror}): stop what is there, or pass another --port"
            raise UserError(message) from None


def field_path(error):
    """
    Where a pydantic error is, as field names and list indices: the body's own place left out, and the member of a
    union that failed ('str', 'list[str]', 'TextPart'), which pydantic puts in the path.
    """

    def is_type(p):
        return p in ("str", "int", "float", "bool", "dict", "list") or "[" in p or p[:1].isupper() or "-" in p

    return [str(p) for p in error["loc"] if p != "body" and not (isinstance(p, str) and is_type(p))]


def install_errors(app: FastAPI):
    """Every refusal in OpenAI's error shape: the server's own, pydantic's, an unknown route, a crash."""

    @app.exception_handler(ApiError)
    async def api_error(request, e):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        errors = e.errors()
        first = errors[0]
        if first["type"] != "json_invalid":
            # a field that may be of several types fails once per type: the failure deepest in the field names it
            field = field_path(first)[:1]
            same = [error for error in errors if field_path(error)[:1] == field]
            deepest = max(len(field_path(error)) for error in same)
            place = next(field_path(error) for error in same if len(field_path(error)) == deepest)
            same = [error for error in same if field_path(error) == place]
            first = same[0] | {"msg": ", or ".join(dict.fromkeys(error["msg"] for error in same))}
        where = field_path(first)
        param = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in where).lstrip(".") or None
        if first["type"] == "json_invalid":
            at = first["loc"][-1]
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])} at character {at}"
            return ApiError(400, message).response()
        elif first["type"] == "missing":
            message = f"{param} is required"
        else:
            message = f"{param or 'the body'}: {first['msg']}; got {json.dumps(first.get('input'), default=repr)[:80]}"
        return ApiError(400, message, param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        if e.status_code == 404:
            return ApiError(404, f"no route {request.method} {request.url.path}", kind="not_found_error").response()
        if e.status_code == 400:
            # FastAPI's own, when its JSON reader gives up (nesting too deep for it, say)
            message = f"the body is not valid JSON this server can read ({e.detail}): send an object of fields"
            return ApiError(400, message).response()
        if e.status_code == 405:
            return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()
        return ApiError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def crash(request, e):
        return ApiError(500, f"internal error: {e.__class__.__name__}", kind="server_error").response()


class ReadsJson:
    """
    Reads every POST body as JSON, whatever Content-Type it declares: `curl -d` without `-H` declares a form, and
    FastAPI would then not parse the body at all (llama.cpp's server reads JSON the same way). A body that is not
    JSON is then refused as such, with where it breaks.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=[*headers, (b"content-type", b"application/json")])
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses a request body over max_bytes with 413, by its Content-Length or as it arrives (chunked)."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        too_big = ApiError(413, f"the body is over the limit of {self.max_bytes} bytes (--max_body_bytes)")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await too_big.response()(scope, receive, send)
        # no length declared (a chunked body): read it here, up to the limit, and hand it on whole
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body, more = body + message.get("body", b""), message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await too_big.response()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def check_key(request: Request, api_key):
    """
    With an API key set, a /v1 request must carry it, as 'Authorization: Bearer KEY' (the scheme's case aside, as
    RFC 9110 reads it) or as 'X-Api-Key: KEY' (llama.cpp's server takes both); 401 otherwise. Compared in constant
    time, so that how long a refusal takes tells nothing about the key.
    """
    if not api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    sent = token.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(sent.encode(), api_key.encode()):
        message = "a valid API key is required: send 'Authorization: Bearer KEY' or 'X-Api-Key: KEY'"
        raise ApiError(401, message, kind="authentication_error")


# the pages of this machine, on any port: the origins allowed by default (Ollama's default)
LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"
LOOPBACK = ("localhost", "127.0.0.1", "::1")


def host_name(host):
    """A Host header's name: '127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1'."""
    return (urlsplit("//" + host).hostname or "").lower()


def origins_pattern(cors_origins):
    """--cors_origins as one regular expression: 'local' (this machine's pages), '*' (any), or origins as written."""
    names = [o.strip().rstrip("/") for o in cors_origins.split(",") if o.strip()]
    if "*" in names:
        return ".*"
    return "|".join(LOCAL_ORIGINS if o == "local" else re.escape(o) for o in names) or "(?!)"


class LocalOnly:
    """
    Refuses (403) what a web page the user opens could send, before any route runs. A request from a page whose
    origin --cors_origins does not allow (CORS only stops a page reading the answer, not sending the request; a
    text/plain POST needs no preflight), unless the page is the server's own. And while the server listens on
    loopback, a Host header that is not this machine's name: a DNS-rebinding page reaches 127.0.0.1 under its own.
    """

    def __init__(self, app, origins, loopback):
        self.app, self.origins, self.loopback = app, re.compile(origins), loopback

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            host, origin = headers.get("host", ""), headers.get("origin")
            refusal = None
            if self.loopback and host and host_name(host) not in LOOPBACK:
                refusal = f"the Host header {host!r} is not this machine's: on loopback the server answers localhost"
            elif origin and not self.origins.fullmatch(origin) and urlsplit(origin).netloc != host:
                refusal = f"pages of {origin} may not call this server: start it with --cors_origins={origin} to allow"
            if refusal:
                return await ApiError(403, refusal, kind="permission_error").response()(scope, receive, send)
        await self.app(scope, receive, send)

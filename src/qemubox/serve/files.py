"""envd's ``GET /files`` and ``POST /files``: a file's bytes read or written as a user of
the guest (the user's own permissions: the command that reads or writes runs as them),
missing parents made; uploads as multipart (several files at once, each part named by its
path) or as one octet-stream body, gzip-encoded or not; downloads gzip-encoded when the
client asks. Sizes are bounded: MAX_FILE bytes a file, decoded."""

from __future__ import annotations

import asyncio
import base64
import errno
import gzip
import hashlib
import hmac
import time
import zlib

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from qemubox.errors import GuestError, InputError, QemuboxError
from qemubox.guest.protocol import own_shell
from qemubox.serve.control import error
from qemubox.serve.envd import not_found_message, resolve
from qemubox.serve.guests import Gone, Guest, Who

MAX_FILE = 256 << 20  # bytes of one file read or written
MAX_UPLOAD = MAX_FILE + (1 << 20)  # bytes of a request body
READ = 'cat -- "$1"'
WRITE = 'd=$(dirname -- "$1") && mkdir -p -- "$d" && cat > "$1"'


def signature(path: str, operation: str, user: str, token: str, expiration: int | None) -> str:
    raw = f"{path}:{operation}:{user}:{token}"
    if expiration is not None:
        raw += f":{expiration}"
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode()


def signed(request: Request, token: str, operation: str) -> bool:
    """Whether the request's ``signature`` (E2B's v1) is the token's for its path, operation
    and user, and not expired."""
    q = request.query_params
    given = q.get("signature")
    if not given:
        return False
    expiration = q.get("signature_expiration")
    if expiration is not None and (not expiration.isdigit() or int(expiration) < time.time()):
        return False
    exp = int(expiration) if expiration is not None else None
    want = signature(q.get("path", ""), operation, q.get("username", ""), token, exp)
    return hmac.compare_digest(want.encode(), given.encode())


def refusal(err: Exception, guest: Guest) -> JSONResponse:
    """A failed read or write as envd answers it."""
    if isinstance(err, _Refused):
        return error(err.status, str(err))
    if isinstance(err, Gone):
        return error(502, not_found_message(guest.id))
    return error(500, str(err))


def operation_of(request: Request) -> str:
    return "read" if request.method == "GET" else "write"


async def _who(guest: Guest, user: str | None) -> Who:
    try:
        return await asyncio.to_thread(guest.who, user)
    except InputError as err:
        raise _Refused(401, f"error looking up user '{user}': {err}") from None


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _run(guest: Guest, who: Who, script: str, path: str, data: bytes | None = None):
    def run(box):
        return box.exec(own_shell(script, path), stdin=data, user=who.ids, max_output=MAX_FILE + 1)

    return guest.call(run)


async def download(request: Request, guest: Guest) -> Response:
    q = request.query_params
    try:
        who = await _who(guest, q.get("username") or None)
        path = resolve(q.get("path", ""), who) if q.get("path") else ""
        if not path:
            raise _Refused(400, "path: a file's path is needed")
        try:
            entry = await asyncio.to_thread(guest.call, lambda b: b.files.stat(path, who.ids))
        except GuestError as err:
            if err.errno == errno.ENOENT:
                raise _Refused(404, f"path '{path}' does not exist") from None
            if err.errno in (errno.EACCES, errno.EPERM):
                raise _Refused(500, f"error opening file '{path}': permission denied") from None
            raise _Refused(400, str(err)) from None
        if entry.kind == "dir":
            raise _Refused(400, f"path '{path}' is a directory")
        if entry.size > MAX_FILE:
            raise _Refused(400, f"path '{path}': {entry.size} bytes, at most {MAX_FILE}")
        result = await asyncio.to_thread(_run, guest, who, READ, path)
        if result.truncated:  # a device, or a file that grew: no more than the bound
            raise _Refused(400, f"path '{path}': more than {MAX_FILE} bytes")
        if result.exit_code != 0:
            said = result.stderr.decode(errors="replace").strip()
            raise _Refused(500, f"error reading file '{path}': {said}")
        data = result.stdout
    except (_Refused, Gone, QemuboxError) as err:
        return refusal(err, guest)
    headers = {"Content-Disposition": f'attachment; filename="{entry.name}"'}
    if "gzip" in request.headers.get("accept-encoding", ""):
        data = await asyncio.to_thread(gzip.compress, data, 1)
        headers["Content-Encoding"] = "gzip"
    return Response(data, media_type="application/octet-stream", headers=headers)


async def _body(request: Request) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_UPLOAD:
        raise _Refused(413, f"the upload is {int(length)} bytes; at most {MAX_UPLOAD}")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_UPLOAD:
            raise _Refused(413, f"the upload is over {MAX_UPLOAD} bytes")
    return bytes(data)


def gunzip(data: bytes) -> bytes:
    """``data`` decoded, refused past MAX_FILE bytes (a small bomb expands no further)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, MAX_FILE + 1)
    except zlib.error as err:
        raise _Refused(400, f"the body is not gzip: {err}") from None
    if len(out) > MAX_FILE or inflater.unconsumed_tail:
        raise _Refused(413, f"the file is over {MAX_FILE} bytes decoded")
    return out


async def upload(request: Request, guest: Guest) -> Response:
    q = request.query_params
    try:
        who = await _who(guest, q.get("username") or None)
        kind = request.headers.get("content-type", "")
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding not in ("identity", "gzip"):
            raise _Refused(400, f"Content-Encoding: {encoding} (identity or gzip)")
        files: list[tuple[str, bytes]] = []
        if kind.startswith("multipart/form-data"):
            body = await _body(request)  # bounded as a whole, then parsed

            async def replay() -> dict:
                return {"type": "http.request", "body": body, "more_body": False}

            form_request = Request(request.scope, replay)
            async with form_request.form(max_files=1000, max_part_size=MAX_FILE) as form:
                for key, part in form.multi_items():
                    if key != "file" or isinstance(part, str):
                        continue
                    data = await part.read()
                    name = part.filename or q.get("path", "")
                    files.append((name, data))
            if not files:
                raise _Refused(400, "the form has no 'file' part")
        else:
            data = await _body(request)
            if encoding == "gzip":
                data = await asyncio.to_thread(gunzip, data)
            files.append((q.get("path", ""), data))
        written = []
        for name, data in files:
            if not name:
                raise _Refused(400, "path: a file's path is needed")
            if len(data) > MAX_FILE:
                raise _Refused(413, f"{name}: over {MAX_FILE} bytes")
            path = resolve(name, who)
            result = await asyncio.to_thread(_run, guest, who, WRITE, path, data)
            if result.exit_code != 0:
                said = result.stderr.decode(errors="replace").strip()
                status = 507 if "space" in said else 500  # as envd: 500 for a refusal
                raise _Refused(status, f"error writing file '{path}': {said}")
            written.append({"name": path.rpartition("/")[2], "type": "file", "path": path})
    except (_Refused, Gone, QemuboxError) as err:
        return refusal(err, guest)
    return JSONResponse(written)

"""The ASGI app of `hade_jax.serve`: the search page, the JSON API and the clips' files.

  GET  /                       the page (hade_jax/web/index.html, app.js, app.css)
  GET  /api/search?q=&k=&offset=&shortlist=   text -> clips
  GET  /api/similar?clip=&k=&offset=          more like a clip (global-embedding cosine)
  POST /api/upload?k=&offset=  (multipart 'file')  search by an example clip
  GET  /api/info               the index: its name, clips, the limits
  GET  /audio/{clip}           the clip's file (HTTP range requests: browsers seek with them)
  GET  /thumbnail/{clip}       its spectrogram (PNG, rendered once)
  GET  /docs, /openapi.json    the framework's API documentation

Clips are named by id (their row in the index), never by path: anything else is a 404. Every
error is JSON {"error": message} (a small page for a browser navigating to it); an unexpected
one is logged here and answered without its traceback.
"""

from __future__ import annotations

import asyncio
import html
import importlib.resources
import logging
import shutil
import time

import fastapi
from fastapi import responses
from starlette import exceptions as starlette_exceptions
from starlette import staticfiles

from hade_jax import serving

log = logging.getLogger("hade_jax.webapp")

_WEB = importlib.resources.files("hade_jax") / "web"
_SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                     "X-Frame-Options": "DENY"}


def create_app(engine: serving.Engine) -> fastapi.FastAPI:
  """The app serving `engine`'s index."""
  app = fastapi.FastAPI(title="hade_jax search",
                        description=f"Text-to-audio search over {len(engine.index)} clips "
                        f"(index {engine.index.path.name}).", version="1")
  _add_error_handlers(app)
  _add_api(app, engine)
  _add_files(app, engine)

  @app.middleware("http")
  async def guard(request: fastapi.Request, call_next):
    if request.url.path == "/api/upload":  # refused before the body is read, not after
      problem = _upload_size_problem(request, engine.limits.max_upload_bytes)
      if problem:
        response = _error(request, *problem)
        response.headers.update(_SECURITY_HEADERS)
        return response
    response = await call_next(request)
    response.headers.update(_SECURITY_HEADERS)
    return response

  return app


def _error(request: fastapi.Request, status: int, message: str) -> responses.Response:
  if "text/html" in request.headers.get("accept", "") and not request.url.path.startswith(
      "/api/"):
    page = (_WEB / "error.html").read_text(encoding="utf-8")
    page = page.replace("{{status}}", str(status)).replace("{{message}}", html.escape(message))
    return responses.HTMLResponse(page, status_code=status)
  return responses.JSONResponse({"error": message, "status": status}, status_code=status)


# Room for the multipart envelope around an uploaded file (boundaries, headers, k, offset).
_MULTIPART_OVERHEAD = 16 << 10


def _upload_size_problem(request: fastapi.Request, limit: int) -> tuple[int, str] | None:
  length = request.headers.get("content-length")
  if length is None or not length.isdigit():
    return 411, "an upload needs a Content-Length header"
  if int(length) > limit + _MULTIPART_OVERHEAD:
    return 413, f"the upload is {int(length)} bytes; uploads are limited to {limit} bytes"
  return None


def _add_error_handlers(app: fastapi.FastAPI) -> None:
  @app.exception_handler(serving.RequestError)
  async def request_error(request, e: serving.RequestError):
    return _error(request, e.status, str(e))

  @app.exception_handler(starlette_exceptions.HTTPException)
  async def http_error(request, e: starlette_exceptions.HTTPException):
    message = "not found" if e.status_code == 404 else str(e.detail)
    return _error(request, e.status_code, f"{message}: {request.url.path[:200]}")

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def bad_parameter(request, e: fastapi.exceptions.RequestValidationError):
    problems = "; ".join(f"{'.'.join(map(str, x['loc'][1:])) or x['loc'][0]}: {x['msg']}"
                         for x in e.errors())
    return _error(request, 400, problems)

  @app.exception_handler(Exception)
  async def internal_error(request, e: Exception):
    log.exception("%s %s failed", request.method, request.url.path)
    return _error(request, 500, f"internal error ({type(e).__name__}); the server's log has "
                  "the details")


def _add_api(app: fastapi.FastAPI, engine: serving.Engine) -> None:
  limits = engine.limits
  k_query = fastapi.Query(10, description=f"results per page (1-{limits.max_k})")
  offset_query = fastapi.Query(0, description="results skipped (paging)")

  @app.get("/api/info")
  def info() -> dict:
    """The index served (by folder name: no server paths are shown) and the limits."""
    return {"clips": len(engine.index), "index": engine.index.path.name, "limits": {
                "max_query_chars": limits.max_query_chars, "max_k": limits.max_k,
                "max_results": limits.max_results, "shortlists": list(limits.shortlists),
                "default_shortlist": limits.default_shortlist,
                "max_upload_bytes": limits.max_upload_bytes,
                "max_upload_seconds": limits.max_upload_seconds}}

  @app.get("/api/search")
  async def search(q: str = fastapi.Query(..., description="what the sound is like"),
                   k: int = k_query, offset: int = offset_query,
                   shortlist: int | None = fastapi.Query(
                       None, description="clips re-ranked with the full HADE score (one of "
                       f"{list(limits.shortlists)}; default {limits.default_shortlist})")
                   ) -> dict:
    """The clips that best match a text: global-cosine shortlist, then the full score."""
    t0 = time.perf_counter()
    rows, scores, timing = await asyncio.wrap_future(engine.search_text(q, k, offset, shortlist))
    return {"query": q, "offset": offset, "k": k, "corpus": len(engine.index),
            "results": engine.hits(rows, scores, offset), "took_ms": _ms(t0), **timing}

  @app.get("/api/similar")
  def similar(clip: str = fastapi.Query(..., description="a clip id (from a result)"),
              k: int = k_query, offset: int = offset_query) -> dict:
    """More like a clip: the others ranked by the cosine of their global embeddings."""
    t0 = time.perf_counter()
    rows, scores = engine.similar(clip, k, offset)
    row = engine.check_clip(clip)
    return {"clip": row, "name": engine.index.names[row], "offset": offset, "k": k,
            "corpus": len(engine.index), "results": engine.hits(rows, scores, offset),
            "took_ms": _ms(t0)}

  @app.post("/api/upload")
  async def upload(file: fastapi.UploadFile, k: int = k_query,
                   offset: int = offset_query) -> dict:
    """Search by an example: the clips closest to an uploaded one (global embedding)."""
    t0 = time.perf_counter()
    count = engine.check_page(k, offset)
    data = await file.read(limits.max_upload_bytes + 1)
    name = (file.filename or "upload")[-100:]
    scratch = serving.scratch_dir()
    try:
      wave = await asyncio.to_thread(engine.decode_upload, data, name, scratch)
    finally:
      shutil.rmtree(scratch, ignore_errors=True)
    g_D, timing = await asyncio.wrap_future(engine.embed_upload(wave))
    rows, scores = engine.nearest(g_D, count)
    return {"upload": name, "offset": offset, "k": k, "corpus": len(engine.index),
            "results": engine.hits(rows, scores, offset), "took_ms": _ms(t0), **timing}


def _add_files(app: fastapi.FastAPI, engine: serving.Engine) -> None:
  @app.get("/", include_in_schema=False)
  def page() -> responses.Response:
    return responses.FileResponse(str(_WEB / "index.html"), media_type="text/html")

  app.mount("/static", staticfiles.StaticFiles(directory=str(_WEB)), name="static")

  @app.get("/audio/{clip}", summary="A clip's audio file (HTTP range requests supported)")
  def audio(clip: str) -> responses.FileResponse:
    path = engine.clip_path(clip)
    # Starlette answers Range headers (206 + Content-Range) for a FileResponse.
    return responses.FileResponse(path, headers={"Cache-Control": "max-age=3600"},
                                  content_disposition_type="inline")

  @app.get("/thumbnail/{clip}", summary="A clip's spectrogram (PNG)")
  def thumbnail(clip: str) -> responses.Response:
    return responses.Response(engine.thumbnail(clip), media_type="image/png",
                              headers={"Cache-Control": "max-age=86400"})


def _ms(t0: float) -> float:
  return 1e3 * (time.perf_counter() - t0)

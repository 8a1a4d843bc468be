"""`itmatch serve`: a FastAPI app over one index, run by uvicorn.

    POST /search/text           {"text": "...", "k": 10}            -> images
    POST /search/image          multipart: file=<image>, k=10       -> captions
    GET  /items/{id}            an item's metadata
    GET  /items/{id}/thumbnail  a PNG thumbnail of an indexed image file
    GET  /healthz               liveness and what is served
    GET  /                      the web page (static files shipped in the package, no CDN)
    GET  /docs, /openapi.json   OpenAPI

The model and the index are loaded once, before the first request. Encoding and searching run in a
thread pool (`--workers`), so the event loop keeps accepting requests while the model works.
Every bad request gets a 4xx with a message: a size limit (413), a wrong content type (415), a body
that is not JSON or not an image, a bad field (422 / 400), an unknown id (404). Files are served
only by item id from the paths the index recorded, never from a path in a request; nothing is
unpickled.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations, imported locally below

import asyncio
import io
import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path

from itmatch.errors import ItmatchError

STATIC = Path(__file__).parent / "static"
MAX_TEXT_CHARS = 1000
MAX_JSON_BYTES = 16 * 1024
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_K = 100
THUMBNAIL = 256


def create_app(index, workers: int = 4, max_image_bytes: int = MAX_IMAGE_BYTES):
    from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, Field, ValidationError

    class TextQuery(BaseModel):
        text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="the sentence to search images for")
        k: int = Field(10, ge=1, le=MAX_K)
        model_config = {"extra": "forbid"}

    index.warm()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="itmatch-search")

    @asynccontextmanager
    async def lifespan(app):
        yield
        pool.shutdown(wait=False)

    app = FastAPI(title="itmatch search", version="1", lifespan=lifespan,
                  description=f"Image-text search over {index.folder.name} ({index.kind} model).")
    app.state.pool = pool

    async def run(func, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, func, *args)
        except ItmatchError as exc:
            raise HTTPException(400, str(exc)) from None

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        errors = [{"loc": list(e.get("loc", [])), "msg": e.get("msg", "")} for e in exc.errors()]
        return JSONResponse({"detail": "invalid request", "errors": errors}, status_code=422)

    def hits_json(hits):
        # image hits name their thumbnail URL, never the server's file path
        return {"results": [{"id": h.id, "key": h.key, "score": round(h.score, 6),
                             "thumbnail": f"/items/{h.id}/thumbnail" if h.path else None}
                            if h.side == "image" else h.to_dict() for h in hits]}

    @app.post("/search/text", summary="images for a sentence",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": TextQuery.model_json_schema()}}}})
    async def search_text(request: Request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HTTPException(415, f"send JSON (content-type application/json), not {ctype or 'nothing'}")
        if int(request.headers.get("content-length") or 0) > MAX_JSON_BYTES:
            raise HTTPException(413, f"request body over {MAX_JSON_BYTES} bytes")
        body = await request.body()
        if len(body) > MAX_JSON_BYTES:
            raise HTTPException(413, f"request body over {MAX_JSON_BYTES} bytes")
        try:
            query = TextQuery.model_validate(json.loads(body))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPException(400, f"the body is not valid JSON: {exc}") from None
        except ValidationError as exc:
            errors = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
            return JSONResponse({"detail": "invalid query", "errors": errors}, status_code=422)
        if not query.text.strip():
            raise HTTPException(422, "the text query is empty")
        return hits_json(await run(index.search_text, query.text, query.k))

    @app.post("/search/image", summary="captions for an uploaded image")
    async def search_image(request: Request, file: UploadFile = File(..., description="a PNG, JPEG, ... image"),
                           k: int = Form(10, ge=1, le=MAX_K)):
        if int(request.headers.get("content-length") or 0) > max_image_bytes + 64 * 1024:
            raise HTTPException(413, f"upload over {max_image_bytes} bytes")
        ctype = (file.content_type or "").lower()
        if not ctype.startswith("image/"):
            raise HTTPException(415, f"upload an image (content-type image/*), not {ctype or 'nothing'}")
        data = await file.read(max_image_bytes + 1)
        if len(data) > max_image_bytes:
            raise HTTPException(413, f"upload over {max_image_bytes} bytes")
        if not data:
            raise HTTPException(400, "the uploaded file is empty")
        return hits_json(await run(index.search_image, data, k))

    def item_row(item_id: int):
        row = index.store.get(item_id)
        if row is None:
            raise HTTPException(404, f"no item with id {item_id}")
        return row

    @app.get("/items/{item_id}", summary="an item's metadata")
    async def get_item(item_id: int):
        row = item_row(item_id)
        out = {"id": item_id, "key": row["key"], "side": row["side"], "checksum": row["checksum"]}
        if row["side"] == "image":
            out["thumbnail"] = f"/items/{item_id}/thumbnail" if row["path"] else None
        else:
            out.update(caption=row["caption"], image_key=row["image_key"])
        return out

    @lru_cache(maxsize=2048)
    def thumbnail_png(path: str) -> bytes:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMBNAIL, THUMBNAIL))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
        return buf.getvalue()

    @app.get("/items/{item_id}/thumbnail", summary="a thumbnail of an indexed image",
             responses={200: {"content": {"image/png": {}}}})
    async def get_thumbnail(item_id: int):
        row = item_row(item_id)
        # the path comes from the index's own metadata, never from the request
        if row["side"] != "image" or not row["path"]:
            raise HTTPException(404, f"item {item_id} has no image file")
        if not Path(row["path"]).is_file():
            raise HTTPException(404, f"the image file of item {item_id} is gone")
        try:
            data = await run(thumbnail_png, row["path"])
        except OSError as exc:
            raise HTTPException(404, f"the image file of item {item_id} cannot be read: {exc}") from None
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/healthz", summary="liveness and what is served")
    async def healthz():
        m = index.store.manifest
        return {"status": "ok", "kind": index.kind, "method": m.get("method"), "backend": m.get("backend"),
                "items": m.get("items"), "model_hash": m.get("model_hash"),
                "image_queries": "any" if index.model.transform is not None else "indexed images only"}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    return app


def cmd_serve(args) -> int:
    import uvicorn

    from itmatch.retrieval.index import SearchIndex

    if not 0 < args.port < 65536:
        raise ItmatchError(f"--port must be 1-65535, got {args.port}")
    if args.workers < 1:
        raise ItmatchError("--workers must be >= 1")
    index = SearchIndex(args.index, args.model)
    app = create_app(index, workers=args.workers)
    print(f"itmatch: serving {args.index} on http://{args.host}:{args.port}/ (API docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0

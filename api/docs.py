"""The interactive API docs, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), with no
third-party script.

FastAPI's own pages load both from a public CDN (floating versions, no integrity hash) on
the origin where the dashboard keeps its token in localStorage, so a changed CDN script
could read the token; without internet (an air-gapped deployment) they are blank. Here
their scripts, style and favicon are the files the ``fastapi-offline`` package ships,
served under :data:`ASSETS_URL`, and each page carries its own Content-Security-Policy
(:func:`api.security.docs_policy`): this server's scripts and the page's inline script.
ReDoc's script is served with its one outside URL taken out (:func:`redoc_script`).
"""

import hashlib
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from api.security import docs_policy

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
ASSETS_URL = "/docs/assets"
#: Swagger UI 5 (it reads OpenAPI 3.1, the schema FastAPI writes; the 4.x of the
#: ``swagger-ui-bundle`` package shows "Unable to render this definition"), ReDoc 2.
ASSETS = resources.files("fastapi_offline") / "static"
REDOC_SCRIPT = "redoc.standalone.js"
#: The picture ReDoc shows beside its "API docs by Redocly" credit, fetched from Redocly's
#: CDN: the docs' CSP refused it (a console error) and an air-gapped server cannot reach it.
REDOC_LOGO_URL = "https://cdn.redoc.ly/redoc/logo-mini.svg"


def redoc_script() -> bytes:
    """The package's ReDoc script with :data:`REDOC_LOGO_URL` made an empty ``src``: the
    browser fetches nothing for it (so the CSP refuses nothing) and ReDoc, whose logo
    drops itself when the picture fails, shows the credit's words alone."""
    script = (ASSETS / REDOC_SCRIPT).read_bytes()
    return script.replace(b'"' + REDOC_LOGO_URL.encode("ascii") + b'"', b'""')


def _secured(page: HTMLResponse, **allow: bool) -> HTMLResponse:
    """The page with the CSP that allows its own inline scripts and ``allow``'s extras (the
    security middleware keeps a header a route set)."""
    page.headers["Content-Security-Policy"] = docs_policy(bytes(page.body).decode("utf-8"),
                                                          **allow)
    return page


def install(app: FastAPI) -> None:
    """Add the docs pages and their files to ``app``, made with ``docs_url=None`` and
    ``redoc_url=None`` (FastAPI's own pages off). URLs carry the ``root_path`` a proxy
    serving the API under a path prefix sets, as FastAPI's do."""
    redoc_js = redoc_script()
    redoc_etag = '"' + hashlib.sha256(redoc_js).hexdigest()[:32] + '"'

    @app.get(f"{ASSETS_URL}/{REDOC_SCRIPT}", include_in_schema=False)
    async def redoc_asset(request: Request) -> Response:  # before the mount (the file)
        """The ReDoc script, revalidated by its ETag as the mount's files are."""
        if request.headers.get("if-none-match") == redoc_etag:
            return Response(status_code=304, headers={"ETag": redoc_etag})
        return Response(redoc_js, media_type="text/javascript; charset=utf-8",
                        headers={"ETag": redoc_etag})

    app.mount(ASSETS_URL, StaticFiles(directory=str(ASSETS)), name="docs-assets")
    title = app.title
    openapi_url = app.openapi_url or "/openapi.json"

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        prefix = root(request)
        return _secured(get_swagger_ui_html(
            openapi_url=prefix + openapi_url, title=f"{title} - Swagger UI",
            swagger_js_url=f"{prefix}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{prefix}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{prefix}{ASSETS_URL}/favicon.png",
            oauth2_redirect_url=prefix + OAUTH2_REDIRECT_URL,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters))

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return _secured(get_swagger_ui_oauth2_redirect_html())

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        prefix = root(request)
        return _secured(get_redoc_html(
            openapi_url=prefix + openapi_url, title=f"{title} - ReDoc",
            redoc_js_url=f"{prefix}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{prefix}{ASSETS_URL}/favicon.png", with_google_fonts=False),
            inline_styles=True, blob_workers=True)

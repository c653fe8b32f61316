"""The Usage page and the middleware under every framework, behind one httpx client.

Starlette and Django's ASGI handler run in Starlette's TestClient; Flask and Django's
WSGI handler through httpx's WSGI transport. Django runs the example project's
settings (``examples.django_app.settings``), overridden per test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx2 as httpx

#: Where every framework's page is served in the tests (Django's test URLconf says so too).
PAGE = "/settings/usage"
FRAMEWORKS = ("starlette", "flask", "django-wsgi", "django-asgi")
DJANGO_STACKS = ("django-wsgi", "django-asgi")


def django_setup() -> None:
    """Configure Django once per process, with the example project's settings."""
    import django
    from django.apps import apps

    if not apps.ready:
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")
        django.setup()


@contextmanager
def django_settings(**overrides: Any) -> Iterator[None]:
    django_setup()
    from django.test.utils import override_settings

    with override_settings(**overrides):
        yield


def django_handler(stack: str) -> Any:
    """A new handler of the current settings (it builds the middleware chain)."""
    if stack == "django-asgi":
        from django.core.handlers.asgi import ASGIHandler

        return _without_lifespan(ASGIHandler())
    from django.core.handlers.wsgi import WSGIHandler

    return WSGIHandler()


def wsgi_client(app: Any) -> httpx.Client:
    transport = httpx.WSGITransport(app=app)
    return httpx.Client(transport=transport, base_url="http://testserver", follow_redirects=True)


def page_app(framework: str, guard: Any, **page: Any) -> Any:
    """The Starlette or Flask app serving the page of ``guard`` at :data:`PAGE`, with
    ``page`` options (identify, is_admin, trusted_origins)."""
    if framework == "starlette":
        from starlette.applications import Starlette

        from usage_guard import usage_app

        app = Starlette()
        app.mount(PAGE, usage_app(guard.aio, **page))
        return app
    if framework == "flask":
        from flask import Flask

        from usage_guard.flask import usage_blueprint

        flask_app = Flask(__name__)
        flask_app.register_blueprint(usage_blueprint(guard, **page), url_prefix=PAGE)
        return flask_app
    raise ValueError(framework)


def django_page_settings(guard: Any, **page: Any) -> dict[str, Any]:
    names = {"identify": "IDENTIFY", "is_admin": "IS_ADMIN", "trusted_origins": "TRUSTED_ORIGINS"}
    setting = {"GUARD": guard, **{names[key]: value for key, value in page.items()}}
    # No CSRF middleware: these tests are about the page's own origin check, which
    # every framework shares; Django's own CSRF has its tests in test_http_django.py.
    return {"USAGE_GUARD": setting, "ROOT_URLCONF": "django_urls", "MIDDLEWARE": []}


def _without_lifespan(app: Any) -> Any:
    """Django refuses lifespan scopes (uvicorn shrugs; Starlette's TestClient does not)."""

    async def serve(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return

    return serve

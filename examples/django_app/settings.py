"""Settings of the example: no database, usage_guard configured by ``USAGE_GUARD``."""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]", "testserver"]
ROOT_URLCONF = "examples.django_app.urls"
WSGI_APPLICATION = "examples.django_app.wsgi.application"
USE_TZ = True
DATABASES: dict[str, dict[str, str]] = {}

INSTALLED_APPS = ["usage_guard.django"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    # After the authentication middleware, in a real project: IDENTIFY reads request.user.
    "usage_guard.django.UsageGuardMiddleware",
]

USAGE_GUARD = {
    "GUARD": "examples.django_app.usage.guard",
    "IDENTIFY": "examples.django_app.usage.identify",
    "IS_ADMIN": "examples.django_app.usage.is_admin",
    "EXCLUDE": ["/health", "/settings/usage*"],
}

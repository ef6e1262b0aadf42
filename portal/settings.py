"""Settings, all read from the environment through portal.env (the one settings reader).

PLATFORM_ENV=development (the default: the embedded, no-services mode) or production (secure defaults,
secrets required). Every variable is listed in docs/configuration.md.
"""

from __future__ import annotations

from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from portal.env import env_bool, env_int, env_list, env_path, env_str, env_url

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = env_path("PLATFORM_VAR_DIR", BASE_DIR / "var")

PLATFORM_ENV = env_str("PLATFORM_ENV", "development")
if PLATFORM_ENV not in ("development", "production"):
    raise ImproperlyConfigured(f"PLATFORM_ENV={PLATFORM_ENV!r}: use 'development' or 'production'.")
PRODUCTION = PLATFORM_ENV == "production"

DEBUG = env_bool("DJANGO_DEBUG", not PRODUCTION)
# Known to everyone who reads this file: a process using it answers loopback only (portal.asgi) and refuses a
# database on another host (below).
DEVELOPMENT_SECRET_KEY = "development-only-key-never-used-in-production-0123456789abcdefghijklmnop"
SECRET_KEY = env_str("DJANGO_SECRET_KEY")
if not SECRET_KEY:
    if PRODUCTION:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY is required in production (50+ random characters).")
    SECRET_KEY = DEVELOPMENT_SECRET_KEY
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", [] if PRODUCTION else ["127.0.0.1", "localhost", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])
PUBLIC_URL = env_url("PLATFORM_PUBLIC_URL", "http://127.0.0.1:8000", schemes=("http", "https")).rstrip("/")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "portal",
    "tenants",
    "serving",
    "finetune",
    "billing",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "portal.security.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "portal.urls"
ASGI_APPLICATION = "portal.asgi.application"
WSGI_APPLICATION = "portal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "portal.context_processors.console",
            ],
            "builtins": ["portal.templatetags.portal_text"],  # `|sentence` in every template
        },
    },
]

# Database: DATABASE_URL, or a SQLite file under var/ (the embedded default).
_default_db = f"sqlite:///{VAR_DIR / 'platform.sqlite3'}"
try:
    DATABASES = {"default": dj_database_url.parse(env_str("DATABASE_URL", _default_db), conn_max_age=60)}
except ValueError as exc:
    raise ImproperlyConfigured(f"DATABASE_URL is not a database URL ({exc}). Example: postgres://user@host:5432/db") from None
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # WAL lets the gateway's ledger commit while pages read; synchronous=NORMAL drops an fsync per commit
    # (an OS crash may lose the last commits, a process crash loses nothing): the embedded mode only.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
_db_host = DATABASES["default"].get("HOST") or ""
if SECRET_KEY == DEVELOPMENT_SECRET_KEY and _db_host and _db_host not in ("localhost", "127.0.0.1", "::1") and not _db_host.startswith("/"):
    raise ImproperlyConfigured(
        f"DATABASE_URL names a database on {_db_host}, but DJANGO_SECRET_KEY is unset (the built-in development key, "
        "with which anyone can forge sessions and playground tokens). Set DJANGO_SECRET_KEY to 50+ random characters."
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Redis: unset = embedded in-process mode (limits and counters per process; said so in the console).
REDIS_URL = env_url("REDIS_URL", "", schemes=("redis", "rediss", "unix"))
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# Celery: Redis in production; a filesystem broker under var/ in the embedded default (no services).
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL or "filesystem://")
# Prepended to every key of a Redis broker: deployments (or test runs) sharing one Redis database stay apart.
CELERY_BROKER_KEY_PREFIX = env_str("CELERY_BROKER_KEY_PREFIX", "")
if CELERY_BROKER_URL.startswith("filesystem"):
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(VAR_DIR / "celery" / "queue"),
        "data_folder_out": str(VAR_DIR / "celery" / "queue"),
        "processed_folder": str(VAR_DIR / "celery" / "processed"),
        "control_folder": str(VAR_DIR / "celery" / "control"),
        "store_processed": False,
    }
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {"global_keyprefix": CELERY_BROKER_KEY_PREFIX} if CELERY_BROKER_KEY_PREFIX else {}
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
# GPU hosts consume `finetune`: training, and the Hub copy that reads its files. Uploads are validated from
# `validation`, by a worker of its own (scripts/up.sh), so that no training job or other work delays a tenant's file;
# a tenant has at most one message there at a time (finetune.services.training_file_validation_next), so the queue
# takes the tenants in turn. Everything else (the stale-job requeue included, which must not wait behind training)
# goes to `default`.
CELERY_TASK_ROUTES = {
    "finetune.tasks.run_finetune_job": {"queue": "finetune"},
    "finetune.tasks.push_adapter_to_hub": {"queue": "finetune"},
    "finetune.tasks.run_evaluation": {"queue": "finetune"},  # loads the base model and an adapter: a GPU host
    "finetune.tasks.merge_adapter": {"queue": "finetune"},  # merges into the base weights: where they and torch are
    "finetune.tasks.validate_training_file": {"queue": "validation"},
}
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_BEAT_SCHEDULE: dict = {}  # filled by each app's BEAT_SCHEDULE at the end of this file

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "console-home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns on every request when it is missing
STORAGE_DIR = env_path("PLATFORM_STORAGE_DIR", VAR_DIR / "storage")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(STORAGE_DIR)}},
    "staticfiles": {
        "BACKEND": (
            "whitenoise.storage.CompressedManifestStaticFilesStorage"
            if PRODUCTION
            else "django.contrib.staticfiles.storage.StaticFilesStorage"
        )
    },
}

# E-mail: SMTP when EMAIL_HOST is set; otherwise messages are written as files under var/mail.
EMAIL_HOST = env_str("EMAIL_HOST")
if EMAIL_HOST:
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_PORT = env_int("EMAIL_PORT", 587, minimum=1)
    EMAIL_HOST_USER = env_str("EMAIL_HOST_USER")
    EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD")
    EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", True)
else:
    EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
    EMAIL_FILE_PATH = VAR_DIR / "mail"
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "LLM Platform <noreply@localhost>")

# Stripe: unset secret key = invoices are produced but not sent to Stripe.
STRIPE_SECRET_KEY = env_str("STRIPE_SECRET_KEY")
STRIPE_WEBHOOK_SECRET = env_str("STRIPE_WEBHOOK_SECRET")
STRIPE_API_BASE = env_url("STRIPE_API_BASE", "", schemes=("http", "https"))

# Tenancy and invitations.
INVITATION_TTL_HOURS = env_int("PLATFORM_INVITATION_TTL_HOURS", 72, minimum=1)
# Abuse limits: invitations a tenant may send per hour, tenants one account may create, sign-ups per address per hour.
PLATFORM_INVITATIONS_PER_HOUR = env_int("PLATFORM_INVITATIONS_PER_HOUR", 20, minimum=1)
PLATFORM_MAX_TENANTS_PER_USER = env_int("PLATFORM_MAX_TENANTS_PER_USER", 5, minimum=1)
PLATFORM_SIGNUPS_PER_IP = env_int("PLATFORM_SIGNUPS_PER_IP", 10, minimum=1)
PLATFORM_MAX_PROMPT_CHARS = env_int("PLATFORM_MAX_PROMPT_CHARS", 20_000, minimum=100)
# Per-tenant request rate of the management API and /v1 Files and Fine-tuning (tenants/ratelimit.py): a token bucket
# of PLATFORM_API_BURST units refilled at PLATFORM_API_REQUESTS_PER_MINUTE (0 = unlimited); a prompt diff costs
# PLATFORM_API_EXPENSIVE_COST units, an upload that or one unit per MiB, whichever is more.
PLATFORM_API_REQUESTS_PER_MINUTE = env_int("PLATFORM_API_REQUESTS_PER_MINUTE", 600, minimum=0)
PLATFORM_API_BURST = env_int("PLATFORM_API_BURST", 40, minimum=1)
PLATFORM_API_EXPENSIVE_COST = env_int("PLATFORM_API_EXPENSIVE_COST", 10, minimum=1)

# Sign-in and password-reset throttling (tenants/throttle.py). Failures per account (e-mail) and per client
# address within a fixed window; reaching either locks it out. Reset e-mails: per e-mail and address, per window.
PLATFORM_SIGNIN_FAILURES_PER_ACCOUNT = env_int("PLATFORM_SIGNIN_FAILURES_PER_ACCOUNT", 5, minimum=1)
PLATFORM_SIGNIN_FAILURES_PER_IP = env_int("PLATFORM_SIGNIN_FAILURES_PER_IP", 20, minimum=1)
PLATFORM_SIGNIN_WINDOW_S = env_int("PLATFORM_SIGNIN_WINDOW_S", 900, minimum=1)
PLATFORM_SIGNIN_LOCKOUT_S = env_int("PLATFORM_SIGNIN_LOCKOUT_S", 900, minimum=1)
PLATFORM_PASSWORD_RESETS_PER_EMAIL = env_int("PLATFORM_PASSWORD_RESETS_PER_EMAIL", 3, minimum=1)
PLATFORM_PASSWORD_RESETS_PER_IP = env_int("PLATFORM_PASSWORD_RESETS_PER_IP", 10, minimum=1)
PLATFORM_PASSWORD_RESET_WINDOW_S = env_int("PLATFORM_PASSWORD_RESET_WINDOW_S", 3600, minimum=1)
# Reverse proxies in front of Django that append to X-Forwarded-For; 0 = the header is not trusted (REMOTE_ADDR).
PLATFORM_TRUSTED_PROXY_COUNT = env_int("PLATFORM_TRUSTED_PROXY_COUNT", 0, minimum=0)

# Fine-tuning.
FINETUNE_MAX_UPLOAD_BYTES = env_int("PLATFORM_FINETUNE_MAX_UPLOAD_BYTES", 50 * 1024 * 1024, minimum=1024)
# A tenant's own LoRA upload (finetune/byo.py), archive or files, and what an archive holds once unpacked.
FINETUNE_MAX_ADAPTER_BYTES = env_int("PLATFORM_FINETUNE_MAX_ADAPTER_BYTES", 256 * 1024 * 1024, minimum=1024)
FINETUNE_MAX_CONCURRENT_JOBS = env_int("PLATFORM_FINETUNE_MAX_CONCURRENT_JOBS", 2, minimum=1)  # per tenant
# Uploads of one tenant not yet validated (validated one at a time): more are refused 429 until one is processed.
FINETUNE_MAX_PENDING_FILES = env_int("PLATFORM_FINETUNE_MAX_PENDING_FILES", 10, minimum=1)
FINETUNE_COMPILE = env_bool("PLATFORM_FINETUNE_COMPILE", False)  # torch.compile decoder layers on CUDA workers
FINETUNE_LEASE_SECONDS = env_int("PLATFORM_FINETUNE_LEASE_SECONDS", 300, minimum=2)  # a job's silent worker is presumed dead

# Optional: push every trained adapter to a private Hugging Face Hub repository per tenant.
PLATFORM_HF_HUB_TOKEN = env_str("PLATFORM_HF_HUB_TOKEN")
PLATFORM_HF_HUB_NAMESPACE = env_str("PLATFORM_HF_HUB_NAMESPACE")  # user or organisation owning the repositories

# Alert webhooks (billing/alert_webhooks.py): each attempt's connect + read timeout, and the attempts before a delivery fails.
PLATFORM_WEBHOOK_TIMEOUT_S = env_int("PLATFORM_WEBHOOK_TIMEOUT_S", 10, minimum=1)
PLATFORM_WEBHOOK_ATTEMPTS = env_int("PLATFORM_WEBHOOK_ATTEMPTS", 6, minimum=1)
# Tests only (never from the environment): lets a webhook reach a loopback receiver over plain http.
PLATFORM_WEBHOOKS_ALLOW_LOOPBACK = False

# Gateway limits and scheduling (docs/limits.md).
PLATFORM_SOFT_THROTTLE_TPM = env_int("PLATFORM_SOFT_THROTTLE_TPM", 1000, minimum=1)
PLATFORM_QUEUE_TIMEOUT_S = env_int("PLATFORM_QUEUE_TIMEOUT_S", 30, minimum=1)
PLATFORM_GATEWAY_HEALTH_INTERVAL_MS = env_int("PLATFORM_GATEWAY_HEALTH_INTERVAL_MS", 2000, minimum=50)
PLATFORM_GATEWAY_HEALTH_TIMEOUT_MS = env_int("PLATFORM_GATEWAY_HEALTH_TIMEOUT_MS", 2000, minimum=50)
PLATFORM_GATEWAY_CONNECT_TIMEOUT_MS = env_int("PLATFORM_GATEWAY_CONNECT_TIMEOUT_MS", 2000, minimum=50)
PLATFORM_GATEWAY_READ_TIMEOUT_S = env_int("PLATFORM_GATEWAY_READ_TIMEOUT_S", 300, minimum=1)
PLATFORM_GATEWAY_MAX_BODY_BYTES = env_int("PLATFORM_GATEWAY_MAX_BODY_BYTES", 1_048_576, minimum=1024)
PLATFORM_GATEWAY_CONFIG_POLL_MS = env_int("PLATFORM_GATEWAY_CONFIG_POLL_MS", 500, minimum=50)
PLATFORM_GATEWAY_METRICS_TENANTS = env_int("PLATFORM_GATEWAY_METRICS_TENANTS", 20, minimum=0)
PLATFORM_METRICS_TOKEN = env_str("PLATFORM_METRICS_TOKEN")
# Usage records the database refused wait here (local disk) until replayed (docs/gateway.md, "Ledger durability").
PLATFORM_LEDGER_SPOOL_DIR = env_path("PLATFORM_LEDGER_SPOOL_DIR", VAR_DIR / "ledger-spool")
PLATFORM_LEDGER_REPLAY_INTERVAL_S = env_int("PLATFORM_LEDGER_REPLAY_INTERVAL_S", 10, minimum=1)
# Every admitted request is journaled here (local disk) until recorded, so a crashed gateway's usage is billed
# (serving/journal.py; docs/limits.md, "Faults").
PLATFORM_GATEWAY_JOURNAL_DIR = env_path("PLATFORM_GATEWAY_JOURNAL_DIR", VAR_DIR / "journal")
PLATFORM_SCHEDULER = env_str("PLATFORM_SCHEDULER", "vtc")  # 'fcfs' only as a benchmark baseline
# Slots beyond a full pool's capacity for a tenant with nothing running and nothing waiting (serving.scheduler).
PLATFORM_SCHEDULER_EXPRESS_SLOTS = env_int("PLATFORM_SCHEDULER_EXPRESS_SLOTS", 1, minimum=0)
if PLATFORM_SCHEDULER not in ("vtc", "fcfs"):
    raise ImproperlyConfigured(f"PLATFORM_SCHEDULER={PLATFORM_SCHEDULER!r}: use 'vtc' (weighted fair) or 'fcfs'.")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "tenants.api_auth.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # JSON nested deeper than 64 levels or holding a lone UTF-16 surrogate is a 400 (common/parsers.py), not a 500.
    "DEFAULT_PARSER_CLASSES": [
        "common.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "tenants.pagination.BoundedLimitOffsetPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "tenants.api_errors.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "LLM Platform management API",
    "DESCRIPTION": (
        "Tenants, members, invitations, API keys, system prompts, policies, the audit log, usage, billing and adapters "
        "under /api/ (a browser session or an API key with a management scope); OpenAI-compatible Files and "
        "Fine-tuning under /v1/ (an API key with the finetune scope; errors in OpenAI's shape). Under "
        "/api/tenants/{tenant_slug}/, a tenant you are not a member of (or another tenant's key) and another tenant's "
        "object are 404; a member below the role an operation needs, or a key without its scope, gets 403; invalid "
        "input gets 400 with a message per field."
    ),
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "GET_LIB_DOC_EXCLUDES": "portal.openapi.lib_doc_excludes",  # base views' docstrings are for us, not API users
}

# Production hardening (manage.py check --deploy passes with PLATFORM_ENV=production).
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", PRODUCTION)
SESSION_COOKIE_SECURE = env_bool("DJANGO_SESSION_COOKIE_SECURE", PRODUCTION)
CSRF_COOKIE_SECURE = env_bool("DJANGO_CSRF_COOKIE_SECURE", PRODUCTION)
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 31_536_000 if PRODUCTION else 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = PRODUCTION
SECURE_HSTS_PRELOAD = PRODUCTION
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if env_bool("DJANGO_BEHIND_TLS_PROXY", PRODUCTION) else None
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("PLATFORM_MAX_REQUEST_BYTES", 2_621_440, minimum=1024)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "filters": {"client_errors": {"()": "portal.logfilters.ClientErrorsWithoutTraceback"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["client_errors"]}},
    "root": {"handlers": ["console"], "level": env_str("PLATFORM_LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

# Periodic work (Celery beat): each app declares its own schedule.
from billing.schedule import ALERTS_BEAT_SCHEDULE as _ALERTS_BEAT, BEAT_SCHEDULE as _BILLING_BEAT  # noqa: E402
from finetune.schedule import BEAT_SCHEDULE as _FINETUNE_BEAT  # noqa: E402

CELERY_BEAT_SCHEDULE.update(_BILLING_BEAT)
CELERY_BEAT_SCHEDULE.update(_ALERTS_BEAT)
CELERY_BEAT_SCHEDULE.update(_FINETUNE_BEAT)

from django.contrib import admin
from django.http import HttpResponsePermanentRedirect
from django.templatetags.static import static
from django.urls import include, path

from finetune import urls as finetune_urls
from serving import staff_views as serving_staff
from tenants.forms import StaffAuthenticationForm

admin.site.site_header = "LLM Platform staff"
admin.site.site_title = "LLM Platform staff"
admin.site.login_form = StaffAuthenticationForm  # the console's sign-in throttle (tenants/throttle.py)
handler500 = "portal.views.server_error"  # the database unreachable: a 503 that says so (JSON under /api/ and /v1/)

urlpatterns = [
    path("admin/", admin.site.urls),
    # Browsers ask for /favicon.ico whatever the page says (the admin's pages, the API docs): the console's icon.
    # (Resolved per request: production's hashed static names exist only after collectstatic.)
    path("favicon.ico", lambda request: HttpResponsePermanentRedirect(static("console/favicon.svg")), name="favicon"),
    path("staff/pools/", serving_staff.pools_live, name="staff-pools-live"),
    path("api/", include("portal.api_urls")),
    # Files and Fine-tuning, then OpenAI's JSON 404 for any other /v1/ path. Under ASGI the gateway's exact paths
    # (/v1/chat/completions, /v1/completions, /v1/models[/…]) never reach Django (portal/asgi.py).
    path("v1/", include([*finetune_urls.v1_patterns, finetune_urls.v1_unknown_url])),
    path("", include("billing.urls")),
    path("", include("portal.console_urls")),
]

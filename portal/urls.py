from django.contrib import admin
from django.urls import include, path

admin.site.site_header = "LLM Platform staff"
admin.site.site_title = "LLM Platform staff"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("portal.api_urls")),
    path("", include("billing.urls")),
    path("", include("portal.console_urls")),
]

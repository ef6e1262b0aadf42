"""OpenAPI schema hooks (drf-spectacular settings point here)."""


def lib_doc_excludes() -> list:
    """Classes whose docstrings never become an operation's description: DRF's, and our own base views'.

    drf-spectacular falls back on the nearest docstring in a view's MRO; without this, every endpoint lacking its own
    docstring was described to API users by `TenantAPIView`'s notes for developers (`initial()`, `scoped()`, ...).
    """
    from drf_spectacular.plumbing import get_lib_doc_excludes

    from finetune.v1_base import OpenAIView
    from tenants.api_base import TenantAPIView

    return [*get_lib_doc_excludes(), TenantAPIView, OpenAIView]

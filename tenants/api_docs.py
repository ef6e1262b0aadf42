"""The management API's reference page: a self-contained HTML page of every operation of the schema."""

from __future__ import annotations

from django.shortcuts import render
from drf_spectacular.generators import SchemaGenerator


def api_docs(request):
    """A self-contained HTML page listing every operation of the schema (no CDN assets: works offline)."""
    schema = SchemaGenerator().get_schema(request=None, public=True)
    operations = []
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            operations.append(
                {
                    "method": method.upper(),
                    "path": path,
                    "id": op.get("operationId", ""),
                    "description": op.get("description", ""),
                    "parameters": [p for p in op.get("parameters", []) if p.get("in") != "path"],
                    "body": body.get("$ref", "").rsplit("/", 1)[-1],
                    "responses": [(code, _ref_name(r)) for code, r in op.get("responses", {}).items()],
                }
            )
    components = {
        name: [
            {"name": field, "type": spec.get("type") or spec.get("$ref", "object").rsplit("/", 1)[-1], "required": field in comp.get("required", []), "description": spec.get("description", "")}
            for field, spec in comp.get("properties", {}).items()
        ]
        for name, comp in sorted(schema.get("components", {}).get("schemas", {}).items())
    }
    return render(request, "api/docs.html", {"info": schema.get("info", {}), "operations": operations, "components": components})


def _ref_name(response: dict) -> str:
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    ref = schema.get("$ref") or schema.get("items", {}).get("$ref", "")
    return ref.rsplit("/", 1)[-1]

"""API routes of fine-tuning.

`v1_patterns`: the OpenAI-compatible API, mounted at /v1/ (tenant from the API key, never the URL).
`v1_unknown_url`: routed after them, any other path under /v1/ answers OpenAI's JSON 404.
`tenant_api_patterns`: management API, included under /api/tenants/<slug:tenant_slug>/.
"""

from django.urls import path, re_path

from finetune import adapters_api, byo_api, evaluation_api, files_api, jobs_api, merge_api, rollout_api, v1_base

v1_patterns = [
    path("files", files_api.FileListApi.as_view(), name="v1-file-list"),
    path("files/<str:file_id>", files_api.FileDetailApi.as_view(), name="v1-file-detail"),
    path("files/<str:file_id>/content", files_api.FileContentApi.as_view(), name="v1-file-content"),
    path("files/<str:file_id>/validation", files_api.FileValidationApi.as_view(), name="v1-file-validation"),
    path("fine_tuning/jobs", jobs_api.JobListApi.as_view(), name="v1-ftjob-list"),
    path("fine_tuning/jobs/estimate", jobs_api.JobEstimateApi.as_view(), name="v1-ftjob-estimate"),
    path("fine_tuning/jobs/<str:job_id>", jobs_api.JobDetailApi.as_view(), name="v1-ftjob-detail"),
    path("fine_tuning/jobs/<str:job_id>/cancel", jobs_api.JobCancelApi.as_view(), name="v1-ftjob-cancel"),
    path("fine_tuning/jobs/<str:job_id>/events", jobs_api.JobEventsApi.as_view(), name="v1-ftjob-events"),
    path("fine_tuning/jobs/<str:job_id>/checkpoints", jobs_api.JobCheckpointsApi.as_view(), name="v1-ftjob-checkpoints"),
    path("adapters", byo_api.AdapterListV1Api.as_view(), name="v1-adapter-list"),
    path("fine_tuning/evaluations", evaluation_api.EvaluationListApi.as_view(), name="v1-evaluation-list"),
    path("fine_tuning/evaluations/<str:evaluation_id>", evaluation_api.EvaluationDetailApi.as_view(),
         name="v1-evaluation-detail"),
    path("fine_tuning/evaluations/<str:evaluation_id>/rows", evaluation_api.EvaluationRowsApi.as_view(),
         name="v1-evaluation-rows"),
]
# Names of the /v1 routes, for the isolation suite's allowlist of tenant-less patterns (the key names the tenant).
V1_URL_NAMES = frozenset(p.name for p in v1_patterns)
# Matches every remaining path (a regex without `$`), so it must come last under /v1/.
v1_unknown_url = re_path(r"", v1_base.unknown_url, name="v1-unknown-url")

tenant_api_patterns = [
    path("adapters/", adapters_api.AdapterListApi.as_view(), name="api-adapter-list"),
    path("adapters/upload/", byo_api.AdapterUploadApi.as_view(), name="api-adapter-upload"),
    path("adapters/<int:adapter_id>/deploy/", adapters_api.AdapterDeployApi.as_view(), name="api-adapter-deploy"),
    path("adapters/<int:adapter_id>/undeploy/", adapters_api.AdapterUndeployApi.as_view(), name="api-adapter-undeploy"),
    path("adapters/<int:adapter_id>/merge/", merge_api.AdapterMergeApi.as_view(), name="api-adapter-merge"),
    path("merged-models/", merge_api.MergedModelListApi.as_view(), name="api-merged-model-list"),
    path("rollouts/", rollout_api.RolloutListApi.as_view(), name="api-rollout-list"),
    path("rollouts/<int:rollout_id>/", rollout_api.RolloutDetailApi.as_view(), name="api-rollout-detail"),
    path("rollouts/<int:rollout_id>/promote/", rollout_api.RolloutPromoteApi.as_view(), name="api-rollout-promote"),
    path("rollouts/<int:rollout_id>/rollback/", rollout_api.RolloutRollbackApi.as_view(), name="api-rollout-rollback"),
]

urlpatterns = v1_patterns

"""Console pages of fine-tuning, included under t/<slug:tenant_slug>/finetune/.

Object kwargs: `file_id` (str, a TrainingFile), `job_id` (str, a FineTuneJob), `adapter_id` (int, a serving Adapter),
`rollout_id` (int, a serving AdapterRollout), `evaluation_id` (str, an Evaluation).
"""

from django.urls import path

from finetune import byo_views, evaluation_views, merge_views, rollout_views, views

urlpatterns = [
    path("files/", views.files, name="finetune-files"),
    path("files/upload/", views.file_upload, name="finetune-file-upload"),
    path("files/<str:file_id>/", views.file_detail, name="finetune-file"),
    path("files/<str:file_id>/status/", views.file_status, name="finetune-file-status"),
    path("files/<str:file_id>/delete/", views.file_delete, name="finetune-file-delete"),
    path("jobs/", views.jobs, name="finetune-jobs"),
    path("jobs/new/", views.job_create, name="finetune-job-create"),
    path("jobs/<str:job_id>/", views.job_detail, name="finetune-job"),
    path("jobs/<str:job_id>/status/", views.job_status, name="finetune-job-status"),
    path("jobs/<str:job_id>/cancel/", views.job_cancel, name="finetune-job-cancel"),
    path("adapters/", views.adapters, name="finetune-adapters"),
    path("adapters/upload/", byo_views.adapter_upload, name="finetune-adapter-upload"),
    path("adapters/<int:adapter_id>/deploy/", views.adapter_deploy, name="finetune-adapter-deploy"),
    path("adapters/<int:adapter_id>/undeploy/", views.adapter_undeploy, name="finetune-adapter-undeploy"),
    path("adapters/<int:adapter_id>/merge/", merge_views.adapter_merge, name="finetune-adapter-merge"),
    path("rollouts/", rollout_views.rollouts, name="finetune-rollouts"),
    path("rollouts/<int:rollout_id>/promote/", rollout_views.rollout_promote, name="finetune-rollout-promote"),
    path("rollouts/<int:rollout_id>/rollback/", rollout_views.rollout_rollback, name="finetune-rollout-rollback"),
    path("evaluations/", evaluation_views.evaluations_page, name="finetune-evaluations"),
    path("evaluations/<str:evaluation_id>/", evaluation_views.evaluation_detail, name="finetune-evaluation"),
    path("evaluations/<str:evaluation_id>/status/", evaluation_views.evaluation_status, name="finetune-evaluation-status"),
    path("planner/", views.planner, name="finetune-planner"),
]

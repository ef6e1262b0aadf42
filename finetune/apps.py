from django.apps import AppConfig


class FinetuneConfig(AppConfig):
    name = "finetune"

    def ready(self) -> None:
        from django.db.models.signals import post_delete

        from finetune.merge import merged_folder_remove_on_delete
        from serving.models import MergedModel

        # A deleted merged model's folder goes with it (finetune/merge.py).
        post_delete.connect(merged_folder_remove_on_delete, sender=MergedModel, dispatch_uid="finetune-merged-folder")

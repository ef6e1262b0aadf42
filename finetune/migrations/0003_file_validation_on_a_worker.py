# Uploads are validated on a worker: `uploaded` until then, with its progress.

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('finetune', '0002_job_load_seconds'),
        ('serving', '0002_config_version'),
    ]

    operations = [
        migrations.AddField(
            model_name='trainingfile',
            name='base_model',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to='serving.basemodel'),
        ),
        migrations.AddField(
            model_name='trainingfile',
            name='bytes_validated',
            field=models.PositiveBigIntegerField(default=0),
        ),
        migrations.AddField(
            model_name='trainingfile',
            name='lines_validated',
            field=models.PositiveBigIntegerField(default=0),
        ),
        migrations.AddField(
            model_name='trainingfile',
            name='progress_at',
            field=models.DateTimeField(blank=True, help_text="The validating worker's last progress write.", null=True),
        ),
        migrations.AddField(
            model_name='trainingfile',
            name='validated_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AlterField(
            model_name='trainingfile',
            name='status',
            field=models.CharField(choices=[('uploaded', 'Validating'), ('processed', 'Valid'), ('error', 'Has problems')], default='uploaded', max_length=16),
        ),
    ]

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('finetune', '0005_validation_one_at_a_time_per_tenant'),
    ]

    operations = [
        migrations.AddField(
            model_name='finetunejob',
            name='method',
            field=models.CharField(default='supervised', help_text='Training method: supervised or dpo (OpenAI\'s method.type).', max_length=16),
        ),
    ]

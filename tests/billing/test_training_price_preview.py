"""The fine-tuning cost preview uses the training price staff set in billing, else the documented default."""

from datetime import date, timedelta
from decimal import Decimal

from billing.models import Price
from finetune import planning
from serving.models import BaseModel


def test_preview_uses_the_price_in_force(db):
    bm = BaseModel.objects.create(name="preview-base", hf_id="p/base")
    assert planning.training_price_cents_per_million(bm) == Decimal(planning.DEFAULT_TRAINING_PRICE_CENTS_PER_MILLION)
    Price.objects.create(base_model=bm, input_price=10, output_price=30, training_price=Decimal("812.5"), effective_from=date.today() - timedelta(days=1))
    Price.objects.create(base_model=bm, input_price=10, output_price=30, training_price=Decimal("999"), effective_from=date.today() + timedelta(days=30))
    assert planning.training_price_cents_per_million(bm) == Decimal("812.5")
    preview = planning.estimate(base_model=bm, tokens_per_epoch=1_000_001, n_epochs=2)
    assert preview["estimated_cost_cents"] == 1626  # 2,000,002 tokens × 812.5 ¢ / 10⁶ = 1625.0016 ¢, rounded up
    assert preview["price_cents_per_million_tokens"] == "812.5"

"""common.charts and console/_bar_chart.html: charts people can read (axes with units, no stretching, zeros drawn,
colours by state, split by series, a table view)."""

from __future__ import annotations

from decimal import Decimal

from django.template.loader import render_to_string

from common.charts import MAX_SERIES, bar_chart, compact, nice_step, stacked_chart


def test_y_axis_has_round_ticks_covering_the_peak_in_the_unit():
    chart = bar_chart([("a", 0), ("b", 1234), ("c", 700)], unit=" tokens")
    values = [t.value for t in chart.ticks]
    assert values == [0, 500, 1000, 1500]  # 1, 2, 2.5 or 5 × 10^k steps, the top one at or above the peak
    assert [t.label for t in chart.ticks] == ["0", "500", "1k", "1.5k"] and chart.unit == "tokens"
    assert chart.ticks[0].y == chart.height and chart.ticks[-1].y == 0
    assert chart.peak_label == "1,234 tokens" and chart.summary == "peak 1,234 tokens on b, 3 bars"


def test_nice_steps_and_compact_numbers():
    assert [nice_step(p) for p in (4, 9, 10, 33, 180, 2_600_000)] == [1, 2.5, 2.5, 10, 50, 1_000_000]
    assert [compact(v) for v in (0, 12, 999, 1200, 3_000_000, 2.5)] == ["0", "12", "999", "1.2k", "3M", "2.5"]


def test_whole_units_get_no_fractional_ticks():
    assert [t.value for t in bar_chart([("a", 1), ("b", 2)]).ticks] == [0, 1, 2]


def test_bars_are_in_percent_of_the_width_and_pixels_of_the_height():
    chart = bar_chart([(f"d{i}", i * 10) for i in range(30)])
    assert all(0 <= b.x and b.x + b.width <= 100 for b in chart.bars)
    assert all(0 <= b.y <= chart.height and abs(b.y + b.height - chart.height) < 0.2 for b in chart.bars)
    tallest = max(chart.bars, key=lambda b: b.height)
    assert tallest.label == "d29" and tallest.height <= chart.height


def test_zero_days_are_drawn_as_zero_and_a_short_series_is_not_drawn_as_giant_bars():
    chart = bar_chart([("01 Dec", 0), ("02 Dec", 5), ("03 Dec", 0)])
    assert len(chart.bars) == 3 and [b.is_zero for b in chart.bars] == [True, False, True]
    assert all(b.width <= 100 / 14 for b in chart.bars)  # laid out for two weeks at least, not a third of the chart each
    html = render_to_string("console/_bar_chart.html", {"chart": chart, "caption": "Cost"})
    assert html.count('class="chart-zero"') == 2


def test_no_data_at_all_scales_to_one_but_reports_zero():
    chart = bar_chart([("a", 0), ("b", 0)], unit=" tokens")
    assert chart.max == 0 and chart.peak_label == "0 tokens" and chart.ticks[-1].value >= 1


def test_thresholds_colour_bars_by_state_and_draw_lines():
    chart = bar_chart([("a", 10), ("b", 85), ("c", 120)], unit=" %",
                      thresholds=((80, "warn", "80 % or more: warning"), (100, "over", "100 %: quota used up")))
    assert [b.state for b in chart.bars] == ["ok", "warn", "over"]
    assert [(m.value, m.state) for m in chart.marks] == [(80, "warn"), (100, "over")]
    assert chart.legend[0] == ("chart-state-ok", "Below 80 %")
    low = bar_chart([("a", 10)], unit=" %", thresholds=((80, "warn", "w"), (100, "over", "o")))
    assert low.ticks[-1].value >= 100  # the 100 % line is on the chart even when usage is low
    html = render_to_string("console/_bar_chart.html", {"chart": chart, "caption": "Utilization"})
    assert "chart-state-ok" in html and "chart-state-warn" in html and "chart-state-over" in html and "chart-mark-over" in html


def test_stacked_series_largest_first_segments_add_up_and_the_rest_is_other():
    chart = stacked_chart(["d1", "d2"], [("small", [1, 0]), ("big", [10, 20])], unit=" tokens")
    assert chart.series == ["big", "small"] and [b.value for b in chart.bars] == [11, 20]
    first = chart.bars[0]
    assert [s.series for s in first.segments] == [0, 1]
    assert abs(sum(s.height for s in first.segments) - first.height) < 0.3
    assert chart.rows == [("d1", ["10 tokens", "1 tokens"], "11 tokens"), ("d2", ["20 tokens", "0 tokens"], "20 tokens")]
    many = stacked_chart(["d"], [(f"m{i}", [i + 1]) for i in range(9)])
    assert len(many.series) == MAX_SERIES and many.series[-1] == "Other" and many.bars[0].value == sum(range(1, 10))


def test_template_draws_without_stretching_and_offers_a_table_view():
    chart = stacked_chart(["12-01", "12-02"], [("tiny-chat", [100, 0]), ("ft:x", [50, 25])], unit=" tokens")
    html = render_to_string("console/_bar_chart.html", {"chart": chart, "caption": "Tokens per day"})
    assert "preserveAspectRatio" not in html and "viewBox" not in html  # x in %, y in px: nothing distorted
    assert 'role="img"' in html and 'aria-label="Tokens per day (tokens): peak 150 tokens on 12-01, 2 bars.' in html
    assert "<summary>Table view</summary>" in html and '<th scope="col" class="num">tiny-chat</th>' in html
    assert '<th scope="row">12-02</th>' in html and "y axis: tokens" in html
    assert 'class="chart-legend"' in html and "chart-s2" in html


def test_money_values_use_the_callers_format_on_the_axis():
    chart = bar_chart([("01 Dec", Decimal("250")), ("02 Dec", Decimal("0"))], fmt=lambda c: f"{c / 100:.2f} USD")
    assert chart.peak_label == "2.50 USD" and [t.label for t in chart.ticks] == ["0.00 USD", "1.00 USD", "2.00 USD", "3.00 USD"]
    assert chart["bars"] is chart.bars  # views' tests read it as the dict it was


def test_ticks_never_repeat_a_label_when_values_are_finer_than_the_format():
    # A third of a cent a day, written to the cent: ticks of 0.1 cent would all read "0.00 USD".
    chart = bar_chart([("01 Dec", Decimal("0.35")), ("02 Dec", Decimal("0"))], fmt=lambda c: f"{c / 100:.2f} USD")
    labels = [t.label for t in chart.ticks]
    assert labels == ["0.00 USD", "0.01 USD"] and len(set(labels)) == len(labels)
    assert 0 < chart.bars[0].height < chart.height / 2  # 0.35 of the 1-cent scale


def test_labels_of_a_short_series_are_spaced_by_slot():
    chart = bar_chart([("01 Dec", 1), ("02 Dec", 2), ("03 Dec", 3)])  # 3 days laid out in 14 slots
    assert [b.label for b in chart.bars if b.show_label] == ["01 Dec", "03 Dec"]

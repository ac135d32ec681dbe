"""The benchmark commands' contracts (not their speed: a timed test on a shared machine only flakes)."""
import json

from click.testing import CliRunner

from core.bench_pipeline import Row, summary
from core.cli import cli


def test_bench_decode_prints_both_paths_and_draft_mode_is_cheaper(photos):
    result = CliRunner().invoke(cli, ["bench", "decode", "--image", str(photos[0]), "--repeats", "3"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("4000x3000 JPEG")
    figures = json.loads(result.output.splitlines()[-1])
    assert set(figures) == {"draft_cpu", "full_cpu", "draft_wall", "full_wall"}
    assert figures["draft_cpu"] * 3 < figures["full_cpu"]  # 1/8-scale decoding: about a tenth of the work


def test_pipeline_summary_has_the_rates_and_both_ratios():
    rows = [Row("raw", 20.0, 4.8, 96, ""), Row("end_to_end", 18.0, 5.3, 96, ""), Row("naive", 6.0, 16.0, 96, "")]
    assert summary(rows) == {"raw": 20.0, "end_to_end": 18.0, "naive": 6.0,
                             "end_to_end_over_raw": 0.9, "end_to_end_over_naive": 3.0}

"""The benchmark commands' contracts (not their speed: a timed test on a shared machine only flakes)."""
import json

import pytest
from click.testing import CliRunner

from conftest import POSTGRES_URL  # a sibling: tests/ is on sys.path
from captioner.bench.pipeline import Row, summary
from captioner.cli import cli
from captioner.core.settings import Settings


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


@pytest.mark.slow
@pytest.mark.integration  # starts workers
def test_scaleout_shares_a_backfill_between_workers_and_captions_each_photo_once(photos, tiny_checkpoint, redis_url):
    """Two real workers on one broker and one database, as the command runs them."""
    from captioner.bench import scaleout as bench_scaleout

    settings = Settings(database_url=POSTGRES_URL, broker_url=redis_url, model_path=str(tiny_checkpoint), device="cpu")
    [row] = bench_scaleout.bench(settings, photos[:4 + 160], [2], 96, 16, log=lambda _: None)
    assert (row.workers, row.images, row.redelivered, row.extra_captions) == (2, 160, 0, 0)
    assert sum(row.per_worker) == 160 + 4 and min(row.per_worker) >= 32, row.per_worker
    assert 0 < row.peak_connections <= 8
    assert bench_scaleout.table([row])[1].split()[:2] == ["2", "1"]

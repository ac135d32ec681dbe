"""The caption-quality estimate: consensus CIDEr-D, the estimator, re-ranking, review by risk."""
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner.model import quality

DATA = Path(os.environ.get("CAPTIONER_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")

PHOTOS = [
    ["a black dog runs through the snow", "a dog running in snow", "the black dog plays in the white snow"],
    ["a man rides a bike down a hill", "a cyclist on a dirt road", "a person riding a bicycle"],
    ["two children play on the beach", "kids playing in the sand near the water", "two kids at the beach"],
    ["a dog jumps to catch a frisbee", "a brown dog catching a frisbee in the park", "dog leaps for a frisbee"],
]


def _neighbours() -> quality.Neighbours:
    pooled = torch.eye(len(PHOTOS), 8) + 0.01
    return quality.Neighbours.build(pooled, PHOTOS, dims=4)


def _words() -> quality.Words:
    return quality.Words.fit(torch.eye(len(PHOTOS), 8) + 0.01, PHOTOS, min_count=1, ridge=0.01)


def test_consensus_is_pycocoevalcaps_cider_d():
    """Against each photo's captions, with document frequencies over the photos: pycocoevalcap's
    CiderScorer given the same photos as its references computes the same numbers."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    neighbours = _neighbours()
    candidates = ["a black dog runs in the snow", "a dog catches a frisbee", "a boat on a lake"]
    photos = torch.arange(len(PHOTOS)).unsqueeze(0)
    ours = neighbours.consensus([candidates], photos)[0]  # one image, three candidates
    for row, candidate in enumerate(candidates):
        scorer = CiderScorer(n=4, sigma=6.0)
        for refs in PHOTOS:
            scorer += (candidate, refs)
        want, per_photo = scorer.compute_score()
        assert torch.allclose(ours[row], torch.tensor(per_photo, dtype=torch.float32), atol=1e-4), (candidate, ours[row], per_photo)
    assert ours[0, 0] > ours[0, 1] and ours[1, 3] > ours[1, 0]  # agreement goes where the words are
    assert float(ours[2].max()) < float(ours[0, 0]) / 2  # "boat" and "lake" are in no photo's captions


def test_neighbours_survive_the_checkpoint_format():
    neighbours = _neighbours()
    state = neighbours.to_state()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # loadable with weights_only=True
    again = quality.Neighbours.from_state(state)
    assert again.captions == PHOTOS
    query = torch.eye(len(PHOTOS), 8)[[2]]
    assert again.nearest(query, 1)[1].item() == 2
    candidates = [["two kids play on the beach"], ["a dog"]]
    photos = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    got, want = again.consensus(candidates, photos), neighbours.consensus(candidates, photos)
    assert got.shape == (2, 1, 4) and torch.allclose(got, want, atol=1e-3)
    assert torch.allclose(got[0, 0], neighbours.consensus([["two kids play on the beach"]], photos[:1])[0, 0])
    assert state["feats"].dtype == torch.int8  # a quarter of float32's bytes


def test_words_predicted_for_a_photo_match_the_captions_that_fit_it():
    words = _words()
    pooled = torch.eye(len(PHOTOS), 8) + 0.01
    candidates = [["a black dog runs in the snow", "a man rides a bike", "zebras graze"]] * len(PHOTOS)
    match = words.match(pooled, candidates)
    assert match.shape == (len(PHOTOS), 3)
    assert match[0, 0] > match[0, 1] and match[1, 1] > match[1, 0]  # each photo's own words win
    assert float(match[0, 0]) > 0.5
    assert torch.all(match[:, 2] == 0)  # no caption said either word
    state = words.to_state()
    assert state["left"]["q"].dtype == torch.int8 and state["right"]["q"].dtype == torch.int8
    again = quality.Words.from_state(state)
    assert again.words == words.words
    assert torch.allclose(again.match(pooled, candidates), match, atol=0.02)


def test_words_refuse_captions_too_few_to_fit_on():
    with pytest.raises(ValueError, match="too few"):
        quality.Words.fit(torch.eye(2, 8), [["a dog"], ["a cat"]])


def test_rerank_prefers_the_candidate_the_neighbours_agree_with():
    neighbours = _neighbours()
    pooled = torch.eye(len(PHOTOS), 8)[[0]] + 0.01  # nearest to the snow-dog photo
    candidates = [["a man rides a bike", "a black dog runs through the snow"]]
    agreed = quality.agreement(candidates, pooled, neighbours, _words())
    scores = torch.tensor([[-0.5, -0.7]])  # the beam slightly prefers the wrong one
    assert quality.rerank(scores, agreed, 0.0).tolist() == [0]
    assert quality.rerank(scores, agreed, 1.0).tolist() == [1]
    features = quality.signals([(-0.1, -2.0, -0.3)], agreed, torch.tensor([1]))
    assert features.shape == (1, len(quality.FEATURES))
    assert features[0, quality.FEATURES.index("words")] == 2  # <end> is not a word
    assert features[0, quality.FEATURES.index("min_logp")] == pytest.approx(-2.0)
    assert features[0, quality.FEATURES.index("match")] > features[0, quality.FEATURES.index("match_beam_best")]


def test_estimator_learns_separates_and_turns_risk_into_a_threshold():
    g = torch.Generator().manual_seed(0)
    right = torch.rand(600, generator=g) < 0.6
    signal = right.float() + torch.randn(600, generator=g) * 0.8  # informative
    noise = torch.randn(600, 6, generator=g)  # not
    features = torch.cat([signal.unsqueeze(1), noise], 1)
    estimator, held_out = quality.fitted(features, right, rerank_weight=0.5)
    assert quality.auroc(held_out, right) > 0.7
    assert quality.auroc(estimator(features), right) > 0.7
    assert abs(float(estimator.weights[0])) > 3 * float(estimator.weights[1:].abs().max())
    strict, loose = estimator.threshold(0.05), estimator.threshold(0.3)
    assert strict > loose  # a lower tolerated risk reviews more
    for risk in (0.05, 0.1, 0.3):
        published = held_out >= estimator.threshold(risk)
        assert float((~right[published]).float().mean()) <= risk + 1e-6
    cautious = quality.Estimator(estimator.mean, estimator.std, estimator.weights, estimator.bias,
                                 torch.tensor([0.9, 0.8]), torch.tensor([0.5, 0.5]))
    assert cautious.threshold(0.1) == 1.0 and cautious.threshold(0.5) == pytest.approx(0.8)
    again = quality.Estimator.from_state(estimator.to_state())
    assert torch.equal(again(features), estimator(features)) and again.rerank_weight == 0.5


def test_auroc_counts_ties_half():
    assert quality.auroc(torch.tensor([0.9, 0.1]), torch.tensor([True, False])) == 1.0
    assert quality.auroc(torch.tensor([0.5, 0.5]), torch.tensor([True, False])) == 0.5
    assert quality.auroc(torch.tensor([0.1, 0.9]), torch.tensor([True, False])) == 0.0


def test_an_estimator_fitted_on_other_signals_is_refused():
    g = torch.Generator().manual_seed(1)
    estimator, _ = quality.fitted(torch.randn(200, len(quality.FEATURES), generator=g),
                                  torch.rand(200, generator=g) < 0.5, 0.0)
    state = estimator.to_state() | {"features": ["mean_logp"]}
    with pytest.raises(ValueError, match="other signals"):
        quality.Estimator.from_state(state)


def test_review_risk_setting():
    from captioner.core.errors import ConfigError
    from captioner.core.settings import load_settings

    assert load_settings({}).review_risk == 0.10
    assert load_settings({"CAPTIONER_REVIEW_RISK": "0.05"}).review_risk == 0.05
    for bad in ("ten", "0", "1.5"):
        with pytest.raises(ConfigError, match="REVIEW_RISK"):
            load_settings({"CAPTIONER_REVIEW_RISK": bad})


@needs_data
def test_shipped_model_estimates_quality_and_reviews_by_risk(tmp_path):
    """The shipped checkpoint carries its estimator: every caption has a quality, and a caption
    goes to review exactly when its quality is under the threshold its risk gives."""
    from captioner.model import inference

    names = sorted((DATA / "flickr8k" / "images").iterdir())[:24]
    images = [Image.open(p).convert("RGB") for p in names]
    strict = inference.load(device="cpu", runtime="torch", review_risk=0.05)
    loose = inference.load(device="cpu", runtime="torch", review_risk=0.3)
    assert strict.estimator is not None and strict.review_threshold > loose.review_threshold
    a, b = strict.caption_images(images), loose.caption_images(images)
    for x, y in zip(a, b):
        assert x.text == y.text and x.quality == y.quality
        assert 0 < x.quality < 1
        assert x.needs_review == (x.quality < strict.review_threshold)
        assert y.needs_review == (y.quality < loose.review_threshold)
        assert x.candidates[0][0] == x.text  # the re-ranked choice comes first
    assert sum(x.needs_review for x in a) >= sum(y.needs_review for y in b)
    assert len({x.quality for x in a}) > 10  # it tells photos apart


def test_a_checkpoint_without_an_estimator_falls_back_to_confidence(tmp_path, caplog):
    from captioner.model import inference

    state = torch.load(inference.DEFAULT_CHECKPOINT, map_location="cpu", weights_only=True)
    for key in ("quality", "neighbours", "words"):
        state.pop(key, None)
    torch.save(state, tmp_path / "plain.pt")
    with caplog.at_level(logging.WARNING, logger="captioner.model.inference"):
        captioner = inference.load(tmp_path / "plain.pt", device="cpu", runtime="torch")
    assert [r.message for r in caplog.records if "no caption-quality estimator" in r.message]
    result = captioner.caption(torch.rand(2, 3, 224, 224))
    for r in result:
        assert r.quality is None
        assert r.needs_review == (r.confidence < inference.REVIEW_BELOW)


def test_an_estimator_of_an_older_calibration_is_set_aside(tmp_path, caplog):
    """A checkpoint calibrated on other signals (an older captioner's) still captions, as one
    without an estimator does, and says why."""
    from captioner.model import inference

    state = torch.load(inference.DEFAULT_CHECKPOINT, map_location="cpu", weights_only=True)
    state["quality"]["features"] = list(quality.FEATURES[:8])
    del state["words"]
    torch.save(state, tmp_path / "older.pt")
    with caplog.at_level(logging.WARNING, logger="captioner.model.inference"):
        captioner = inference.load(tmp_path / "older.pt", device="cpu", runtime="torch")
    assert [r.message for r in caplog.records if "run captioner calibrate again" in r.message]
    assert captioner.estimator is None
    result = captioner.caption(torch.rand(1, 3, 224, 224))[0]
    assert result.quality is None and result.needs_review == (result.confidence < inference.REVIEW_BELOW)


@needs_data
@pytest.mark.integration  # captions 500 photos to fit an estimator
def test_calibrate_writes_an_estimator_into_a_new_checkpoint(tmp_path):
    """`captioner calibrate` on a small split: a checkpoint that loads with the estimator, its
    cross-validated figures in the checkpoint and on the last line, and the diagram."""
    from click.testing import CliRunner

    from captioner.cli import cli
    from captioner.model import inference

    flickr = DATA / "flickr8k"
    (tmp_path / "train.txt").write_text("\n".join((flickr / "Flickr_8k.trainImages.txt").read_text().split()[:360]))
    (tmp_path / "dev.txt").write_text("\n".join((flickr / "Flickr_8k.devImages.txt").read_text().split()[:140]))
    out = tmp_path / "calibrated.pt"
    result = CliRunner().invoke(cli, ["calibrate", "--output", str(out), "--runtime", "torch",
                                      "--captions", str(flickr / "Flickr8k.token.txt"), "--images", str(flickr / "images"),
                                      "--train-split", str(tmp_path / "train.txt"), "--dev-split", str(tmp_path / "dev.txt")])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["photos"] == 140 and 0.5 < figures["auroc_quality"] <= 1
    assert figures["rerank_weight"] in (0.0, 0.25, 0.5, 1.0, 2.0)
    assert (tmp_path / "calibration.png").stat().st_size > 10_000
    model = inference.load(out, device="cpu", runtime="torch")
    assert len(model.neighbours.captions) > 360  # the 360 listed plus the photos in no split
    assert model.metrics["quality"]["auroc_quality"] == figures["auroc_quality"]
    assert model.version != inference.checkpoint_version(inference.DEFAULT_CHECKPOINT)


def test_calibrate_refuses_a_tiny_dev_split(tmp_path):
    from click.testing import CliRunner

    from captioner.cli import cli

    if not DATA.is_dir():
        pytest.skip("shared data not found")
    flickr = DATA / "flickr8k"
    (tmp_path / "train.txt").write_text("\n".join((flickr / "Flickr_8k.trainImages.txt").read_text().split()[:50]))
    (tmp_path / "dev.txt").write_text("\n".join((flickr / "Flickr_8k.devImages.txt").read_text().split()[:20]))
    result = CliRunner().invoke(cli, ["calibrate", "--output", str(tmp_path / "x.pt"), "--runtime", "torch",
                                      "--captions", str(flickr / "Flickr8k.token.txt"), "--images", str(flickr / "images"),
                                      "--train-split", str(tmp_path / "train.txt"), "--dev-split", str(tmp_path / "dev.txt")])
    assert result.exit_code != 0 and "too few" in result.output
    assert not (tmp_path / "x.pt").exists()

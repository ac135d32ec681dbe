"""The alt-text review queue on both databases, with rows written as a worker writes them: most
doubtful first (quality, then confidence for captions without an estimate), and skipping pages
through that order even when the image skipped has left the queue meanwhile."""
import pytest

from captioner.core import alttext, browse, queries
from captioner.core.queries import NewImage, Result

VERSION = "review-test"
# name: (quality, confidence, needs review); the queue's order is b c a d e
CAPTIONS = {"a": (0.6, 0.5, True), "b": (0.2, 0.9, True), "c": (0.2, 0.1, True),
            "d": (None, 0.1, True), "e": (None, 0.3, True), "sure": (0.9, 0.2, False), "decided": (0.05, 0.5, True)}
ORDER = ["b", "c", "a", "d", "e"]


def write(sm, tenant: str) -> dict[str, int]:
    """The captions of CAPTIONS for `tenant` (oldest image first, as listed) -> image id by name."""
    ids = {}
    for name, (quality, confidence, review) in CAPTIONS.items():
        with sm.begin() as s:
            uri = f"file:///photos/{tenant}-{name}.jpg"
            [sub] = queries.submit(s, [NewImage(uri, f"sha256:{tenant}-{name}")], VERSION, "backfill", tenant=tenant)
            [claimed] = queries.claim(s, VERSION, 60, 1, job_ids=[sub.job_id])
            queries.complete(s, [Result(claimed, "A dog.", "A dog.", [("A dog.", confidence)], [], confidence, review,
                                        8, 8, quality)], [], VERSION, forward_size=1)
        ids[name] = sub.image_id
    with sm.begin() as s:
        alttext.decide(s, ids["decided"], "approved", None, "key cap_test", tenant)
    return ids


@pytest.fixture(scope="module")
def database(each_database):
    _, sm = each_database
    return sm, write(sm, "acme")


def named(ids: dict[str, int], found: list[int]) -> list[str]:
    names = {v: k for k, v in ids.items()}
    return [names[i] for i in found]


def test_most_doubtful_first_and_captions_without_an_estimate_after_those_with_one(database):
    sm, ids = database
    with sm() as s:
        assert named(ids, browse.review_queue(s, "acme", 10)) == ORDER
        assert browse.review_count(s, "acme", 100) == len(ORDER)
        assert browse.review_queue(s, "someone-else", 10) == []


def test_skipping_walks_the_whole_queue_in_order_one_or_two_at_a_time(database):
    sm, ids = database
    for limit in (1, 2):
        walked: list[int] = []
        with sm() as s:
            page = browse.review_queue(s, "acme", limit)
            while page:
                walked += page
                page = browse.review_queue(s, "acme", limit, after=page[-1])
        assert named(ids, walked) == ORDER


def test_skipping_past_an_image_that_left_the_queue_keeps_its_place(database):
    """Its caption still places it: decided in another tab, it is not a reason to start again."""
    sm, ids = database
    with sm() as s:
        assert named(ids, browse.review_queue(s, "acme", 10, after=ids["decided"])) == ORDER  # risk 0.05: first
        assert named(ids, browse.review_queue(s, "acme", 10, after=ids["sure"])) == ["d", "e"]  # 0.9: after a


def test_an_unknown_or_another_tenants_image_skips_nothing(each_database):
    _, sm = each_database
    other = write(sm, "other")
    with sm() as s:
        ours = browse.review_queue(s, "other", 10)
        assert named(other, ours) == ORDER
        assert browse.review_queue(s, "other", 10, after=2**31 - 1) == ours
        acme_b = browse.review_queue(s, "acme", 1)[0]  # another tenant's most doubtful
        assert browse.review_queue(s, "other", 10, after=acme_b) == ours


def test_the_newest_caption_places_an_image(each_database):
    """A newer model's caption (with an estimate) replaces the older one's place in the queue."""
    _, sm = each_database
    ids = write(sm, "recaptioned")
    with sm.begin() as s:
        [sub] = queries.submit(s, [NewImage("file:///photos/recaptioned-e.jpg", "sha256:recaptioned-e")], "newer",
                               "backfill", tenant="recaptioned")
        [claimed] = queries.claim(s, "newer", 60, 1, job_ids=[sub.job_id])
        queries.complete(s, [Result(claimed, "A dog.", "A dog.", [], [], 0.3, True, 8, 8, 0.01)], [], "newer", 1)
    assert sub.image_id == ids["e"]
    with sm() as s:
        assert named(ids, browse.review_queue(s, "recaptioned", 10)) == ["e", "b", "c", "a", "d"]

"""The relevance bench's measuring parts on a small written corpus (captioning the real corpora
is the bench itself: minutes of CPU). The relevance test stems; the measures count what they say."""
from pathlib import Path

from sqlalchemy import func, select

from captioner.bench import search as bench_search
from captioner.core.db import make_engine, make_sessionmaker
from captioner.core.tables import Caption
from tests.test_search import CORPUS, seed


def test_relevance_is_every_query_word_stemmed_in_one_human_caption():
    judge = bench_search.relevance_judge([("a.jpg", "Two dogs are running on the grass ."),
                                          ("a.jpg", "A beach ."), ("b.jpg", "A dog sleeps ."),
                                          ("c.jpg", "Grass , and a runner dog")])
    assert judge("dog running on grass") == {"a.jpg"}  # "runner" is not "run"; words from one caption only
    assert judge("dogs") == {"a.jpg", "b.jpg", "c.jpg"}
    assert judge("dog beach") == set()


def test_class_queries_take_the_first_name(tmp_path: Path):
    labels = tmp_path / "labels.tsv"
    labels.write_text("file\tclass_index\twnid\tclass_name\n"
                      "n1_tench.jpg\t0\tn1\ttench, Tinca tinca\nn2_jack.jpg\t1\tn2\tjack-o'-lantern\n")
    assert bench_search.class_queries(labels) == [("n1_tench.jpg", "tench"), ("n2_jack.jpg", "jack-o'-lantern")]


def test_measures_on_both_back_ends(sqlite_url, own_pg_url):
    source = make_sessionmaker(make_engine(sqlite_url))
    seed(source)  # all of it, tenant "b" too: the copy takes a whole database into one tenant
    pg = make_engine(own_pg_url)
    target = make_sessionmaker(pg)
    for _ in range(2):  # copying twice writes nothing new
        bench_search.copy_captions(source, target, "bench-test")
    classes = [("dog-grass.jpg", "retriever"), ("bike.jpg", "cyclist"), ("cat-sofa.jpg", "giraffe")]
    judge = bench_search.relevance_judge([(f"{key}.jpg", caption) for key, caption, *_ in CORPUS])
    for sm, tenant in ((source, "default"), (target, "bench-test")):
        assert bench_search.imagenet_recall(sm, classes, 5, tenant) == {
            "queries": 3, "recall@1": 0.6667, "recall@5": 0.6667, "no_results": 1}
        precision = bench_search.coco_precision(sm, ["black cat", "dogs snow", "zebra"], judge, 5, lambda _: None,
                                                tenant)
        # black cat: 1 of 5; dogs snow: the snow dogs (caption) and the sled (a "dog" tag, not relevant)
        assert precision == {"queries": 3, "precision@5": round(2 / 15, 4), "found_relevant_in_top5": 2,
                             "answerable": 2}
    with target() as s:
        assert s.scalar(select(func.count()).select_from(Caption)) == len(CORPUS)
    pg.dispose()

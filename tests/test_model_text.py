"""Post-processing, alt-text rules and the evaluation scorer."""
import re
import shutil

import pytest
from hypothesis import given, strategies as st

from captioner.model.alt_text import HARD_LIMIT, SOFT_LIMIT, alt_text, sentence
from captioner.model.data import read_coco_captions, read_flickr8k_tokens, tokenize
from captioner.model.evaluate import score, stutters

words = st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=12), min_size=1, max_size=40)


@given(words)
def test_sentence_is_capitalised_with_one_final_period(ws):
    s = sentence(ws)
    assert s[0].isupper() and s.endswith(".") and not s.endswith("..")
    assert "  " not in s and s.lower().rstrip(".").split() == ws


@given(words, st.integers(min_value=20, max_value=HARD_LIMIT))
def test_alt_text_fits_the_limit_and_reads_as_a_sentence(ws, limit):
    alt = alt_text(sentence(ws), limit=limit)
    assert len(alt) <= limit
    assert alt[0].isupper() and alt.endswith(".")
    # a cut never splits a word: every word of the alt text is a whole word of the caption
    assert set(alt.lower().rstrip(".").split()) <= set(ws)


@given(st.sampled_from(["Image of", "a picture of", "A photo of", "photograph showing", "An image of a picture of"]), words)
def test_alt_text_drops_image_of_preambles(preamble, ws):
    alt = alt_text(f"{preamble} {' '.join(ws)}.")
    assert not re.match(r"(an? )?(image|picture|photo|photograph) (of|showing)", alt, re.IGNORECASE)


def test_alt_text_examples():
    assert alt_text("A photo of a dog running on the beach.") == "A dog running on the beach."
    assert alt_text("a man takes a picture of a dog") == "A man takes a picture of a dog."
    long = "A man in a red shirt " + "and a woman in a blue dress " * 10 + "stand on a bridge."
    assert len(alt_text(long)) <= SOFT_LIMIT and alt_text(long).endswith(".")


def test_sentence_drops_empty_words_and_tidies_punctuation():
    assert sentence(["a", "dog", ",", "running"]) == "A dog, running."
    assert sentence([]) == ""


def test_tokenize_matches_reference_style():
    assert tokenize("A child in a pink dress is climbing up a set of stairs in an entry way .") == \
        "a child in a pink dress is climbing up a set of stairs in an entry way".split()
    assert tokenize("Two dogs' toys, 3 balls!") == ["two", "dogs", "toys", "3", "balls"]


def test_stutter_detection():
    assert stutters("a dog sitting on a bed bed".split())
    assert stutters("a man in a blue shirt and a man in a blue shirt".split())
    assert not stutters("a man in a blue shirt and a woman in a red dress".split())


def test_caption_readers(tmp_path):
    (tmp_path / "tokens.txt").write_text("x.jpg#0\tA dog .\nx.jpg#1\tA brown dog .\ny.jpg#0\tA cat .\n")
    assert read_flickr8k_tokens(tmp_path / "tokens.txt") == {"x.jpg": ["A dog .", "A brown dog ."], "y.jpg": ["A cat ."]}
    (tmp_path / "bad.txt").write_text("no tab here\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        read_flickr8k_tokens(tmp_path / "bad.txt")
    (tmp_path / "coco.json").write_text('{"images": [{"id": 1, "file_name": "a.jpg"}], '
                                        '"annotations": [{"image_id": 1, "caption": "A cat. "}]}')
    assert read_coco_captions(tmp_path / "coco.json") == {"a.jpg": ["A cat."]}


REFS = {
    "1": ["a dog runs on the grass", "a brown dog running across a field", "the dog is running outside"],
    "2": ["a man rides a bike down a hill", "a cyclist rides down the road", "a person on a bicycle"],
    "3": ["two children play in the snow", "kids playing in snow", "two kids in winter coats in the snow"],
}


@pytest.mark.integration  # Java
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokenizer and METEOR need Java")
def test_scores_of_known_captions():
    perfect = score(REFS, {k: v[0] for k, v in REFS.items()})
    assert perfect["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["ROUGE-L"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["METEOR"] > 0.9
    assert perfect["CIDEr"] > 1.0
    unrelated = score(REFS, {"1": "zebra xylophone quartz", "2": "zebra xylophone quartz", "3": "zebra xylophone quartz"})
    assert unrelated["BLEU-1"] < 1e-6 and unrelated["CIDEr"] == 0.0 and unrelated["ROUGE-L"] == 0.0
    # swapping captions between images must score far worse than the right ones
    swapped = score(REFS, {"1": REFS["2"][0], "2": REFS["3"][0], "3": REFS["1"][0]})
    assert swapped["CIDEr"] < perfect["CIDEr"] / 5


def test_cider_d_reward_matches_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider

    from captioner.model.scst import CiderD

    refs = {i: [r.split() for r in REFS[k]] for i, k in enumerate(REFS)}
    cands = {0: "a dog running on grass", 1: "a man rides a bicycle down the road", 2: "children in the snow"}
    ours = CiderD(refs)
    want, per_image = Cider().compute_score({i: [" ".join(r) for r in refs[i]] for i in refs},
                                            {i: [c] for i, c in cands.items()})
    got = [ours(i, c.split()) for i, c in cands.items()]
    assert got == pytest.approx(list(per_image), rel=1e-9)

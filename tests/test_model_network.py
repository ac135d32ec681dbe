"""The decoder, beam search and checkpoints on tiny random-weight models (CPU, no data needed)."""
import pytest
import torch
import torch.nn.functional as F

from captioner.model import repeats
from captioner.model.beam_search import _repeated_content, beam_search
from captioner.model.beam_search import search as search_steps
from captioner.model.network import Decoder, DecoderConfig
from captioner.model.train import TrainConfig, export_checkpoint, loss_fn
from captioner.model.vocab import SPECIALS, Vocab

WORDS = ["a", "dog", "cat", "runs", "sits", "on", "the", "grass", "mat", "red", "ball", "with"]
VOCAB = Vocab.build([WORDS], min_count=1)
CAPTIONS = [["a", "dog", "runs", "on", "the", "grass"], ["a", "cat", "sits", "on", "the", "mat"],
            ["a", "dog", "with", "a", "red", "ball"], ["the", "cat", "runs"]]


def tiny_decoder(seed: int = 0, feature_dim: int = 16) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(DecoderConfig(len(VOCAB), feature_dim=feature_dim, embed_dim=16, decoder_dim=32,
                                 attention_dim=16, dropout=0.0))


def synthetic_batch(feature_dim: int = 16):
    torch.manual_seed(1)
    feats = torch.randn(len(CAPTIONS), 9, feature_dim)  # one distinct "photo" per caption
    ids = [VOCAB.encode(c, max_len=10) for c in CAPTIONS]
    caps = torch.full((len(ids), max(map(len, ids))), VOCAB.pad)
    for i, row in enumerate(ids):
        caps[i, : len(row)] = torch.tensor(row)
    return feats, caps


def greedy(decoder: Decoder, feats: torch.Tensor, max_len: int = 12) -> list[list[int]]:
    """Reference greedy decoding, one image at a time, written independently of beam_search."""
    out = []
    for f in feats:
        keys, h, c = decoder.start(f[None])
        word, tokens = torch.tensor([VOCAB.start]), []
        for _ in range(max_len):
            logits, h, c, _ = decoder.step(f[None], keys, word, h, c)
            logits[0, [VOCAB.pad, VOCAB.start, VOCAB.unk]] = float("-inf")
            word = logits.argmax(1)
            if int(word) == VOCAB.end:
                break
            tokens.append(int(word))
        out.append(tokens)
    return out


def search(decoder, feats, **kw):
    return beam_search(decoder, feats, VOCAB.start, VOCAB.end, [VOCAB.pad, VOCAB.start, VOCAB.unk], **kw)


def test_vocab_encode_decode_round_trip():
    ids = VOCAB.encode(["a", "dog", "zebra"], max_len=10)
    assert ids[0] == VOCAB.start and ids[-1] == VOCAB.end
    assert VOCAB.decode(ids[1:]) == ["a", "dog", "<unk>"][:2]  # <unk> is special and dropped
    assert VOCAB.encode(["a"] * 30, max_len=5) == [VOCAB.start, *[VOCAB.index["a"]] * 5, VOCAB.end]


def test_tiny_model_overfits_and_reproduces_captions():
    decoder = tiny_decoder()
    feats, caps = synthetic_batch()
    cfg = TrainConfig(captions="", images="", label_smoothing=0.0, attention_reg=0.0)
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss, ce = loss_fn(decoder, feats, caps, cfg, VOCAB.pad)
        first = first if first is not None else ce.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ce.item() < first / 10, f"loss fell only from {first:.3f} to {ce.item():.3f}"
    decoder.eval()
    got = [VOCAB.decode(h[0].tokens) for h in search(decoder, feats, beam=3, n_best=1, block_repeats=False)]
    assert got == CAPTIONS


def test_teacher_forcing_runs_the_recurrence_that_decoding_steps_through():
    """Training (forward) and beam search (step) share one recurrence: fed the same words, step by
    step gives forward's hidden states and attention to the bit. Only the vocabulary projection
    differs in shape (all steps at once against one at a time), so the logits are compared closely."""
    decoder = tiny_decoder(seed=11).eval()
    feats, caps = synthetic_batch()
    projected: list[torch.Tensor] = []  # what reaches decoder.out: the hidden states, dropout off
    hook = decoder.out.register_forward_hook(lambda _module, inputs, _output: projected.append(inputs[0]))
    with torch.no_grad():
        logits, alphas = decoder(feats, caps)  # (B, T-1, V), (B, T-1, P)
        keys, h, c = decoder.start(feats)
        stepped, stepped_alphas = [], []
        for t in range(caps.size(1) - 1):
            step_logits, h, c, alpha = decoder.step(feats, keys, caps[:, t], h, c)
            stepped.append(step_logits)
            stepped_alphas.append(alpha)
    hook.remove()
    assert torch.equal(projected[0], torch.stack(projected[1:], 1))  # (B, T-1, D)
    assert torch.equal(alphas, torch.stack(stepped_alphas, 1))
    torch.testing.assert_close(logits, torch.stack(stepped, 1))


def test_batched_beam_search_equals_one_image_at_a_time():
    decoder = tiny_decoder(seed=3).eval()
    feats = torch.randn(6, 9, 16)
    batched = search(decoder, feats, beam=4, n_best=3)
    for i in range(len(feats)):
        alone = search(decoder, feats[i : i + 1], beam=4, n_best=3)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[i]]
        for a, b in zip(alone, batched[i]):
            assert abs(a.score - b.score) < 1e-4


def test_beam_one_is_greedy():
    decoder = tiny_decoder(seed=5).eval()
    feats = torch.randn(5, 9, 16)
    beams = search(decoder, feats, beam=1, n_best=1, max_len=12, block_repeats=False)
    assert [h[0].tokens for h in beams] == greedy(decoder, feats)


def test_beam_search_never_stutters_even_on_a_babbling_model():
    decoder = tiny_decoder(seed=7).eval()
    # an untrained model loves repeating itself; make it worse by favouring two words
    with torch.no_grad():
        decoder.out.bias[VOCAB.index["a"]] += 4
        decoder.out.bias[VOCAB.index["dog"]] += 4
        decoder.out.bias[VOCAB.end] -= 10
    feats = torch.randn(8, 9, 16)
    plain = search(decoder, feats, beam=3, n_best=3, max_len=15, block_repeats=False)
    blocked = search(decoder, feats, beam=3, n_best=3, max_len=15)

    def stutters(t):
        tri = list(zip(t, t[1:], t[2:]))
        return any(x == y for x, y in zip(t, t[1:])) or len(tri) != len(set(tri))

    assert any(stutters(h.tokens) for hs in plain for h in hs), "the test model should stutter unblocked"
    assert not any(stutters(h.tokens) for hs in blocked for h in hs)


def test_n_best_scores_are_sorted_and_length_normalised():
    decoder = tiny_decoder(seed=9).eval()
    hyps = search(decoder, torch.randn(3, 9, 16), beam=5, n_best=5)
    for hs in hyps:
        scores = [h.score for h in hs]
        assert scores == sorted(scores, reverse=True)
        assert all(s <= 0 for s in scores)
        assert len({tuple(h.tokens) for h in hs}) == len(hs), "n-best must be distinct"


def test_a_caption_that_ended_is_kept_when_longer_beams_push_it_out():
    """Beam 2: "w5 <end>" ends at the second step, scoring -0.2, while "w4 w6" and "w4 w7" score
    better and take both beams; they then end badly (-1.07, -1.08). The caption that ended first
    is still the best."""
    START, END, W4, W5, W6, W7 = 1, 2, 4, 5, 6, 7
    follows = {START: {W4: -0.1, W5: -0.3}, W4: {W6: -0.1, W7: -0.15}, W5: {END: -0.1}, W6: {END: -3.0}, W7: {END: -3.0}}

    def step(live, words, h, c):
        logp = torch.full((len(words), 8), -20.0)
        for row, word in enumerate(words.tolist()):
            for nxt, lp in follows.get(word, {}).items():
                logp[row, nxt] = lp
        return logp, h, c

    hyps = search_steps(step, torch.zeros(1, 1), torch.zeros(1, 1), START, END, [0, 3], beam=2, n_best=2, max_len=5)[0]
    assert [h.tokens for h in hyps] == [[W5], [W4, W6]]
    assert hyps[0].score == pytest.approx(-0.2) and hyps[1].score == pytest.approx((-0.2 - 3.0) / 3)
    assert hyps[0].word_logps == pytest.approx((-0.3, -0.1))


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    from captioner.model import inference

    decoder = tiny_decoder(feature_dim=1280).eval()
    state = {"config": {**decoder.cfg.__dict__}, "encoder": {"backbone": "tf_efficientnet_lite0", "weights": None, "grid": 7},
             "vocab": VOCAB.words, "max_len": 12, "recipe": {}, "metrics": {},
             "model": {k: v.half().float() for k, v in decoder.state_dict().items()}}  # fp16-exact weights
    decoder.load_state_dict(state["model"])
    export_checkpoint(state, tmp_path / "ckpt.pt")
    loaded = inference.load(tmp_path / "ckpt.pt", device="cpu")
    assert loaded.version == inference.checkpoint_version(tmp_path / "ckpt.pt")
    images = torch.randn(2, 3, 224, 224)
    feats, _ = loaded.encoder(images)
    rule = repeats.rule(VOCAB.words, len(SPECIALS))  # the captioner says nothing twice
    want = search(decoder, feats, beam=3, n_best=2, max_len=12, **rule)
    got = search(loaded.decoder, feats, beam=3, n_best=2, max_len=12, **rule)
    assert [[h.tokens for h in hs] for hs in got] == [[h.tokens for h in hs] for hs in want]
    captions = loaded.caption(images, beam=3, n_best=2)
    assert [c.text.rstrip(".").lower().split() for c in captions] == [VOCAB.decode(hs[0].tokens) for hs in want]


def test_a_partial_repeat_rule_is_refused():
    rule = repeats.rule(VOCAB.words, len(SPECIALS))
    feats = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="all five masks"):
        search(tiny_decoder(), feats, content_words=rule["content_words"])


def test_checkpoint_without_model_keys_is_refused(tmp_path):
    from captioner.model import inference

    torch.save({"weights": torch.zeros(1)}, tmp_path / "bad.pt")
    try:
        inference.load(tmp_path / "bad.pt", device="cpu")
    except ValueError as e:
        assert "not a captioner checkpoint" in str(e)
    else:
        raise AssertionError("a foreign checkpoint was accepted")


def test_loss_masks_padding():
    decoder = tiny_decoder().eval()
    feats, caps = synthetic_batch()
    cfg = TrainConfig(captions="", images="", label_smoothing=0.0, attention_reg=0.0)
    _, ce = loss_fn(decoder, feats, caps, cfg, VOCAB.pad)
    logits, _ = decoder(feats, caps)
    target = caps[:, 1:]
    keep = target != VOCAB.pad
    assert torch.allclose(ce, F.cross_entropy(logits[keep], target[keep]))


def test_self_critical_training_raises_the_cider_reward():
    import random

    from captioner.model.scst import CiderD, scst_epoch

    decoder = tiny_decoder(seed=11)
    feats, _ = synthetic_batch()
    reward = CiderD({i: [c + ["<end>"]] for i, c in enumerate(CAPTIONS)})
    opt = torch.optim.Adam(decoder.parameters(), lr=5e-3)
    rng = random.Random(0)
    torch.manual_seed(0)
    rewards = [scst_epoch(decoder, lambda rows: feats[rows], len(CAPTIONS), reward, VOCAB, opt, rng,
                          images_per_batch=4, samples=5, max_len=10) for _ in range(60)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > 1.5 * first, f"reward went from {first:.3f} to {last:.3f}"


def test_preprocess_puts_transparency_on_white_and_scales_16_bit_grey():
    from PIL import Image

    from captioner.model.encoder import preprocess

    clear = preprocess(Image.new("RGBA", (32, 32), (0, 0, 0, 0)))
    assert torch.allclose(clear, torch.ones_like(clear), atol=1e-3)  # white is +1 after normalising
    grey16 = Image.new("I;16", (32, 32), 32768)
    assert abs(float(preprocess(grey16).mean())) < 0.05  # mid-grey is ~0, not white (+1)
    assert preprocess(Image.new("P", (5, 300))).shape == (3, 224, 224)


def test_a_content_word_comes_again_only_to_tell_two_apart():
    vocab = Vocab.build([["a", "black", "white", "dog", "hat", "and", "in", "boat", "with", "man", "woman", "another",
                          "crowd", "of", "people", "large", "shirt"]], min_count=1)
    rule = repeats.rule(vocab.words, len(SPECIALS))

    def banned_after(words: str) -> set[str]:
        seq = torch.tensor([[vocab.index[w] for w in words.split()]])
        ban = _repeated_content(seq, *(rule[k] for k in ("content_words", "modifiers", "counting", "worn", "people")))[0]
        return {vocab.words[i] for i in ban.nonzero().flatten().tolist()}

    assert "hat" in banned_after("a hat and a")  # "a hat and a hat"
    assert "boat" in banned_after("in a boat in a")
    assert "dog" not in banned_after("a black dog and a white")  # two dogs, told apart
    assert "hat" in banned_after("a black hat and black")  # the same pair again
    assert "white" in banned_after("a white and")  # "a white and white dog"
    # modifiers and function words repeat freely, but not as "with a with"
    assert banned_after("a black dog with a") == {"dog", "with"}
    # a describing modifier needs a described first mention; a counting one does not
    assert "dog" in banned_after("a dog and a black")
    assert "crowd" in banned_after("a crowd of people in a large")
    assert "dog" not in banned_after("a dog and another")
    # clothing is worn by someone: named again only for a new person
    assert "hat" in banned_after("a man in a black hat and a white")
    assert "hat" not in banned_after("a man in a black hat and a woman in a white")
    assert "shirt" not in banned_after("a man in a shirt and a woman in a black")
    # a word said twice keeps every mention's flags
    assert "dog" in banned_after("a black dog and a white dog and a black")
    assert repeats.repeats_content("a man riding a bike on a bike".split())
    assert not repeats.repeats_content("a black dog and a black cat".split())

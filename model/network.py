"""Show, Attend and Tell (Xu et al. 2015): soft attention over CNN features + an LSTM decoder."""
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    feature_dim: int = 1280  # channels of the encoder's spatial features
    embed_dim: int = 256  # word-embedding width
    decoder_dim: int = 512  # LSTM hidden size
    attention_dim: int = 256  # additive-attention hidden size
    dropout: float = 0.5  # active only in .train()


class Attention(nn.Module):
    """Additive (Bahdanau) attention over P feature positions."""

    def __init__(self, feature_dim: int, decoder_dim: int, attention_dim: int):
        super().__init__()
        self.enc = nn.Linear(feature_dim, attention_dim)
        self.dec = nn.Linear(decoder_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, feats: torch.Tensor, keys: torch.Tensor, h: torch.Tensor):
        """feats (B, P, F), keys = self.enc(feats) (B, P, A), h (B*K, D): K consecutive rows per image
        (a beam search's hypotheses; K = 1 in training) -> context (B*K, F), alpha (B*K, P).

        The K rows of an image share its features, which are never repeated: one batched matrix
        product per image weighs them, where a repeated (B*K, P, F) tensor multiplied and summed
        read K times the memory (a beam of 3 spent a quarter of its time there)."""
        B, P, A = keys.shape
        query = self.dec(h).view(B, -1, 1, A)  # (B, K, 1, A)
        e = self.score(torch.tanh(keys.unsqueeze(1) + query)).squeeze(3)  # (B, K, P)
        alpha = e.softmax(dim=2)  # one weight per position
        return torch.bmm(alpha, feats).flatten(0, 1), alpha.flatten(0, 1)


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.attention = Attention(cfg.feature_dim, cfg.decoder_dim, cfg.attention_dim)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.init_h = nn.Linear(cfg.feature_dim, cfg.decoder_dim)
        self.init_c = nn.Linear(cfg.feature_dim, cfg.decoder_dim)
        self.gate = nn.Linear(cfg.decoder_dim, cfg.feature_dim)  # the paper's gating scalar beta, per channel
        self.lstm = nn.LSTMCell(cfg.embed_dim + cfg.feature_dim, cfg.decoder_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.decoder_dim, cfg.vocab_size)

    def start(self, feats: torch.Tensor):
        """feats (B, P, F) -> the decoding state: (attention keys (B, P, A), h (B, D), c (B, D))."""
        mean = feats.mean(1)  # (B, F)
        return self.attention.enc(feats), torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))

    def advance(self, feats, keys, embedded, h, c):
        """The recurrence, one step for every row: embedded words (B*K, E) -> h, c (B*K, D), alpha (B*K, P),
        K rows per image as in Attention."""
        context, alpha = self.attention(feats, keys, h)
        context = torch.sigmoid(self.gate(h)) * context  # (B, F)
        h, c = self.lstm(torch.cat([embedded, context], dim=1), (h, c))
        return h, c, alpha

    def step(self, feats, keys, words, h, c):
        """One word for every row: words (B*K,) -> logits (B*K, V), h, c, alpha (B*K, P)."""
        h, c, alpha = self.advance(feats, keys, self.embed(words), h, c)
        return self.out(self.dropout(h)), h, c, alpha

    def forward(self, feats: torch.Tensor, captions: torch.Tensor):
        """Teacher forcing. feats (B, P, F), captions (B, T) starting with <start>.

        Returns logits (B, T-1, V) predicting captions[:, 1:] and alphas (B, T-1, P).
        Rows are processed only while they have words left (rows sorted by length would waste
        nothing; unsorted rows waste the padded steps, which the loss masks out).
        """
        keys, h, c = self.start(feats)
        embedded = self.embed(captions)  # (B, T, E): one lookup for every step
        hs, alphas = [], []
        for t in range(captions.size(1) - 1):
            h, c, alpha = self.advance(feats, keys, embedded[:, t], h, c)
            hs.append(h)
            alphas.append(alpha)
        # one big projection to the vocabulary instead of one per step
        logits = self.out(self.dropout(torch.stack(hs, 1)))  # (B, T-1, V)
        return logits, torch.stack(alphas, 1)

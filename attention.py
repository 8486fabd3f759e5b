"""--model=attention: Show, Attend and Tell (Xu et al., 2015) over the image's regions."""
import torch
from torch import nn
from torch.nn import functional as F

from decoder import RegionAttention


class AttentionModel(RegionAttention):
    """Show, Attend and Tell (Xu et al., 2015) soft attention. The mean region sets the LSTM's
    initial state; at every word, additive attention weighs the image's regions from the hidden
    state, a sigmoid gate (f_beta) scales their weighted mean, and the LSTM cell reads it with
    the previous word. The doubly stochastic penalty alpha_c * mean over regions of
    (1 - sum over words of the region's weight)^2 asks every region to be looked at about once."""

    def __init__(self, vocab_size, feature_dim, embedding_dim, hidden_size, attention_dim, dropout, alpha_c):
        super().__init__(feature_dim, hidden_size, attention_dim)
        self.alpha_c = alpha_c
        self.image_to_state = nn.Linear(feature_dim, 2 * hidden_size)
        self.gate = nn.Linear(hidden_size, feature_dim)
        self.start_input = nn.Parameter(torch.zeros(embedding_dim))  # read at the first step, before any word
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.cell = nn.LSTMCell(embedding_dim + feature_dim, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, vocab_size)

    def forward(self, regions, captions, lengths, sampling=0.0, image_of=None):
        """regions (B, R, F) (or (b, R, F) of images, image_of: see pooled.CaptionModel); captions (B, T) ending in
        </EOS>, padded; lengths (B,) -> logits (N, V), targets (N,) of the real positions, packed,
        doubly stochastic penalty ()."""
        regions = self.per_caption(regions, image_of)
        logits, targets, looked = self.unrolled(regions, captions, lengths, sampling)
        looked = [F.pad(weights, (0, 0, 0, len(regions) - len(weights))) for weights in looked]  # (B, R) each
        penalty = self.alpha_c * ((1.0 - torch.stack(looked).sum(0)) ** 2).mean()
        return logits, targets, penalty

    def start(self, regions):
        """regions (B, R, F) -> first input (B, E); state h, c (B, H), regions, their projection
        (B, R, A), last weights (B, R) (RegionAttention's layout)."""
        h, c = torch.tanh(self.image_to_state(regions.mean(1))).chunk(2, dim=-1)
        weights = regions.new_zeros(regions.shape[:2])
        return self.start_input.expand(len(regions), -1), (h, c, regions, self.region_projection(regions), weights)

    def _advance(self, inputs, state):
        """One attention + LSTM step: inputs (N, E) -> hidden (N, H), new state; N = images * beams."""
        h, c, regions, projected, _ = state
        weights, glimpse = self.attend(h, regions, projected)  # (N, R), (N, F)
        h, c = self.cell(torch.cat([inputs, torch.sigmoid(self.gate(h)) * glimpse], -1), (h, c))
        return h, (h, c, regions, projected, weights)

"""--model=updown: the top-down decoder of Bottom-Up and Top-Down attention (Anderson et al., 2018)
over the image's regions."""
import torch
from torch import nn

from decoder import RegionAttention


class UpDownModel(RegionAttention):
    """Two LSTMs a word. The attention LSTM reads the language LSTM's last output, the mean region
    and the previous word; from its output, additive attention weighs the regions; the language LSTM
    reads their weighted mean with the attention LSTM's output, and its output predicts the word.
    Both LSTMs start from zero, as in the paper."""

    def __init__(self, vocab_size, feature_dim, embedding_dim, hidden_size, attention_dim, dropout):
        super().__init__(feature_dim, hidden_size, attention_dim)
        self.start_input = nn.Parameter(torch.zeros(embedding_dim))  # read at the first step, before any word
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.attention_lstm = nn.LSTMCell(hidden_size + feature_dim + embedding_dim, hidden_size)
        self.language_lstm = nn.LSTMCell(feature_dim + hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, vocab_size)

    def forward(self, regions, captions, lengths, sampling=0.0, image_of=None):
        """regions (B, R, F) (or (b, R, F) of images, image_of: see pooled.CaptionModel); captions (B, T)
        ending in </EOS>, padded; lengths (B,) -> logits (N, V), targets (N,) of the real positions,
        packed, penalty 0."""
        logits, targets, _ = self.unrolled(self.per_caption(regions, image_of), captions, lengths, sampling)
        return logits, targets, logits.new_zeros(())

    def start(self, regions):
        """regions (B, R, F) -> first input (B, E); state: the attention LSTM's h, c and the language
        LSTM's h, c (B, H), the mean region (B, F), then regions, their projection (B, R, A), last
        weights (B, R) (RegionAttention's layout)."""
        zeros = regions.new_zeros(len(regions), self.language_lstm.hidden_size)
        weights = regions.new_zeros(regions.shape[:2])
        state = (zeros, zeros, zeros, zeros, regions.mean(1), regions, self.region_projection(regions), weights)
        return self.start_input.expand(len(regions), -1), state

    def _advance(self, inputs, state):
        """One step of both LSTMs: inputs (N, E) -> hidden (N, H), new state; N = images * beams."""
        h1, c1, h2, c2, mean, regions, projected, _ = state
        h1, c1 = self.attention_lstm(torch.cat([h2, mean, inputs], -1), (h1, c1))
        weights, glimpse = self.attend(h1, regions, projected)  # (N, R), (N, F)
        h2, c2 = self.language_lstm(torch.cat([glimpse, h1], -1), (h2, c2))
        return h2, (h1, c1, h2, c2, mean, regions, projected, weights)

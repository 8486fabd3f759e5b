"""--model=pooled: the pytorch-book captioner, one pooled image feature -> LSTM -> words."""
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from decoder import Decoder


class CaptionModel(Decoder):
    """The image feature is the LSTM's first input and sets its initial state;
    each later input is the previous word."""

    def __init__(self, vocab_size, feature_dim, embedding_dim, hidden_size, num_layers, dropout):
        super().__init__()
        self.image_to_input = nn.Linear(feature_dim, embedding_dim)
        self.image_to_state = nn.Linear(feature_dim, 2 * num_layers * hidden_size)
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, vocab_size)

    def forward(self, features, captions, lengths, sampling=0.0, image_of=None):
        """Logits and targets of every real (unpadded) position, packed, and a regularising loss (0 here).

        features (B, F), or (b, F) of images with image_of (B,) the image of each caption; captions (B, T)
        word indices ending in </EOS>, padded; lengths (B,) -> logits (N, V), targets (N,) with
        N = lengths.sum(), penalty ()
        Teacher forcing runs the LSTM once over the packed captions; scheduled sampling step by step.
        """
        features = self.per_caption(features, image_of)
        if sampling:
            logits, targets, _ = self.unrolled(features, captions, lengths, sampling)
            return logits, targets, logits.new_zeros(())
        image, state = self.start(features)
        inputs = torch.cat([image.unsqueeze(1), self.embedding(captions[:, :-1])], dim=1)  # (B, T, E)
        lengths = lengths.cpu()
        packed = pack_padded_sequence(self.dropout(inputs), lengths, batch_first=True, enforce_sorted=False)
        hidden, _ = self.lstm(packed, state)  # packed data: (N, H)
        logits = self.classifier(self.dropout(hidden.data))  # (N, V)
        targets = pack_padded_sequence(captions, lengths, batch_first=True, enforce_sorted=False).data  # (N,)
        return logits, targets, logits.new_zeros(())

    def start(self, features):
        """features (B, F) -> first input (B, E) and initial LSTM state (h, c), each (layers, B, H)."""
        layers, size = self.lstm.num_layers, self.lstm.hidden_size
        state = torch.tanh(self.image_to_state(features)).view(-1, 2, layers, size)  # (B, 2, layers, H)
        state = state.permute(1, 2, 0, 3).contiguous()  # (2, layers, B, H)
        return self.image_to_input(features), (state[0], state[1])

    def _advance(self, inputs, state):
        """One LSTM step: inputs (B, E) -> hidden (B, H), new state."""
        hidden, state = self.lstm(inputs.unsqueeze(1), state)  # (B, 1, H)
        return hidden.squeeze(1), state

    @staticmethod
    def select(state, rows):
        """Keep (and repeat) rows of a state: h, c (layers, B, H) -> (layers, N, H)."""
        rows = rows if isinstance(rows, slice) else rows.reshape(-1)  # (N,)
        return tuple(s[:, rows] for s in state)

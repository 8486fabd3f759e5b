"""The decoding interface every captioner (pooled.py, attention.py, transformer.py, updown.py) keeps,
which beam search and self-critical sampling use:
start(features) -> (inputs, state); step(inputs, state, banned) -> (log-probabilities (B, V) with the
banned words at 0 probability, state);
embed(words) -> inputs; select(state, rows) -> the state of those rows: a slice (one row per image)
or an (images, beams) tensor of row indices, each line one image's rows;
attention(state) -> the region weights of the last step (B, R), or None.
"""
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


class Decoder(nn.Module):
    """What every captioner shares of the decoding interface; each defines start, _advance and select."""

    @property
    def vocab_size(self):
        return self.classifier.out_features

    def embed(self, words):
        """words (B,) -> the next inputs (B, E)."""
        return self.embedding(words)

    def step(self, inputs, state, banned=None):
        """One step for a batch: inputs (B, E) -> log-probabilities (B, V), new state. Word indices in
        the tensor `banned` get probability 0, the others share all of it."""
        hidden, state = self._advance(inputs, state)
        logits = self.classifier(hidden)  # (B, V)
        if banned is not None:
            logits = logits.index_fill(-1, banned, float("-inf"))
        return logits.log_softmax(-1), state

    @staticmethod
    def per_caption(features, image_of):
        """features (b, ...) of images -> (n, ...) those of each caption; image_of (n,) or None (n = b)."""
        return features if image_of is None else features[image_of.to(features.device)]

    def unrolled(self, features, captions, lengths, sampling=0.0):
        """Teacher forcing step by step, like a packed LSTM: step t runs only the captions still
        going, longest first (batch_sizes[t] rows).

        features (B, F) or (B, R, F); captions (B, T) ending in </EOS>, padded; lengths (B,)
        -> logits (N, V), targets (N,) of the real positions, packed; each step's attention (rows, R) or None.
        Scheduled sampling (Bengio et al., 2015): with probability `sampling` a position's input is
        the model's own best word of the step before instead of the human word.
        """
        packed = pack_padded_sequence(captions, lengths.cpu(), batch_first=True, enforce_sorted=False)
        order = packed.sorted_indices.to(captions.device)
        features, captions = features[order], captions[order]
        inputs, state = self.start(features)
        outputs, looked = [], []
        for t, rows in enumerate(packed.batch_sizes.tolist()):
            state = self.select(state, slice(rows))
            hidden, state = self._advance(self.dropout(inputs[:rows]), state)  # (rows, H)
            outputs.append(self.classifier(self.dropout(hidden)) if sampling else hidden)  # (rows, V) or (rows, H)
            looked.append(self.attention(state))
            words = captions[:rows, t]  # (rows,)
            if sampling:
                own = torch.rand(rows, device=words.device) < sampling
                words = torch.where(own, outputs[-1].detach().argmax(-1), words)
            inputs = self.embed(words)  # (rows, E)
        logits = torch.cat(outputs) if sampling else self.classifier(self.dropout(torch.cat(outputs)))  # (N, V)
        return logits, packed.data, looked

    @staticmethod
    def attention(state):
        """The region weights of the last step (B, R); None for a model without attention."""
        return None


class RegionAttention(Decoder):
    """What the LSTMs that attend to regions (attention, updown) share: additive attention (Bahdanau et
    al.) over an image's regions from a query, and a state laid out as (the tensors of each row,
    ..., regions (M, R, F), their projection (M, R, A), last weights (N, R)). A state may hold several
    rows (beams) of each image: N = M * beams rows, image by image; the regions are kept once per image."""

    def __init__(self, feature_dim, hidden_size, attention_dim):
        super().__init__()
        self.region_projection = nn.Linear(feature_dim, attention_dim)
        self.hidden_projection = nn.Linear(hidden_size, attention_dim)
        self.attention_score = nn.Linear(attention_dim, 1)

    def attend(self, query, regions, projected):
        """query (N, H) -> weights (N, R) and glimpse (N, F), each row's weighted mean region."""
        rows = len(query)
        query = self.hidden_projection(query).view(len(regions), -1, 1, projected.size(-1))  # (M, beams, 1, A)
        scores = self.attention_score(torch.tanh(projected.unsqueeze(1) + query))  # (M, beams, R, 1)
        weights = scores.squeeze(-1).softmax(-1)  # (M, beams, R)
        return weights.view(rows, -1), torch.bmm(weights, regions).view(rows, -1)

    @staticmethod
    def select(state, rows):
        *per_row, regions, projected, weights = state
        if isinstance(rows, slice):  # one row per image
            return tuple(s[rows] for s in state)
        images = rows[:, 0] // (len(weights) // len(regions))  # (M',) the image of each line of rows
        rows = rows.reshape(-1)  # (N',)
        return (*(s[rows] for s in per_row), regions[images], projected[images], weights[rows])

    @staticmethod
    def attention(state):
        return state[-1]

"""--model=transformer: a Transformer encoder over the image's regions, a cached Transformer decoder."""
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from decoder import Decoder


class TransformerModel(Decoder):
    """A Transformer captioner (Vaswani et al., 2017, over image regions as captioning uses it): the
    regions, projected to d_model, pass `layers` encoder layers of self-attention (PyTorch's own); each
    word passes `layers` decoder layers of causal self-attention, cross-attention over the encoded
    regions and a feed-forward block, with learned positions and the word embedding tied to the
    classifier. Decoding runs one new position at a time against a key/value cache of the positions
    before; the encoded regions are kept once per image, whatever its number of beams."""

    def __init__(self, vocab_size, feature_dim, d_model, heads, layers, dropout, positions=128):
        super().__init__()
        self.region_projection = nn.Sequential(nn.Linear(feature_dim, d_model), nn.LayerNorm(d_model))
        encoder_layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout, batch_first=True,
                                                   norm_first=True)
        self.encoder = nn.TransformerEncoder(encoder_layer, layers, enable_nested_tensor=False)
        self.layers = nn.ModuleList(CachedDecoderLayer(d_model, heads, dropout) for _ in range(layers))
        self.positions = nn.Parameter(torch.randn(positions, d_model) * 0.02)  # a longer caption reuses the last
        self.start_input = nn.Parameter(torch.zeros(d_model))  # read at the first position, before any word
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.norm, self.dropout = nn.LayerNorm(d_model), nn.Dropout(dropout)
        self.classifier = nn.Linear(d_model, vocab_size)
        self.classifier.weight = self.embedding.weight  # tied input and output embeddings
        # rows of norm about 1 (nn.Embedding's N(0, 1) gave first logits of norm 16 x 16: a loss near 100)
        nn.init.normal_(self.embedding.weight, std=d_model ** -0.5)

    def forward(self, regions, captions, lengths, sampling=0.0, image_of=None):
        """All positions at once (causal): regions (B, R, F), or (b, R, F) of images with image_of (B,) the
        image of each caption: each image is encoded once; captions (B, T) ending in </EOS>, padded;
        lengths (B,) -> logits (N, V), targets (N,) packed as pack_padded_sequence packs, penalty 0."""
        if sampling:
            logits, targets, _ = self.unrolled(self.per_caption(regions, image_of), captions, lengths, sampling)
            return logits, targets, regions.new_zeros(())
        _, (looked_at, *_) = self.start(regions)
        looked_at = [(self.per_caption(k, image_of), self.per_caption(v, image_of)) for k, v in looked_at]
        first = self.start_input.expand(len(captions), -1)
        inputs = torch.cat([first.unsqueeze(1), self.embed(captions[:, :-1])], 1)  # (B, T, D)
        x = self.dropout(inputs + self.positions[:inputs.size(1)])
        for layer, regions_kv in zip(self.layers, looked_at):
            x = layer(x, regions_kv)  # (B, T, D)
        logits = self.classifier(self.dropout(self.norm(x)))  # (B, T, V)
        lengths = lengths.cpu()
        packed = pack_padded_sequence(logits, lengths, batch_first=True, enforce_sorted=False).data  # (N, V)
        targets = pack_padded_sequence(captions, lengths, batch_first=True, enforce_sorted=False).data
        return packed, targets, logits.new_zeros(())

    def start(self, regions):
        """regions (B, R, F) -> first input (B, D); state: each layer's keys and values of the encoded
        regions (M, heads, R, D/heads), kept once per image, each layer's self-attention cache (keys,
        values (N, heads, t, D/heads)), the position t, the last cross-attention weights (N, R).
        N = M * beams rows, image by image."""
        memory = self.encoder(self.region_projection(regions))  # (B, R, D)
        looked_at = [layer.regions_kv(memory) for layer in self.layers]
        caches = [layer.empty_cache(len(regions), regions) for layer in self.layers]
        weights = regions.new_zeros(regions.shape[:2])
        return self.start_input.expand(len(regions), -1), (looked_at, caches, 0, weights)

    def _advance(self, inputs, state):
        """One new position for every row: inputs (N, D) -> hidden (N, D), the state with its caches grown."""
        looked_at, caches, t, _ = state
        x = self.dropout(inputs + self.positions[min(t, len(self.positions) - 1)]).unsqueeze(1)  # (N, 1, D)
        grown = []
        for layer, regions_kv, cache in zip(self.layers, looked_at, caches):
            x, cache, weights = layer.step(x, regions_kv, cache)
            grown.append(cache)
        return self.norm(x.squeeze(1)), (looked_at, grown, t + 1, weights)

    @staticmethod
    def select(state, rows):
        looked_at, caches, t, weights = state
        if isinstance(rows, slice):  # one row per image
            images = rows
        else:
            images = rows[:, 0] // (len(weights) // len(looked_at[0][0]))  # (M',) the image of each line of rows
            rows = rows.reshape(-1)  # (N',)
        return ([(k[images], v[images]) for k, v in looked_at], [(k[rows], v[rows]) for k, v in caches], t,
                weights[rows])

    @staticmethod
    def attention(state):
        return state[-1]


class CachedDecoderLayer(nn.Module):
    """A pre-norm Transformer decoder layer (causal self-attention, cross-attention, feed-forward) on
    F.scaled_dot_product_attention, run over a whole caption at once or one position at a time
    against a cache of the keys and values of the positions before."""

    def __init__(self, d_model, heads, dropout):
        super().__init__()
        self.heads, self.dropout_p = heads, dropout
        self.self_qkv, self.self_out = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.cross_q, self.cross_kv = nn.Linear(d_model, d_model), nn.Linear(d_model, 2 * d_model)
        self.cross_out = nn.Linear(d_model, d_model)
        self.feed_forward = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Dropout(dropout),
                                          nn.Linear(4 * d_model, d_model))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def _split(self, x):
        """(B, T, D) -> (B, heads, T, D/heads)."""
        return x.view(*x.shape[:2], self.heads, -1).transpose(1, 2)

    @staticmethod
    def _merge(x):
        """(B, heads, T, D/heads) -> (B, T, D)."""
        return x.transpose(1, 2).flatten(2)

    def empty_cache(self, rows, like):
        d = self.self_out.in_features // self.heads
        empty = like.new_zeros(rows, self.heads, 0, d)
        return empty, empty

    def regions_kv(self, memory):
        """The encoded regions (M, R, D) -> this layer's keys and values of them, each (M, heads, R, D/heads)."""
        return tuple(self._split(part) for part in self.cross_kv(memory).chunk(2, -1))

    def forward(self, x, regions_kv):
        """x (B, T, D) attends causally to itself and to its image's regions (regions_kv) -> (B, T, D)."""
        p = self.dropout_p if self.training else 0.0
        q, k, v = (self._split(part) for part in self.self_qkv(self.norms[0](x)).chunk(3, -1))
        x = x + self.dropout(self.self_out(self._merge(F.scaled_dot_product_attention(q, k, v, dropout_p=p,
                                                                                      is_causal=True))))
        q = self._split(self.cross_q(self.norms[1](x)))
        looked = F.scaled_dot_product_attention(q, *regions_kv, dropout_p=p)  # (B, heads, T, D/heads)
        x = x + self.dropout(self.cross_out(self._merge(looked)))
        return x + self.dropout(self.feed_forward(self.norms[2](x)))

    def step(self, x, regions_kv, cache):
        """One new position: x (N, 1, D), the regions' keys and values (M, heads, R, D/heads) with
        N = M * beams, cache of keys and values (N, heads, t, D/heads) -> (N, 1, D), the cache with
        position t, cross-attention weights (N, R) (mean over heads)."""
        q, k, v = (self._split(part) for part in self.self_qkv(self.norms[0](x)).chunk(3, -1))
        k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)  # (N, heads, t+1, D/heads)
        x = x + self.dropout(self.self_out(self._merge(F.scaled_dot_product_attention(q, k, v))))
        regions_k, regions_v = regions_kv
        images = len(regions_k)
        q = self.cross_q(self.norms[1](x)).view(images, -1, self.heads, regions_k.size(-1))  # (M, beams, h, d)
        q = q.transpose(1, 2)  # (M, h, beams, d)
        weights = (q @ regions_k.transpose(-1, -2) / q.size(-1) ** 0.5).softmax(-1)  # (M, h, beams, R)
        looked = (weights @ regions_v).transpose(1, 2).reshape(len(x), 1, -1)  # (N, 1, D)
        x = x + self.dropout(self.cross_out(looked))
        x = x + self.dropout(self.feed_forward(self.norms[2](x)))
        return x, (k, v), weights.mean(1).reshape(len(x), -1)

"""The caption models and their self-contained checkpoints.

pooled (CaptionModel): the pytorch-book model, one pooled image feature -> LSTM -> words.
attention (AttentionModel): Show, Attend and Tell soft attention over the image's regions.
transformer (TransformerModel): a Transformer encoder over the regions, a cached Transformer decoder.

All decode through the same interface, which beam search and self-critical sampling use:
start(features) -> (inputs, state); step(inputs, state, banned) -> (log-probabilities (B, V) with the
banned words at 0 probability, state);
embed(words) -> inputs; select(state, rows) -> the state of those rows: a slice (one row per image)
or an (images, beams) tensor of row indices, each line one image's rows;
attention(state) -> the region weights of the last step (B, R), or None.
Ensemble decodes several of them as one, by the mean of their word probabilities.
"""
import dataclasses
import glob
import hashlib
import json
import math
import os
import warnings

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from captions import EOS, vocabulary_problem
from config import BACKBONE_NAMES, MODEL_NAMES, Config, UserError, from_saved
from files import atomic_save, load_pth

CHECKPOINT_KEYS = ("model", "config", "ix2word", "end", "feature")


class Decoder(nn.Module):
    """What both models share of the decoding interface; each defines start, _advance and select."""

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


class AttentionModel(Decoder):
    """Show, Attend and Tell (Xu et al., 2015) soft attention. The mean region sets the LSTM's
    initial state; at every word, additive attention weighs the image's regions from the hidden
    state, a sigmoid gate (f_beta) scales their weighted mean, and the LSTM cell reads it with
    the previous word. The doubly stochastic penalty alpha_c * mean over regions of
    (1 - sum over words of the region's weight)^2 asks every region to be looked at about once."""

    def __init__(self, vocab_size, feature_dim, embedding_dim, hidden_size, attention_dim, dropout, alpha_c):
        super().__init__()
        self.alpha_c = alpha_c
        self.region_projection = nn.Linear(feature_dim, attention_dim)
        self.hidden_projection = nn.Linear(hidden_size, attention_dim)
        self.attention_score = nn.Linear(attention_dim, 1)
        self.image_to_state = nn.Linear(feature_dim, 2 * hidden_size)
        self.gate = nn.Linear(hidden_size, feature_dim)
        self.start_input = nn.Parameter(torch.zeros(embedding_dim))  # read at the first step, before any word
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.cell = nn.LSTMCell(embedding_dim + feature_dim, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, vocab_size)

    def forward(self, regions, captions, lengths, sampling=0.0, image_of=None):
        """regions (B, R, F) (or (b, R, F) of images, image_of: see CaptionModel); captions (B, T) ending in
        </EOS>, padded; lengths (B,) -> logits (N, V), targets (N,) of the real positions, packed,
        doubly stochastic penalty ()."""
        regions = self.per_caption(regions, image_of)
        logits, targets, looked = self.unrolled(regions, captions, lengths, sampling)
        looked = [F.pad(weights, (0, 0, 0, len(regions) - len(weights))) for weights in looked]  # (B, R) each
        penalty = self.alpha_c * ((1.0 - torch.stack(looked).sum(0)) ** 2).mean()
        return logits, targets, penalty

    def start(self, regions):
        """regions (B, R, F) -> first input (B, E); state h, c (B, H), regions, their projection
        (B, R, A), last weights (B, R). A later state may hold several rows (beams) of each image:
        h, c and weights then have images * beams rows, image by image, and the regions are kept
        once per image."""
        h, c = torch.tanh(self.image_to_state(regions.mean(1))).chunk(2, dim=-1)
        weights = regions.new_zeros(regions.shape[:2])
        return self.start_input.expand(len(regions), -1), (h, c, regions, self.region_projection(regions), weights)

    def _advance(self, inputs, state):
        """One attention + LSTM step: inputs (N, E) -> hidden (N, H), new state; N = images * beams."""
        h, c, regions, projected, _ = state
        query = self.hidden_projection(h).view(len(regions), -1, 1, projected.size(-1))  # (M, beams, 1, A)
        scores = self.attention_score(torch.tanh(projected.unsqueeze(1) + query))  # (M, beams, R, 1)
        weights = scores.squeeze(-1).softmax(-1)  # (M, beams, R)
        glimpse = torch.bmm(weights, regions).view(len(h), -1)  # (N, F): each row's weighted mean region
        h, c = self.cell(torch.cat([inputs, torch.sigmoid(self.gate(h)) * glimpse], -1), (h, c))
        return h, (h, c, regions, projected, weights.view(len(h), -1))

    @staticmethod
    def select(state, rows):
        h, c, regions, projected, weights = state
        if isinstance(rows, slice):  # one row per image
            return tuple(s[rows] for s in state)
        images = rows[:, 0] // (len(h) // len(regions))  # (M',) the image of each line of rows
        rows = rows.reshape(-1)  # (N',)
        return h[rows], c[rows], regions[images], projected[images], weights[rows]

    @staticmethod
    def attention(state):
        return state[-1]


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


class Ensemble(nn.Module):
    """Several caption models decoding as one: each step's word probabilities are the mean of theirs
    (returned as its log, which beam search ranks by). Its features are the members' own side by side,
    each flattened: (B, F1 + F2 + ...), member i reading its part as shapes[i], (F,) pooled or (R, F)
    regions. Its attention is that of its first member that attends."""

    def __init__(self, members, shapes):
        super().__init__()
        self.members, self.shapes = nn.ModuleList(members), shapes
        self.vocab_size = members[0].vocab_size

    def start(self, features):
        """features (B, F1 + F2 + ...) -> each member's first inputs and state."""
        parts = features.split([math.prod(shape) for shape in self.shapes], dim=1)
        starts = [member.start(part.reshape(-1, *shape))  # (B, F) or (B, R, F)
                  for member, part, shape in zip(self.members, parts, self.shapes)]
        inputs, states = zip(*starts)
        return inputs, states

    def step(self, inputs, state, banned=None):
        steps = [member.step(*member_parts, banned) for member, member_parts in zip(self.members, zip(inputs, state))]
        log_probs = torch.stack([log_probs for log_probs, _ in steps])  # (members, B, V)
        return log_probs.logsumexp(0) - math.log(len(self.members)), tuple(state for _, state in steps)

    def embed(self, words):
        return tuple(member.embed(words) for member in self.members)

    def select(self, state, rows):
        return tuple(member.select(member_state, rows) for member, member_state in zip(self.members, state))

    def attention(self, state):
        weights = (member.attention(member_state) for member, member_state in zip(self.members, state))
        return next((w for w in weights if w is not None), None)


def quantized(model):
    """The model with dynamic int8 quantisation of its LSTM and Linear layers (CPU inference)."""
    with warnings.catch_warnings():  # torch.ao's eager quantisation is deprecated for torchao; 2.14 has it
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)  # the same deprecation
        return torch.ao.quantization.quantize_dynamic(model, {nn.LSTM, nn.LSTMCell, nn.Linear}, dtype=torch.qint8)


READS_REGIONS = ("attention", "transformer")  # the models that read region features, not pooled ones
ENCODES_REGIONS = ("transformer",)  # the models whose encoding of an image is work: once per image in training


def build_model(opt: Config, vocab_size, feature_dim):
    if opt.model == "attention":
        return AttentionModel(vocab_size, feature_dim, opt.embedding_dim, opt.hidden_size, opt.attention_dim,
                              opt.dropout, opt.alpha_c)
    if opt.model == "transformer":
        return TransformerModel(vocab_size, feature_dim, opt.d_model, opt.heads, opt.transformer_layers, opt.dropout,
                                max(128, opt.max_caption_len + 1))
    if opt.model == "pooled":
        return CaptionModel(vocab_size, feature_dim, opt.embedding_dim, opt.hidden_size, opt.num_layers, opt.dropout)
    raise UserError(f"--model={opt.model}: choose one of {', '.join(MODEL_NAMES)}")


CPU = torch.device("cpu")


def check_fits(opt: Config, vocab_size, feature_dim, device, copies):
    """Refuse in one line, before it is built, a model whose weights `copies` times over (training:
    weights, gradients and Adam's two moments) cannot fit in the device's free memory."""
    with torch.device("meta"):  # shapes only, no memory
        count = sum(p.numel() for p in build_model(opt, vocab_size, feature_dim).parameters())
    need, free = count * 4 * copies, free_memory(device)
    if need > free:
        extra = "gradients and optimizer state" if copies > 1 else "nothing else"
        raise UserError(f"--model={opt.model} at these sizes has {count / 1e6:.0f}M weights: {need / 2 ** 30:.1f} "
                        f"GiB with {extra}, and the {device.type} has {free / 2 ** 30:.1f} GiB free; choose smaller "
                        "sizes")


def free_memory(device):
    """Bytes the device can still give: CUDA's free memory, else the system's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as file:
        fields = dict(line.split(":", 1) for line in file)
    return int(fields["MemAvailable"].split()[0]) * 1024


def save_checkpoint(path, model, opt, ix2word, feature_meta, unfinished=(), **training_state):
    """Everything generate needs (weights, config, vocabulary, backbone, the words a caption cannot end
    on) and a checksum of them, plus resumable state."""
    checkpoint = {
        "model": model.state_dict(),
        "config": dataclasses.asdict(opt),
        "ix2word": ix2word,
        "end": EOS,
        "unfinished": list(unfinished),
        "feature": {"backbone": feature_meta["backbone"], "weights": feature_meta["weights"],
                    "feature_dim": feature_meta["feature_dim"], "grid": feature_meta.get("grid", 0)},
        **training_state,
    }
    atomic_save({**checkpoint, "checksum": checksum(checkpoint)}, path)


def checksum(checkpoint):
    """sha256 of what a caption depends on: the weights, the vocabulary and its end, the unfinished
    words, the model's options; a disk or a copy that flips bits changes it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(checkpoint["model"].items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy())  # a scalar too: its bytes
    described = [checkpoint.get(key) for key in ("ix2word", "end", "unfinished", "config", "feature")]
    digest.update(json.dumps(described, sort_keys=True, ensure_ascii=False, default=repr).encode())
    return digest.hexdigest()


def load_checkpoint(path):
    """A checkpoint dict, checked to hold what the toolkit reads from one; never runs code from the file."""
    checkpoint = load_pth(path, "checkpoint", CHECKPOINT_KEYS, mmap=True)
    problem = _checkpoint_problem(checkpoint)
    if problem:
        raise UserError(f"{path}: not a checkpoint of this toolkit: {problem}")
    return checkpoint


def _checkpoint_problem(checkpoint):
    """Why a loaded checkpoint dict cannot be used, or None."""
    feature, weights = checkpoint["feature"], checkpoint["model"]
    if not isinstance(checkpoint["config"], dict):
        return "its config is not a dict of options"
    if not (isinstance(feature, dict) and feature.get("backbone") in BACKBONE_NAMES
            and isinstance(feature.get("weights"), str) and _whole(feature.get("feature_dim"), 1)
            and _whole(feature.get("grid", 0), 0)):
        return "its feature description (backbone, weights, feature_dim, grid) is missing or wrong"
    problem = vocabulary_problem(checkpoint["ix2word"])
    if problem:
        return problem
    if checkpoint["config"].get("model") in READS_REGIONS and not feature.get("grid"):
        return f"its {checkpoint['config']['model']} model reads region features, but its features have none (grid 0)"
    unfinished = checkpoint.get("unfinished", [])
    if not (isinstance(unfinished, list) and all(_whole(ix, 0) and ix < len(checkpoint["ix2word"])
                                                 for ix in unfinished)):
        return "its list of words a caption cannot end on is not a list of word indices"
    if not isinstance(weights, dict) or not all(isinstance(w, torch.Tensor) for w in weights.values()):
        return "its model weights are not a dict of tensors"
    if not all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point() or w.is_complex()):
        return "its model weights are not float32"
    if not all(bool(torch.isfinite(w).all()) for w in weights.values() if w.is_floating_point()):
        return "its model weights hold NaN or infinite values (training diverged?)"
    if "checksum" in checkpoint and checkpoint["checksum"] != checksum(checkpoint):
        return "its weights or vocabulary differ from what was saved (checksum): the file is damaged"
    return None


def _whole(value, low):
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def model_from_checkpoint(checkpoint, path, device=CPU):
    """Rebuild the model of a checkpoint (load_checkpoint's); a mismatch of sizes is a clear error."""
    opt = from_saved(checkpoint["config"], path)
    check_fits(opt, len(checkpoint["ix2word"]), checkpoint["feature"]["feature_dim"], device, copies=1)
    model = build_model(opt, len(checkpoint["ix2word"]), checkpoint["feature"]["feature_dim"])
    try:  # the checkpoint's tensors (memory-mapped) replace the new ones: no second copy of the weights
        model.load_state_dict(checkpoint["model"], assign=True)
    except RuntimeError as error:
        raise UserError(f"{path}: weights do not fit its own configuration: {str(error)[:300]}") from None
    return model.eval()


def find_checkpoints(opt: Config):
    """The checkpoints of --model-ckpt (several, comma-separated: an ensemble), else checkpoint_dir/best.pth,
    else the newest checkpoint there -> a list of paths."""
    if opt.model_ckpt:
        paths = [path.strip() for path in opt.model_ckpt.split(",")]
        if not all(paths):
            raise UserError(f"--model-ckpt={opt.model_ckpt}: an empty checkpoint name; give PATH or PATH,PATH,...")
        return paths
    return [_newest_checkpoint(opt.checkpoint_dir)]


def _newest_checkpoint(folder):
    best = os.path.join(folder, "best.pth")
    if os.path.isfile(best):
        return best
    candidates = glob.glob(os.path.join(folder, "*.pth"))
    if not candidates:
        raise UserError(f"no checkpoint in {folder}/; train first or pass --model-ckpt=PATH")
    return max(candidates, key=os.path.getmtime)

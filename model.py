"""The caption model (image feature -> LSTM -> words) and its self-contained checkpoints."""
import dataclasses
import glob
import os

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from captions import EOS
from config import Config, UserError, from_saved
from files import atomic_save, load_pth

CHECKPOINT_KEYS = ("model", "config", "ix2word", "end", "feature")


class CaptionModel(nn.Module):
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

    def forward(self, features, captions, lengths):
        """Logits and targets of every real (unpadded) position, packed.

        features (B, F); captions (B, T) word indices ending in </EOS>, padded; lengths (B,)
        -> logits (N, V), targets (N,) with N = lengths.sum()
        """
        image, state = self.start(features)
        inputs = torch.cat([image.unsqueeze(1), self.embedding(captions[:, :-1])], dim=1)  # (B, T, E)
        lengths = lengths.cpu()
        packed = pack_padded_sequence(self.dropout(inputs), lengths, batch_first=True, enforce_sorted=False)
        hidden, _ = self.lstm(packed, state)  # packed data: (N, H)
        logits = self.classifier(self.dropout(hidden.data))  # (N, V)
        targets = pack_padded_sequence(captions, lengths, batch_first=True, enforce_sorted=False).data  # (N,)
        return logits, targets

    def start(self, features):
        """features (B, F) -> first input (B, E) and initial LSTM state (h, c), each (layers, B, H)."""
        layers, size = self.lstm.num_layers, self.lstm.hidden_size
        state = torch.tanh(self.image_to_state(features)).view(-1, 2, layers, size)  # (B, 2, layers, H)
        state = state.permute(1, 2, 0, 3).contiguous()  # (2, layers, B, H)
        return self.image_to_input(features), (state[0], state[1])

    # --- the decoding interface that beam search and self-critical sampling use ---
    @property
    def vocab_size(self):
        return self.classifier.out_features

    def embed(self, words):
        """words (B,) -> the next inputs (B, E)."""
        return self.embedding(words)

    def step(self, inputs, state):
        """One LSTM step for a batch: inputs (B, E) -> log-probabilities (B, V), new state."""
        hidden, state = self.lstm(inputs.unsqueeze(1), state)  # (B, 1, H)
        return self.classifier(hidden.squeeze(1)).log_softmax(-1), state

    @staticmethod
    def select(state, rows):
        """Keep (and repeat) the batch entries `rows` (N,) of a state: h, c (layers, B, H) -> (layers, N, H)."""
        return tuple(s[:, rows] for s in state)


def build_model(opt: Config, vocab_size, feature_dim):
    return CaptionModel(vocab_size, feature_dim, opt.embedding_dim, opt.hidden_size, opt.num_layers, opt.dropout)


def save_checkpoint(path, model, opt, ix2word, feature_meta, **training_state):
    """Everything generate needs (weights, config, vocabulary, backbone) plus resumable state."""
    atomic_save({
        "model": model.state_dict(),
        "config": dataclasses.asdict(opt),
        "ix2word": ix2word,
        "end": EOS,
        "feature": {key: feature_meta[key] for key in ("backbone", "weights", "feature_dim")},
        **training_state,
    }, path)


def load_checkpoint(path):
    """A checkpoint dict, checked to be one; never runs code from the file."""
    return load_pth(path, "checkpoint", CHECKPOINT_KEYS)


def model_from_checkpoint(checkpoint, path):
    """Rebuild the model of a checkpoint; a mismatch of sizes is a clear error."""
    opt = from_saved(checkpoint["config"], path)
    model = build_model(opt, len(checkpoint["ix2word"]), checkpoint["feature"]["feature_dim"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise UserError(f"{path}: weights do not fit its own configuration: {str(error)[:300]}") from None
    return model.eval()


def find_checkpoint(opt: Config):
    """opt.model_ckpt, else checkpoint_dir/best.pth, else the newest checkpoint there."""
    if opt.model_ckpt:
        return opt.model_ckpt
    best = os.path.join(opt.checkpoint_dir, "best.pth")
    if os.path.isfile(best):
        return best
    candidates = glob.glob(os.path.join(opt.checkpoint_dir, "*.pth"))
    if not candidates:
        raise UserError(f"no checkpoint in {opt.checkpoint_dir}/; train first or pass --model-ckpt=PATH")
    return max(candidates, key=os.path.getmtime)

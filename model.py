"""The caption models: the factory, their ensemble and their self-contained checkpoints.

Each captioner has its file, and all decode through decoder.py's interface:
pooled (pooled.CaptionModel): the pytorch-book model, one pooled image feature -> LSTM -> words.
attention (attention.AttentionModel): Show, Attend and Tell soft attention over the image's regions.
updown (updown.UpDownModel): Bottom-Up and Top-Down attention's two-LSTM decoder over the regions.
transformer (transformer.TransformerModel): a Transformer encoder over the regions, a cached Transformer decoder.
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

from attention import AttentionModel
from captions import EOS, NO_HABITS, vocabulary_problem
from config import BACKBONE_NAMES, MODEL_NAMES, Config, UserError, from_saved
from files import atomic_save, load_pth
from pooled import CaptionModel
from transformer import TransformerModel
from updown import UpDownModel

CHECKPOINT_KEYS = ("model", "config", "ix2word", "end", "feature")


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


READS_REGIONS = ("attention", "updown", "transformer")  # the models that read region features, not pooled ones
ENCODES_REGIONS = ("transformer",)  # the models whose encoding of an image is work: once per image in training


def build_model(opt: Config, vocab_size, feature_dim):
    if opt.model == "attention":
        return AttentionModel(vocab_size, feature_dim, opt.embedding_dim, opt.hidden_size, opt.attention_dim,
                              opt.dropout, opt.alpha_c)
    if opt.model == "updown":
        return UpDownModel(vocab_size, feature_dim, opt.embedding_dim, opt.hidden_size, opt.attention_dim, opt.dropout)
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


def save_checkpoint(path, model, opt, ix2word, feature_meta, habits=NO_HABITS, **training_state):
    """Everything generate needs (weights, config, vocabulary, backbone, the training captions' habits:
    the words a caption cannot end on, those it may say twice in a row) and a checksum of them, plus
    resumable state."""
    checkpoint = {
        "model": model.state_dict(),
        "config": dataclasses.asdict(opt),
        "ix2word": ix2word,
        "end": EOS,
        "unfinished": list(habits.unfinished),
        **({} if habits.repeatable is None else {"repeatable": list(habits.repeatable)}),
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
    described += [checkpoint["repeatable"]] if "repeatable" in checkpoint else []  # older checkpoints have none
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
    if checkpoint.get("kind") == "retrieval":
        return "it holds a retrieval model (main.py retrieval wrote it; give it as --retrieval-ckpt), not a captioner"
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
    for key, words in (("unfinished", "words a caption cannot end on"), ("repeatable", "words a caption may repeat")):
        indices = checkpoint.get(key, [])
        if not (isinstance(indices, list) and all(_whole(ix, 0) and ix < len(checkpoint["ix2word"]) for ix in indices)):
            return f"its list of {words} is not a list of word indices"
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

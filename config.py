"""Every setting of the toolkit, with its default, in one place.

Any field can be set on the command line of any command as `--field=value`
(`--field-name` works too), e.g. `python main.py train --lr=1e-3 --epoch=10`.
"""
import dataclasses
import difflib
import os
import sys

# PyTorch's CPU allocator backs tensors of 2 MB and more with transparent huge pages when this is set
# before its first allocation (it reads it once), and every command imports this file first. On
# this project's 2-core virtual machine MobileNetV2's forward pass ran twice as fast with it (batch
# 64: 1.5 -> 0.75 s; most likely fewer TLB misses, which cost more under a hypervisor). A user's own
# setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


class UserError(Exception):
    """A problem with the user's input: printed as one line, never as a traceback."""


@dataclasses.dataclass
class Config:
    # --- data (data_preprocess.py) ---
    annotation_file: str = ""  # AI Challenger caption JSON to encode
    caption_data_path: str = "caption.pth"  # encoded captions + vocabulary
    vocab_from: str = ""  # reuse the vocabulary of this caption .pth (for the val split)
    max_words: int = 10000  # vocabulary size, most frequent words first
    min_appear: int = 2  # a word seen fewer times becomes </UNKNOWN>
    max_caption_len: int = 30  # longer captions are truncated (in words)

    # --- image features (feature_extract.py) ---
    img_path: str = "images/"  # folder holding the image files named by image_id
    backbone: str = "resnet50"  # resnet50 | resnet101 | resnet152 | mobilenet_v2 | efficientnet_lite2
    weights: str = "default"  # default | a torchvision weights name | none | PATH to a state dict
    batch_size: int = 64
    num_workers: int = 2  # DataLoader workers reading images
    grid: int = 0  # also keep G x G region features (for --model=attention; 7 is the backbones' own map)

    # --- model (model.py) ---
    model: str = "pooled"  # pooled (one image vector) | attention (Show-Attend-Tell over --grid regions)
    embedding_dim: int = 256
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.3
    attention_dim: int = 512  # attention model: size of the additive attention layer
    alpha_c: float = 1.0  # attention model: weight of the doubly stochastic attention penalty

    # --- training (main.py train) ---
    val_caption_data_path: str = ""  # encoded val split; empty: hold out val_fraction of the images
    val_fraction: float = 0.05
    lr: float = 1e-3
    weight_decay: float = 0.0
    epoch: int = 10
    grad_clip: float = 5.0
    scheduled_sampling: float = 0.0  # feed the model its own word with a probability rising from 0 to this
    finetune_encoder: int = 0  # then train the backbone's last N stages too, from images (encoder.py says what N means)
    finetune_epoch: int = 3  # epochs of that fine-tuning (cross-entropy), before self-critical training
    encoder_lr: float = 1e-4  # learning rate of the fine-tuned stages
    augment: bool = False  # fine-tuning: random crops and flips (never for images whose captions say 左/右)
    seed: int = 0
    use_gpu: bool = True  # use CUDA when there is one
    checkpoint_dir: str = "checkpoints"
    resume: bool = False  # continue from checkpoint_dir/last.pth
    metric: str = "CIDEr-D"  # validation metric that selects best.pth
    eval_size: int = 500  # val images scored with beam search after each epoch (0: none)
    lr_decay: float = 0.8  # multiply lr by this after lr_patience epochs without improvement
    lr_patience: int = 2  # (0: never decay)
    early_stop_patience: int = 5  # stop after this many epochs without improvement (0: never)
    scst_epoch: int = 8  # then this many epochs of self-critical training on the metrics, from best.pth
    scst_lr: float = 2e-4
    scst_samples: int = 5  # captions sampled per image; each one's baseline is the others' mean reward
    scst_bleu_weight: float = 4.0  # reward = CIDEr-D + this * mean(BLEU-1..4)
    debug_file: str = "/tmp/debugc"  # if this file exists, training drops into ipdb

    # --- Visdom dashboard ---
    env: str = "caption"  # Visdom environment
    vis_server: str = "http://127.0.0.1"
    vis_port: int = 8097
    vis_timeout: float = 2.0  # seconds; a slow server never slows training
    plot_every: int = 50  # iterations between dashboard updates
    log_dir: str = "logs"  # metrics log and Visdom replay log of each run
    log: str = ""  # main.py replay: the Visdom log to post to the server

    # --- caption generation (main.py generate / evaluate) ---
    model_ckpt: str = ""  # empty: checkpoint_dir/best.pth, else the newest checkpoint there
    img: str = ""  # image file, folder or glob
    beam_size: int = 3
    n_best: int = 1
    max_gen_len: int = 30
    length_norm: float = 0.0  # rank finished captions by score / length**length_norm
    quantize: bool = False  # generate / evaluate on CPU: int8 weights for the decoder's LSTM and Linear layers
    output: str = ""  # write AI Challenger results JSON here
    attention_map: str = ""  # generate: write each image's attention maps (attention model) as a PNG here
    results: str = ""  # evaluate an existing results JSON instead of a model
    metrics_path: str = ""  # evaluate: write the scores JSON here


def parse(**kwargs) -> Config:
    """Build a Config from command-line keyword arguments; unknown fields are errors."""
    known = {f.name: f for f in dataclasses.fields(Config)}
    values = {}
    for key, value in kwargs.items():
        name = key.replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise UserError(f"unknown option --{key}{hint}; `python main.py help` lists them")
        values[name] = _coerce(value, known[name].type, name)
    return Config(**values)


def from_saved(values, source):
    """The Config saved in a checkpoint; fields added or removed since it was written are warned about."""
    known = {f.name for f in dataclasses.fields(Config)}
    unknown, missing = sorted(set(values) - known), sorted(known - set(values))
    if unknown or missing:
        changes = [f"dropped unknown --{name}" for name in unknown]
        changes += [f"--{name} takes its default" for name in missing]
        print(f"warning: {source} was written by another version: {'; '.join(changes)}", file=sys.stderr)
    return Config(**{name: value for name, value in values.items() if name in known})


def _coerce(value, kind, name):
    """Fire guesses types from the text; make each value the field's type."""
    kind = {"str": str, "int": int, "float": float, "bool": bool}.get(kind, kind)
    if kind is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise UserError(f"--{name} takes true or false, not {value!r}")
        return value.lower() in ("true", "1", "yes")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"--{name}={value!r} is not a valid {kind.__name__}") from None


def describe() -> str:
    """Every field with its default, for `main.py help`."""
    return "\n".join(f"--{f.name}={f.default!r}" for f in dataclasses.fields(Config))


def command(function):
    """Make `function(opt)` a fire command taking `--field=value` flags; a UserError exits with one line."""

    def run(**kwargs):
        if kwargs.pop("help", False) or kwargs.pop("h", False):
            print(f"{function.__doc__}\n\noptions (--name=default):\n{describe()}")
            return
        try:
            function(parse(**kwargs))
        except UserError as error:
            sys.exit(f"error: {error}")

    run.__name__, run.__doc__ = function.__name__, function.__doc__
    return run

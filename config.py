"""Every setting of the toolkit, with its default, its valid values and what it does, in one place.

Any field can be set on the command line of any command as `--field-name=value` (`--field_name`
works too), e.g. `python main.py train --lr=1e-3 --epoch=10`. Every value is checked against its
range before a command starts any work; `python main.py train --help` lists a command's own options.
"""
import dataclasses
import difflib
import math
import os
import re
import sys

# PyTorch's CPU allocator backs tensors of 2 MB and more with transparent huge pages when this is set
# before its first allocation (it reads it once), and every command imports this file first. On
# this project's 2-core virtual machine MobileNetV2's forward pass ran twice as fast with it (batch
# 64: 1.5 -> 0.75 s; most likely fewer TLB misses, which cost more under a hypervisor). A user's own
# setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


class UserError(Exception):
    """A problem with the user's input: printed as one line, never as a traceback."""


BACKBONE_NAMES = ("resnet50", "resnet101", "resnet152", "mobilenet_v2", "efficientnet_lite2")
MODEL_NAMES = ("pooled", "attention", "updown", "transformer")
DECODING_NAMES = ("beam", "greedy", "sample", "diverse")
METRIC_NAMES = ("CIDEr-D", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L",
                "val_loss", "perplexity", "top5_accuracy")
NAME = re.compile(r"[\w-][\w.-]*")  # a file-name-safe word: letters, digits, _ . - (not starting with .)
INT_LIMIT = 2 ** 31  # no count of this toolkit is larger; 1e309 and friends stop here


def option(default, valid=None, help=""):
    """A field with its valid values: an interval '[low, high)' ('inf': any finite number), a tuple of
    choices, NAME, or None (anything of its type)."""
    return dataclasses.field(default=default, metadata={"valid": valid, "help": help})


@dataclasses.dataclass
class Config:
    # --- data (data_preprocess.py) ---
    annotation_file: str = option("", None, "captions: AI Challenger, COCO or Karpathy JSON, IMAGE#N lines, CSV/TSV")
    caption_data_path: str = option("caption.pth", None, "encoded captions + vocabulary")
    extra_annotation_file: str = option("", None, "more training text for the same images (e.g. machine "
                                        "translations; comma-separated files): cross-entropy learns from it "
                                        "too, the references stay --annotation-file's")
    split: str = option("", ("", "train", "val", "test", "restval"), "a Karpathy dataset_*.json --annotation-file: "
                        "only the images of this split (empty: all)")
    vocab_from: str = option("", None, "reuse the vocabulary of this caption .pth (for the val split)")
    max_words: int = option(10000, "[1, inf)", "vocabulary size, most frequent words first")
    min_appear: int = option(2, "[1, inf)", "a word seen fewer times becomes </UNKNOWN>")
    max_caption_len: int = option(30, "[1, inf)", "longer captions are truncated (in words)")

    # --- image features (feature_extract.py) ---
    img_path: str = option("images/", None, "folder holding the image files named by image_id")
    backbone: str = option("resnet50", BACKBONE_NAMES, "the CNN that encodes the images")
    weights: str = option("default", None, "default | a torchvision weights name | none (random, seeded) | "
                                           "PATH to a state dict")
    batch_size: int = option(64, "[1, 65536]", "images (extract, generate) or captions (train) per batch")
    num_workers: int = option(2, "[0, 256]", "DataLoader workers reading images")
    view: int = option(0, "[0, 3]", "extract: features of this view of the photos: 0 as they are, 1 mirrored (never "
                                    "one whose captions say 左/右), 2 their central 80%, 3 both (see --feature-views)")
    grid: int = option(0, "[0, 9]", "also keep G x G region features (for --model=attention, updown or transformer; "
                                    "7 is the backbones' own map)")
    dtype: str = option("float16", ("float16", "int8"), "extract: how features are stored: float16, or int8 with a "
                                                        "scale per vector (half the size; read back as float32)")

    # --- model (model.py; each captioner in its own file) ---
    model: str = option("pooled", MODEL_NAMES, "pooled (one image vector) | attention (Show-Attend-Tell over "
                                               "--grid regions) | updown (Up-Down's two LSTMs over --grid "
                                               "regions) | transformer (over --grid regions)")
    embedding_dim: int = option(256, "[1, 65536]", "size of the word embeddings")
    hidden_size: int = option(512, "[1, 65536]", "size of the LSTM state")
    num_layers: int = option(2, "[1, 64]", "pooled model: LSTM layers")
    dropout: float = option(0.3, "[0, 1)", "dropout probability")
    attention_dim: int = option(512, "[1, 65536]", "attention and updown models: size of the additive attention layer")
    alpha_c: float = option(1.0, "[0, inf)", "attention model: weight of the doubly stochastic attention penalty")
    d_model: int = option(256, "[8, 4096]", "transformer: width of its layers (and of its tied word embedding)")
    heads: int = option(4, "[1, 64]", "transformer: attention heads (they must divide --d-model)")
    transformer_layers: int = option(2, "[1, 24]", "transformer: encoder layers over the regions, and decoder layers")

    # --- training (main.py train) ---
    val_caption_data_path: str = option("", None, "encoded val split; empty: hold out --val-fraction of the images")
    val_fraction: float = option(0.05, "(0, 1)", "share of the training images held out when there is no val split")
    lr: float = option(1e-3, "(0, inf)", "learning rate of the cross-entropy phases")
    warmup_steps: int = option(0, "[0, inf)", "the cross-entropy lr rises linearly over the first N optimizer "
                                              "steps, then falls as 1/sqrt(step) (Vaswani et al.; 0: constant)")
    label_smoothing: float = option(0.0, "[0, 1)", "cross-entropy phases: the target word keeps 1 - this, the "
                                                   "rest is spread over the vocabulary")
    weight_decay: float = option(0.0, "[0, inf)", "Adam's L2 penalty")
    pretrain_epoch: int = option(0, "[0, 100000]", "first this many cross-entropy epochs on the extra training "
                                                   "text with the captions; later phases then learn from the "
                                                   "captions alone (pre-training on machine translations)")
    epoch: int = option(10, "[0, 100000]", "cross-entropy epochs")
    grad_clip: float = option(5.0, "(0, inf)", "gradients are clipped to this norm")
    ema_decay: float = option(0.0, "[0, 1)", "keep an exponential moving average of the caption model's "
                                         "weights, this much of it kept each step (e.g. 0.995; 0: none); "
                                         "validation, best.pth and the next phase use the average")
    scheduled_sampling: float = option(0.0, "[0, 1]", "feed the model its own word with a probability rising "
                                                      "from 0 to this")
    finetune_encoder: int = option(0, "[0, 64]", "then train the backbone's last N stages too, from images "
                                                 "(encoder.py says what N means)")
    finetune_epoch: int = option(3, "[0, 100000]", "epochs of that fine-tuning (cross-entropy), before "
                                                   "self-critical training")
    encoder_lr: float = option(1e-4, "(0, inf)", "learning rate of the fine-tuned stages")
    feature_views: int = option(1, "[1, 4]", "training epoch e reads the features of view e % N of the training "
                                             "photos (extracted with --view), validation the photos as they are")
    augment: bool = option(False, None, "fine-tuning: random crops and flips (never for images whose captions "
                                        "say 左/右)")
    read_block: int = option(1, "[1, 100000]", "shuffle blocks of N consecutive photos of the features file, "
                                               "not single captions: a batch reads a few runs of rows, which a "
                                               "disk serves sequentially (1: every caption on its own)")
    seed: int = option(0, "[0, 2147483647]", "seeds the split, the batch order and the weights; and "
                                             "--decoding=sample's draws (each photo's from this and its features)")
    use_gpu: bool = option(True, None, "use CUDA when there is one")
    checkpoint_dir: str = option("checkpoints", None, "where last.pth (resumable) and best.pth go")
    resume: bool = option(False, None, "continue from checkpoint_dir/last.pth")
    overwrite: bool = option(False, None, "start a new run even though checkpoint_dir holds one (its files "
                                          "are replaced)")
    metric: str = option("CIDEr-D", METRIC_NAMES, "validation score that selects best.pth")
    eval_size: int = option(500, "[0, inf)", "the first val images scored after each epoch: captions by beam "
                                                 "search (main.py retrieval: R@1) (0: none)")
    lr_decay: float = option(0.8, "(0, 1]", "multiply lr by this after --lr-patience epochs without improvement")
    lr_patience: int = option(2, "[0, inf)", "epochs without improvement before the lr decays (0: never)")
    early_stop_patience: int = option(5, "[0, inf)", "stop a phase after this many epochs without improvement "
                                                     "(0: never)")
    scst_epoch: int = option(8, "[0, 100000]", "then this many epochs of self-critical training, from best.pth")
    scst_lr: float = option(2e-4, "(0, inf)", "learning rate of self-critical training")
    scst_samples: int = option(5, "[2, 1024]", "captions sampled per image; each one's baseline is the others' "
                                               "mean reward")
    scst_dropout: bool = option(True, None, "dropout in self-critical training (false: the model samples "
                                            "and learns with dropout off, as COCO recipes do)")
    scst_bleu_weight: float = option(4.0, "[0, inf)", "reward = CIDEr-D + this * mean(BLEU-1..4)")
    scst_diversity_weight: float = option(0.0, "[0, inf)", "... - this * the sample's CIDEr-D against the "
                                                           "image's other samples (variety)")
    scst_retrieval_weight: float = option(0.0, "[0, 1000]", "... + this x how well the sample picks its photo "
                                                            "out of the batch's under --retrieval-ckpt (minus "
                                                            "its hinge against the hardest other photo)")
    debug_file: str = option("/tmp/debugc", None, "if this file exists, training drops into ipdb")

    # --- Visdom dashboard ---
    env: str = option("caption", NAME, "Visdom environment, also the name of the run's logs")
    vis_server: str = option("http://127.0.0.1", None, "Visdom server address")
    vis_port: int = option(8097, "[0, 65535]", "Visdom server port")
    vis_timeout: float = option(2.0, "(0, 600]", "seconds; a slow server never slows training")
    plot_every: int = option(50, "[1, inf)", "iterations between dashboard updates")
    log_dir: str = option("logs", None, "metrics log and Visdom replay log of each run")
    log: str = option("", None, "main.py replay: the Visdom log to post to the server")

    # --- caption generation (main.py generate / evaluate, and validation) ---
    model_ckpt: str = option("", None, "empty: checkpoint_dir/best.pth, else the newest checkpoint there")
    img: str = option("", None, "image file, folder or glob")
    decoding: str = option("beam", DECODING_NAMES, "beam (beam search) | greedy (the likeliest word each step) | "
                           "sample (--temperature, --top-k, --top-p) | diverse (diverse beam search: "
                           "--diversity-groups, --diversity-lambda)")
    beam_size: int = option(3, "[1, 1000]", "beam and diverse: captions kept at each step of the search")
    n_best: int = option(1, "[1, 1000]", "captions per image (beam, diverse: at most --beam-size; greedy: 1; "
                                         "sample: this many samples); generate prints them, evaluate scores the "
                                         "first and counts the distinct ones")
    temperature: float = option(1.0, "(0, inf)", "sample: word log-probabilities are divided by this (below 1: "
                                                 "nearer greedy, above: more varied)")
    top_k: int = option(0, "[0, inf)", "sample: draw from the K likeliest words only (0: all)")
    top_p: float = option(1.0, "(0, 1]", "sample: draw from the nucleus, the fewest likeliest words whose "
                                         "probabilities sum to P (1: all)")
    diversity_groups: int = option(0, "[0, 1000]", "diverse: groups the beam is split into, searched one after "
                                                   "the other (0: one per beam); must divide --beam-size")
    diversity_lambda: float = option(0.5, "[0, inf)", "diverse: a word's score is lowered by this x the times "
                                                      "earlier groups chose it at the same step")
    no_repeat: bool = option(False, None, "never the same word twice in a row (every --decoding)")
    max_gen_len: int = option(30, "[1, 1000]", "words of a caption at most")
    min_len: int = option(1, "[1, 1000]", "words of a caption at least (the search never ends before)")
    ending_rule: bool = option(True, None, "never end a caption on a word the training captions do not end on "
                                           "(一个, 的, 在 ...; found in them; an ensemble: on no member's such "
                                           "word); false: wherever the model ends it")
    length_norm: float = option(0.0, "[0, 10]", "rank finished captions by score / length**length_norm")
    quantize: bool = option(False, None, "generate / evaluate on CPU: int8 weights for the decoder's LSTM and "
                                         "Linear layers")
    output: str = option("", None, "write AI Challenger results JSON here")
    attention_map: str = option("", None, "generate: write each image's attention maps (attention model) as a "
                                          "PNG into this folder")
    results: str = option("", None, "evaluate an existing results JSON instead of a model")
    metrics_path: str = option("", None, "evaluate, compare: write the scores JSON here")
    resamples: int = option(1000, "[100, 1000000]", "compare: bootstrap resamples of the images")
    retrieval_ckpt: str = option("", None, "the image-caption retrieval model (main.py retrieval writes it): "
                                          "evaluate reports how often a caption finds its own photo, "
                                          "train rewards it (--scst-retrieval-weight)")
    retrieval_epoch: int = option(15, "[1, 10000]", "main.py retrieval: training epochs")
    rerank_weight: float = option(0.0, "[0, 1000]", "generate, evaluate, serve: rank each photo's n-best by "
                                                    "log-probability + this x its cosine with the photo under "
                                                    "--retrieval-ckpt (0: by log-probability)")

    # --- serving (main.py serve) ---
    host: str = option("127.0.0.1", ("127.0.0.1", "0.0.0.0", "::"), "serve: the address to listen on (0.0.0.0: "
                                                                     "every network the machine is on)")
    port: int = option(8080, "[1024, 65535]", "serve: the port to listen on")
    max_batch_size: int = option(16, "[1, 256]", "serve: photos captioned together at most (1: no batching)")
    batch_timeout: float = option(0.02, "[0, 10]", "serve: seconds a photo may wait for others to fill a batch")
    max_queue: int = option(64, "[1, 100000]", "serve: requests waiting or being captioned at most; more are "
                                               "answered 503 with Retry-After")
    max_upload_mb: float = option(20.0, "(0, 1000]", "serve: the largest photo upload, in MB")


_DECODING = "decoding beam_size n_best temperature top_k top_p diversity_groups diversity_lambda no_repeat"
_GENERATION = (f"model_ckpt checkpoint_dir {_DECODING} seed max_gen_len min_len length_norm ending_rule quantize "
               "rerank_weight retrieval_ckpt batch_size num_workers use_gpu")
# The options each command reads (for its --help); every other field is still accepted and checked.
COMMAND_OPTIONS = {
    "process": "annotation_file split extra_annotation_file caption_data_path vocab_from max_words min_appear "
               "max_caption_len",
    "extract": "caption_data_path img_path backbone weights batch_size num_workers grid view dtype use_gpu",
    "train": "caption_data_path val_caption_data_path val_fraction model embedding_dim hidden_size num_layers "
             "dropout attention_dim alpha_c d_model heads transformer_layers lr warmup_steps label_smoothing "
             "weight_decay epoch grad_clip ema_decay "
             "scheduled_sampling finetune_encoder finetune_epoch encoder_lr feature_views augment read_block seed "
             "use_gpu checkpoint_dir resume "
             "overwrite metric eval_size "
             "lr_decay lr_patience early_stop_patience "
             "scst_epoch scst_lr scst_samples scst_dropout scst_bleu_weight scst_diversity_weight "
             "scst_retrieval_weight retrieval_ckpt "
             "debug_file env vis_server vis_port vis_timeout plot_every log_dir batch_size num_workers "
             f"{_DECODING} max_gen_len min_len length_norm ending_rule pretrain_epoch",
    "generate": f"img output attention_map {_GENERATION}",
    "evaluate": f"annotation_file split img_path results output metrics_path caption_data_path "
                f"val_caption_data_path {_GENERATION}",
    "compare": "results annotation_file split resamples seed metrics_path retrieval_ckpt val_caption_data_path",
    "retrieval": "caption_data_path val_caption_data_path retrieval_ckpt retrieval_epoch eval_size lr batch_size seed",
    "replay": "log log_dir env vis_server vis_port",
    "serve": f"host port max_batch_size batch_timeout max_queue max_upload_mb {_GENERATION}",
}
FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# The options that shape a model: a checkpoint's must be valid; its others may take their defaults.
MODEL_OPTIONS = ("model", "embedding_dim", "hidden_size", "num_layers", "dropout", "attention_dim", "alpha_c",
                 "d_model", "heads", "transformer_layers", "max_caption_len")


def parse(**kwargs) -> Config:
    """Build a checked Config from command-line keyword arguments; unknown fields are errors."""
    values = {}
    for key, value in kwargs.items():
        name = key.replace("-", "_")
        if name not in FIELDS and "no" + name in FIELDS and value is False:  # fire reads a bare --no_repeat as
            name, value = "no" + name, True  # --no + _repeat: the flag --noX means X=False to it
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            hint = f" (did you mean --{_dashed(close[0])}?)" if close else ""
            raise UserError(f"unknown option --{key}{hint}; `python main.py help` lists them")
        values[name] = _coerce(value, FIELDS[name].type, name)
    return check(Config(**values))


def from_saved(values, source):
    """The Config saved in a checkpoint, checked as the command line is; fields added or removed
    since it was written are warned about."""
    if not isinstance(values, dict):
        raise UserError(f"{source}: its config is a {type(values).__name__}, not a dict of options")
    unknown, missing = sorted(set(values) - set(FIELDS)), sorted(set(FIELDS) - set(values))
    if unknown or missing:
        changes = [f"dropped unknown --{name}" for name in unknown]
        changes += [f"--{name} takes its default" for name in missing]
        print(f"warning: {source} was written by another version: {'; '.join(changes)}", file=sys.stderr)
    checked = {}
    for name in set(values) & set(FIELDS):
        try:
            checked[name] = _coerce(values[name], FIELDS[name].type, name)
            problem = _problem(checked[name], FIELDS[name].metadata["valid"])
        except UserError as error:
            problem = str(error)
        if problem and name in MODEL_OPTIONS:
            raise UserError(f"{source}: its saved options are not valid: --{_dashed(name)}: {problem}")
        if problem:  # an option that does not shape the model (one an older version allowed)
            print(f"warning: {source}: saved --{_dashed(name)} is not valid ({problem}); it takes its default",
                  file=sys.stderr)
            checked.pop(name, None)
    try:
        return check(Config(**checked))
    except UserError as error:
        raise UserError(f"{source}: its saved options are not valid: {error}") from None


def _coerce(value, kind, name):
    """Fire guesses types from the text; make each value the field's type, or say why it cannot be."""
    kind = {"str": str, "int": int, "float": float, "bool": bool}.get(kind, kind)
    flag = f"--{_dashed(name)}"
    if kind is str and isinstance(value, tuple) and all(isinstance(part, str) for part in value):
        value = ",".join(value)  # fire reads --name=a,b (names without a dot) as a tuple: give back what was typed
    if not isinstance(value, (str, int, float)):  # fire's lists, dicts and None; a checkpoint's anything
        raise UserError(f"{flag}={value!r}: expected {kind.__name__}, got a {type(value).__name__}"[:300])
    if kind is bool:
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{flag} takes true or false, not {value!r}")
    if isinstance(value, bool):  # a bare `--lr` (fire: True), or --grid=True
        what = {int: "a whole number", float: "a number", str: "text"}[kind]
        raise UserError(f"{flag} needs {what} as its value, e.g. {flag}={FIELDS[name].default!r}")
    if kind is str:
        if "\0" in str(value):
            raise UserError(f"{flag}={value!r}: holds a NUL character, which no file name can")
        return str(value)
    if isinstance(value, str):
        try:
            value = float(value) if kind is float else int(value)
        except ValueError:
            raise UserError(f"{flag}={value!r} is not a valid {kind.__name__}") from None
    if kind is float:
        return float(value)
    if isinstance(value, float) and not value.is_integer():  # nan, inf and 1.9 included
        raise UserError(f"{flag}={value!r}: not a whole number")
    if abs(value) >= INT_LIMIT:
        raise UserError(f"{flag}={value!r}: too large")
    return int(value)


_INTERVAL = re.compile(r"([\[(])\s*(\S+?),\s*(\S+?)\s*([\])])")


def check(opt: Config) -> Config:
    """Every field within its valid values, and the options that depend on each other; else UserError."""
    for name, field in FIELDS.items():
        value = getattr(opt, name)
        problem = _problem(value, field.metadata["valid"])
        if problem:
            raise UserError(f"--{_dashed(name)}={value}: {problem}")
    _check_decoding(opt)
    if opt.d_model % opt.heads:
        raise UserError(f"--heads={opt.heads} does not divide --d-model={opt.d_model}")
    if opt.min_len > opt.max_gen_len:
        raise UserError(f"--min-len={opt.min_len} is more than --max-gen-len={opt.max_gen_len}")
    return opt


def _check_decoding(opt: Config):
    """The decoding options that cannot go together."""
    if opt.decoding in ("beam", "diverse") and opt.n_best > opt.beam_size:
        raise UserError(f"--n-best={opt.n_best} is more than --beam-size={opt.beam_size}: a search keeps "
                        "--beam-size captions")
    if opt.decoding == "greedy" and opt.n_best > 1:
        raise UserError(f"--n-best={opt.n_best}: greedy decoding gives one caption per image; --decoding=beam, "
                        "sample or diverse give more")
    if opt.decoding == "diverse" and opt.beam_size % (opt.diversity_groups or opt.beam_size):
        raise UserError(f"--diversity-groups={opt.diversity_groups} does not divide --beam-size={opt.beam_size}")


# The decoding options each --decoding reads; one given for a method that does not read it is refused.
READ_BY = {"beam_size": ("beam", "diverse"), "temperature": ("sample",), "top_k": ("sample",),
           "top_p": ("sample",), "diversity_groups": ("diverse",), "diversity_lambda": ("diverse",)}


def check_read_by_decoding(opt: Config, command_name):
    """A decoding option set (away from its default) for a --decoding that does not read it is a mistake,
    not a no-op (train's validation searches with --beam-size whatever --decoding)."""
    for name, methods in READ_BY.items():
        if (getattr(opt, name) != FIELDS[name].default and opt.decoding not in methods
                and (command_name, name) != ("train", "beam_size")):
            readers = " or ".join(f"--decoding={method}" for method in methods)
            raise UserError(f"--{_dashed(name)} is read by {readers} only, not --decoding={opt.decoding}; "
                            "leave it out or choose that decoding")


def updated(opt: Config, **values) -> Config:
    """opt with some options changed, each value as typed (text) or of its type, checked as the command
    line is; UserError for an unknown option or a bad value."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UserError(f"unknown option {unknown[0]}")
    return check(dataclasses.replace(opt, **{name: _coerce(value, FIELDS[name].type, name)
                                             for name, value in values.items()}))


def _problem(value, valid):
    """Why value is not one of `valid` (see option), or None."""
    if valid is None:
        return None
    if isinstance(valid, tuple):
        empty = ", or leave it empty" if "" in valid else ""
        return None if value in valid else f"choose one of {', '.join(filter(None, valid))}{empty}"
    if valid is NAME:
        return None if NAME.fullmatch(value) else "use letters, digits, _ . - only (not starting with .)"
    low_bracket, low, high, high_bracket = _INTERVAL.fullmatch(valid).groups()
    low, high = float(low), float(high)
    inside = math.isfinite(value) and (value >= low if low_bracket == "[" else value > low) and (
        value <= high if high_bracket == "]" else value < high)
    if inside:
        return None
    return f"must be in {valid}" if math.isfinite(high) else f"must be {'>=' if low_bracket == '[' else '>'} {low:g}"


def _dashed(name):
    return name.replace("_", "-")


def describe(names=None) -> str:
    """Options with their defaults, valid values and what they do, for --help (all when names is None)."""
    lines = []
    for name in names.split() if names else FIELDS:
        field = FIELDS[name]
        valid = field.metadata["valid"]
        valid = "|".join(valid) if isinstance(valid, tuple) else "a name" if valid is NAME else valid
        lines.append(f"  --{_dashed(name)}={field.default!r}" + (f" {valid}" if valid else "")
                     + f"\n      {field.metadata['help']}")
    return "\n".join(lines)


def _as_typed(kwargs, argv):
    """kwargs with each text option as typed on the command line argv: fire reads --img=007 as the
    number 7 and --model-ckpt=1,2 as a tuple of numbers, but a file name is a name."""
    typed = {}
    for i, word in enumerate(argv):
        if word.startswith("--"):
            name, equals, value = word[2:].partition("=")
            if equals or (i + 1 < len(argv) and not argv[i + 1].startswith("--")):
                typed[name.replace("-", "_")] = value if equals else argv[i + 1]
    return {key: typed[name] if (name := key.replace("-", "_")) in typed and name in FIELDS
            and FIELDS[name].type in (str, "str") else value for key, value in kwargs.items()}


def command(function):
    """Make `function(opt)` a fire command taking `--field=value` flags; a UserError exits with one line."""

    def run(*arguments, **kwargs):
        if kwargs.pop("help", False) or kwargs.pop("h", False):
            print(f"{function.__doc__}\n\noptions:\n{describe(COMMAND_OPTIONS[function.__name__])}")
            return
        try:
            if arguments:
                raise UserError(f"unexpected argument {arguments[0]!r}: options are given as --name=value")
            opt = parse(**_as_typed(kwargs, sys.argv[1:]))
            check_read_by_decoding(opt, function.__name__)
            function(opt)
        except UserError as error:  # one line, whatever a library put in the message
            sys.exit("error: " + " ".join(line.strip() for line in str(error).splitlines()))

    run.__name__, run.__doc__ = function.__name__, function.__doc__
    return run

"""A trained captioner (a checkpoint, or an ensemble of several) loaded once and captioning photos:
from files, as generate and evaluate do (read by DataLoader workers, in batches), or from photos already
in memory, as the server does."""
import dataclasses
import time

import torch

from beam_search import caption_features
from captions import Habits
from config import Config, UserError
from images import (
    build_backbone,
    encode_images,
    encode_pixels,
    image_transform,
    load_backbone,
    pick_device,
    prepare_backbone,
    release_freed_memory,
)
from model import (
    CaptionModel,
    Ensemble,
    TransformerModel,
    find_checkpoints,
    load_checkpoint,
    model_from_checkpoint,
    quantized,
)


@dataclasses.dataclass
class Captioner:
    """A checkpoint's model, ready to caption, with what its features are: `encoding` (backbone, its
    weights or the checkpoint of its fine-tuned one, grid) runs once for all models that share it, and
    `shape` is the features of one image, (F,) pooled or (R, F) regions."""

    model: object
    ix2word: list
    encoding: tuple
    shape: tuple
    habits: Habits  # what its training captions never do (see captions.Habits)


def load_captioner(path, opt: Config, device):
    """A checkpoint -> its Captioner, and the checkpoint (for its backbone)."""
    checkpoint = load_checkpoint(path)
    model = model_from_checkpoint(checkpoint, path, device).to(device)
    if opt.quantize:
        if device.type != "cpu":
            raise UserError("--quantize is for CPU inference; add --use-gpu=false")
        if isinstance(model, TransformerModel):
            raise UserError(f"{path}: --quantize is for the LSTM models (pooled, attention), not the transformer")
        model = quantized(model)
    feature = checkpoint["feature"]
    grid = feature.get("grid", 0) if not isinstance(model, CaptionModel) else 0
    encoding = (feature["backbone"], path if "encoder" in checkpoint else feature["weights"], grid)
    shape = (grid * grid, feature["feature_dim"]) if grid else (feature["feature_dim"],)
    repeatable = checkpoint.get("repeatable")  # None in older checkpoints: every word may repeat
    habits = Habits(tuple(checkpoint.get("unfinished", [])), None if repeatable is None else tuple(repeatable))
    return Captioner(model, checkpoint["ix2word"], encoding, shape, habits), checkpoint


def ensemble_habits(captioners):
    """An ensemble's habits: it ends on no member's unfinished word and repeats only what every member may."""
    repeatable = [set(c.habits.repeatable) for c in captioners if c.habits.repeatable is not None]
    return Habits(tuple(sorted(set().union(*(c.habits.unfinished for c in captioners)))),
                  tuple(sorted(set.intersection(*repeatable))) if repeatable else None)


@dataclasses.dataclass
class Loaded:
    """--model-ckpt loaded: the model (an Ensemble of several), its vocabulary, its Captioners, the
    prepared backbones by (backbone, weights) and the device they run on."""

    model: object
    ix2word: list
    captioners: list
    backbones: dict
    device: torch.device
    retrieval: object = None  # a retrieval.Retrieval that reranks the n-best (--rerank-weight), or None

    @property
    def encodings(self):
        """The different (backbone, weights, grid) of the members, each computed once for all that share it."""
        return list(dict.fromkeys(captioner.encoding for captioner in self.captioners))

    def features(self, encoded, rows):
        """encoded: per encoding, a batch's (pooled (B, F), regions (B, R, F) or None, ...) -> what the
        model reads of those rows: one member's features, an ensemble's members' side by side (B', sum)."""
        encodings = self.encodings
        features = [_features(encoded[encodings.index(c.encoding)], rows, self.device) for c in self.captioners]
        return features[0] if len(features) == 1 else torch.cat([f.flatten(1) for f in features], 1)

    def caption(self, encoded, rows, opt: Config):
        """encoded (see features), the rows to caption -> for each its captions by --decoding (see
        caption_features), keeping the habits of the members' training captions; with --rerank-weight
        ranked by log-probability + that weight x the caption's cosine with its photo (the retrieval model)."""
        features = self.features(encoded, rows)
        found = caption_features(self.model, features, self.ix2word, opt, habits=ensemble_habits(self.captioners))
        if self.retrieval is None:
            return found
        backbone = (self.retrieval.feature["backbone"], self.retrieval.feature["weights"])
        pooled = encoded[[encoding[:2] for encoding in self.encodings].index(backbone)][0][rows]  # (B', F)
        reranked = []
        for captions, photo in zip(found, pooled):
            cosines = self.retrieval.similarity([text for text, _, _ in captions], photo[None])[:, 0].tolist()
            order = sorted(range(len(captions)), key=lambda i: captions[i][1] + opt.rerank_weight * cosines[i],
                           reverse=True)
            reranked.append([captions[i] for i in order])
        return reranked


def load_captioners(opt: Config, device):
    """--model-ckpt (one checkpoint or several, an ensemble) loaded on device -> Loaded."""
    captioners, backbones = [], {}
    paths = find_checkpoints(opt)
    for path in paths:
        captioner, checkpoint = load_captioner(path, opt, device)
        if captioners and captioner.ix2word != captioners[0].ix2word:
            raise UserError(f"{path} and {paths[0]}: their vocabularies differ ({len(captioner.ix2word)} and "
                            f"{len(captioners[0].ix2word)} words); an ensemble's models must share one (train them "
                            "on the same caption .pth)")
        network = captioner.encoding[:2]  # backbone and weights: prepared once, whatever the grids
        if network not in backbones:
            backbones[network] = prepare_backbone(checkpoint_backbone(checkpoint, path), network[0], device)
        captioners.append(captioner)
        del checkpoint  # the model keeps its mapped weights; the rest (the optimizer state) is let go
    models = [captioner.model for captioner in captioners]
    model = models[0] if len(models) == 1 else Ensemble(models, [captioner.shape for captioner in captioners])
    return Loaded(model, captioners[0].ix2word, captioners, backbones, device, reranking_model(opt, backbones))


def reranking_model(opt: Config, backbones):
    """The retrieval model of --retrieval-ckpt when --rerank-weight asks for reranking (None when 0),
    checked to read the pooled features of a backbone the captioners use."""
    if not opt.rerank_weight:
        return None
    if not opt.retrieval_ckpt:
        raise UserError("--rerank-weight: name the retrieval model that reranks with --retrieval-ckpt=PATH")
    from retrieval import load
    model = load(opt.retrieval_ckpt)
    if (model.feature["backbone"], model.feature["weights"]) not in backbones:
        raise UserError(f"{opt.retrieval_ckpt}: reads {model.feature['backbone']} {model.feature['weights']} features; "
                        f"the captioners use {', '.join(' '.join(network) for network in backbones)}")
    return model


def caption_images(paths, opt: Config, timing=None):
    """paths -> ({path: n-best [(caption, score, attention)]}, {path: error}) with the checkpoint's model (or
    the ensemble of several), decoded by --decoding; a `timing` dict gets the seconds spent decoding."""
    loaded = load_captioners(opt, pick_device(opt.use_gpu))
    streams = [encode_images(loaded.backbones[encoding[:2]], encoding[0], paths, loaded.device, opt.batch_size,
                             opt.num_workers, encoding[2]) for encoding in loaded.encodings]
    captions, errors = {}, {}
    done = 0
    for encoded in zip(*streams):  # per encoding, the same images: (pooled, regions or None, errors)
        batch_errors = [next(filter(None, image_errors), "") for image_errors in zip(*(e for *_, e in encoded))]
        batch_paths, done = paths[done:done + len(batch_errors)], done + len(batch_errors)
        errors.update((path, error) for path, error in zip(batch_paths, batch_errors) if error)
        readable = [i for i, error in enumerate(batch_errors) if not error]
        if readable:
            if not captions:  # the first search is about to map the decoder's weights in
                release_freed_memory()
            started = time.perf_counter()
            beams = loaded.caption(encoded, readable, opt)
            if timing is not None:
                timing["decoding"] = timing.get("decoding", 0.0) + time.perf_counter() - started
            captions.update(zip([batch_paths[i] for i in readable], beams))
    return captions, errors


def caption_photos(loaded, photos, opt: Config):
    """RGB PIL images in memory -> per photo its captions [(caption, score, attention)], best first."""
    encoded = []
    for backbone, weights, grid in loaded.encodings:
        transform = image_transform(backbone)
        pixels = torch.stack([transform.crop(photo) for photo in photos])  # (B, S, S, 3)
        encoded.append(encode_pixels(loaded.backbones[backbone, weights], transform, pixels, loaded.device, grid))
    return loaded.caption(encoded, list(range(len(photos))), opt)


def _features(encoded, rows, device):
    """One encoding's batch (pooled, regions or None, ...) -> the features of those rows, (B', F) or (B', R, F)."""
    pooled, regions = encoded[:2]
    return (pooled if regions is None else regions)[rows].to(device)


def checkpoint_backbone(checkpoint, path):
    """The encoder a checkpoint was trained with: its own fine-tuned one, or the features' backbone
    with its pretrained weights."""
    feature = checkpoint["feature"]
    if "encoder" not in checkpoint:
        try:
            return load_backbone(feature["backbone"], feature["weights"])
        except UserError as error:
            raise UserError(f"{path}: its backbone cannot be loaded: {error}") from None
    trunk = build_backbone(feature["backbone"], "none")
    try:
        trunk.load_state_dict(checkpoint["encoder"])
    except (RuntimeError, TypeError, AttributeError, ValueError) as error:
        raise UserError(f"{path}: its fine-tuned encoder is not {feature['backbone']}'s ({str(error)[:150]})") from None
    return trunk

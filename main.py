"""Steps 3 and 4: train the captioner, caption new photos, score captions.

    python main.py train --lr=1e-3 --epoch=10
    python main.py generate --img=photo.jpg            # a file, a folder or a glob
    python main.py generate --img=photo.jpg --attention-map=maps/   # where an attention model looked
    python main.py evaluate --annotation-file=val.json --img-path=images/
    python main.py evaluate --results=results.json --annotation-file=val.json
    python main.py replay --log=logs/caption.visdom.log
    python main.py help
"""
import dataclasses
import glob
import os
import sys
import time

import fire
import torch

import config
from beam_search import caption_features
from captions import Habits
from config import Config, UserError, command
from files import check_output_file, check_output_folder, read_json, write_json
from images import (
    build_backbone,
    encode_images,
    load_backbone,
    pick_device,
    prepare_backbone,
    release_freed_memory,
    seen_photo,
)
from model import (
    READS_REGIONS,
    CaptionModel,
    Ensemble,
    TransformerModel,
    find_checkpoints,
    load_checkpoint,
    model_from_checkpoint,
    quantized,
)

# Each command imports what only it needs (training, metrics, drawing) when it runs: `generate`
# starts fast.

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@command
def train(opt: Config):
    """Train on opt.caption_data_path and its features; checkpoints go to opt.checkpoint_dir."""
    from trainer import Trainer
    Trainer(opt).train()


def list_images(pattern):
    """A file, every image file in a folder, or a glob -> sorted paths (in a folder or a glob, only
    regular files: a FIFO named x.jpg would hang the reader)."""
    if os.path.isdir(pattern):
        paths = [os.path.join(pattern, name) for name in os.listdir(pattern) if name.lower().endswith(IMAGE_SUFFIXES)]
    elif glob.has_magic(pattern):
        paths = glob.glob(pattern)
    else:
        return [pattern]
    return sorted(path for path in paths if os.path.isfile(path))


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


def load_captioners(opt: Config, device):
    """The model of --model-ckpt (an Ensemble of several), its vocabulary, its Captioners and the
    prepared backbones, by (backbone, weights)."""
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
    return model, captioners[0].ix2word, captioners, backbones


def caption_images(paths, opt: Config, timing=None):
    """paths -> ({path: n-best [(caption, score, attention)]}, {path: error}) with the checkpoint's model (or
    the ensemble of several), decoded by --decoding; a `timing` dict gets the seconds spent decoding."""
    device = pick_device(opt.use_gpu)
    model, ix2word, captioners, backbones = load_captioners(opt, device)
    encodings = list(dict.fromkeys(captioner.encoding for captioner in captioners))
    habits = ensemble_habits(captioners)
    streams = [encode_images(backbones[encoding[:2]], encoding[0], paths, device, opt.batch_size, opt.num_workers,
                             encoding[2]) for encoding in encodings]
    captions, errors = {}, {}
    done = 0
    for encoded in zip(*streams):  # per encoding, the same images: (pooled, regions or None, errors)
        batch_errors = [next(filter(None, image_errors), "") for image_errors in zip(*(e for *_, e in encoded))]
        batch_paths, done = paths[done:done + len(batch_errors)], done + len(batch_errors)
        errors.update((path, error) for path, error in zip(batch_paths, batch_errors) if error)
        readable = [i for i, error in enumerate(batch_errors) if not error]
        if readable:
            features = [_features(encoded[encodings.index(c.encoding)], readable, device) for c in captioners]
            features = features[0] if len(features) == 1 else torch.cat([f.flatten(1) for f in features], 1)
            if not captions:  # the first search is about to map the decoder's weights in
                release_freed_memory()
            started = time.perf_counter()
            beams = caption_features(model, features, ix2word, opt, habits=habits)
            if timing is not None:
                timing["decoding"] = timing.get("decoding", 0.0) + time.perf_counter() - started
            captions.update(zip([batch_paths[i] for i in readable], beams))
    return captions, errors


def _features(encoded, rows, device):
    """One encoding's batch (pooled, regions or None, errors) -> the features of those rows, (B', F) or (B', R, F)."""
    pooled, regions, _ = encoded
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


@command
def generate(opt: Config):
    """Print `image<TAB>caption` for every image of --img (n-best: one line each, with scores)."""
    if not opt.img:
        raise UserError("name the image(s) to caption with --img=FILE, FOLDER or GLOB")
    paths = list_images(opt.img)
    if opt.output:  # the photos of a folder or a glob are inputs too, each with an image_id of its own
        check_output_file(opt.output, inputs=[opt.img, *paths, *find_checkpoints(opt)])
        first = {}
        for path in paths:
            if first.setdefault(os.path.basename(path), path) != path:
                raise UserError(f"--output={opt.output}: {first[os.path.basename(path)]} and {path} would have one "
                                f"image_id, {os.path.basename(path)}; caption them in two runs")
    if not paths:
        raise UserError(f"--img={opt.img}: no images found")
    maps = attention_map_paths(paths, opt) if opt.attention_map else {}
    captions, errors = caption_images(paths, opt)
    for path, beams in captions.items():
        for text, score, _ in beams:
            print(f"{path}\t{text}" + (f"\t{score:.3f}" if opt.n_best > 1 else ""))
    for path, error in errors.items():
        print(f"error: {path}: {error}", file=sys.stderr)
    if opt.output:
        write_results(opt.output, {os.path.basename(p): beams[0][0] for p, beams in captions.items()})
    if opt.attention_map:
        write_attention_maps(captions, maps)
    if not captions:
        sys.exit(1)


def attention_map_paths(paths, opt: Config):
    """Before captioning: a model that attends, the --attention-map folder, made, and a PNG name there for each photo
    (photo.attention.png; photo-2.attention.png for a second photo.*), none of them a folder or --output."""
    folder = opt.attention_map
    if not any(load_checkpoint(path)["config"].get("model") in READS_REGIONS for path in find_checkpoints(opt)):
        raise UserError("--attention-map: the pooled model has no attention to show; train with --model=attention "
                        "or --model=transformer")
    if opt.output and os.path.abspath(opt.output) == os.path.abspath(folder):
        raise UserError(f"--output={opt.output} and --attention-map={folder}: one path for a file and a folder")
    check_output_folder(folder, "--attention-map folder")
    targets, taken = {}, set()
    for path in paths:
        stem, number = os.path.splitext(os.path.basename(path))[0], 1
        while (name := stem + (f"-{number}" if number > 1 else "") + ".attention.png") in taken:
            number += 1
        taken.add(name)
        targets[path] = os.path.join(folder, name)
        if os.path.exists(targets[path]) and not os.path.isfile(targets[path]):
            raise UserError(f"{targets[path]}: is a folder; the attention map of {path} goes there")
    return targets


def write_attention_maps(captions, targets):
    """One PNG per image, at targets[path]: where the best caption looked, word by word."""
    from visualize import attention_figure
    for path, beams in captions.items():
        attention_figure(seen_photo(path), beams[0][2]).save(targets[path])
        print(f"attention map: {targets[path]}", file=sys.stderr)


def write_results(path, captions):
    """AI Challenger submission format: [{"image_id", "caption"}]."""
    write_json([{"image_id": i, "caption": c} for i, c in captions.items()], path)


def read_results(path):
    """An AI Challenger results file -> {image_id: caption}, checked entry by entry."""
    entries = read_json(path, "results file")
    if not isinstance(entries, list) or not entries:
        raise UserError(f'{path}: not an AI Challenger results file: expected a non-empty list of '
                        '{"image_id", "caption"}')
    results = {}
    for index, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("image_id"), str)
                and isinstance(entry.get("caption"), str)):
            raise UserError(f"{path}: not an AI Challenger results file: entry {index}: expected an image_id and a "
                            "caption, both text")
        if entry["image_id"] in results:
            raise UserError(f"{path}: not an AI Challenger results file: entry {index}: image_id "
                            f"{entry['image_id']!r} appears twice")
        results[entry["image_id"]] = entry["caption"]
    return results


@command
def evaluate(opt: Config):
    """Score a model (or --results) against --annotation-file with BLEU-1..4, METEOR, ROUGE-L, CIDEr-D; a
    model's first caption of each photo is scored, its --n-best counted for the different captions per photo."""
    from captions import load_annotations, load_caption_data
    from metrics import format_table, score_captions
    if not opt.annotation_file:
        raise UserError("give the references with --annotation-file=FILE.json")
    if opt.output and opt.output == opt.metrics_path:
        raise UserError(f"--output and --metrics-path are both {opt.output}; give them two files")
    references = {entry["image_id"]: entry["caption"] for entry in load_annotations(opt.annotation_file, opt.split)}
    photos = [] if opt.results else [os.path.join(opt.img_path, image_id) for image_id in references]
    for output in (opt.output, opt.metrics_path):
        if output:
            check_output_file(output, inputs=[opt.annotation_file, opt.results, *photos,
                                              *([] if opt.results else find_checkpoints(opt))])
    training = load_caption_data(opt.caption_data_path) if os.path.isfile(opt.caption_data_path) else None  # first
    results, decoding = (read_results(opt.results), {}) if opt.results else caption_references(references, opt)
    try:
        scores = score_captions(results, references)
    except ValueError as error:
        raise UserError(f"{opt.results or opt.annotation_file}: {error}") from None
    distinct, empty = len(set(results.values())), sum(not caption.strip() for caption in results.values())
    if empty:
        print(f"warning: {empty} of the captions are empty (scored as such)", file=sys.stderr)
    print(f"{len(results)} images scored against {opt.annotation_file}; {distinct} distinct captions "
          "(0-1 scale; CIDEr-D is unbounded)")
    if decoding:
        print(f"--decoding={opt.decoding}: {decoding['distinct_per_photo']:.2f} different captions per photo among "
              f"its {decoding['captions_per_photo']:.2f} (the first is scored); {decoding['images_per_s']:.1f} "
              f"images/s in all, {decoding['decoded_per_s']:.1f} decoding alone")
    statistics = training_statistics(results, training, opt.caption_data_path)
    print(format_table(scores))
    if opt.metrics_path:
        write_json({**scores, "images": len(results), "distinct_captions": distinct, "empty_captions": empty,
                    **statistics}, opt.metrics_path)
        print(f"scores written to {opt.metrics_path}")


def training_statistics(results, training, path):
    """caption_statistics against the training caption data of `path`, printed; {} without it."""
    from metrics import caption_statistics
    if training is None:
        return {}
    statistics = caption_statistics(results, training)
    print(f"mean length {statistics['mean_length']:.2f} words; {statistics['unfinished']:.1%} end on an unfinished "
          f"word; {statistics['copied_from_training']:.1%} copied from a training caption of {path}")
    return statistics


def caption_references(references, opt: Config):
    """Caption every image of the references with the model -> {image_id: its first caption}, and how the
    decoding went: captions and different captions per photo among its n-best (means over the photos),
    images/s from loading the model to the last caption, and decoding alone; says what it skipped."""
    paths = [os.path.join(opt.img_path, image_id) for image_id in references]
    started, timing = time.perf_counter(), {}
    captions, errors = caption_images(paths, opt, timing)
    seconds = time.perf_counter() - started
    for path, error in errors.items():
        print(f"skipped {path}: {error}", file=sys.stderr)
    if errors:
        print(f"warning: {len(errors)} of {len(paths)} images could not be read and are not scored",
              file=sys.stderr)
    results = {os.path.relpath(path, opt.img_path): beams[0][0] for path, beams in captions.items()}
    if opt.output:
        write_results(opt.output, results)
        print(f"captions written to {opt.output}")
    photos, texts = max(len(captions), 1), [[text for text, *_ in beams] for beams in captions.values()]
    return results, {"captions_per_photo": sum(map(len, texts)) / photos,
                     "distinct_per_photo": sum(len(set(photo)) for photo in texts) / photos,
                     "images_per_s": len(captions) / seconds,
                     "decoded_per_s": len(captions) / max(timing.get("decoding", 0.0), 1e-9)}


@command
def replay(opt: Config):
    """Post a dashboard recorded without a server (logs/<env>.visdom.log) to a running Visdom."""
    import requests

    from visualize import replay as replay_log
    log = opt.log or os.path.join(opt.log_dir, f"{opt.env}.visdom.log")
    if not os.path.isfile(log):
        raise UserError(f"{log}: no such dashboard log")
    try:
        environments = replay_log(log, opt.vis_server, opt.vis_port)
    except (requests.RequestException, ConnectionError):
        raise UserError(f"no Visdom server answers at {opt.vis_server}:{opt.vis_port}; start one with "
                        f"`python visdom_server.py start --port={opt.vis_port}`") from None
    except (ValueError, IndexError, AttributeError, TypeError):
        raise UserError(f"{log}: not a Visdom dashboard log") from None
    print(f"replayed {log} into {opt.vis_server}:{opt.vis_port}, environment {', '.join(environments)}")


def help():
    """List every option of the toolkit with its default, valid values and what it does."""
    print(__doc__)
    print(config.describe())


if __name__ == "__main__":
    fire.Fire({"train": train, "generate": generate, "evaluate": evaluate, "replay": replay, "help": help})
    if sys.argv[1:2] == ["generate"]:
        # Python's teardown of torch's modules allocates ~130 MB (on 2.14) to free what the OS frees
        # anyway; generate has written and closed its files, so it leaves at once: a lower peak.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

"""Steps 3 and 4: train the captioner, caption new photos, score captions.

    python main.py train --lr=1e-3 --epoch=10
    python main.py generate --img=photo.jpg            # a file, a folder or a glob
    python main.py generate --img=photo.jpg --attention-map=maps/   # where an attention model looked
    python main.py evaluate --annotation-file=val.json --img-path=images/
    python main.py evaluate --results=results.json --annotation-file=val.json
    python main.py compare --results=a.json,b.json --annotation-file=val.json   # B - A, 95% paired intervals
    python main.py replay --log=logs/caption.visdom.log
    python main.py serve --port=8080                     # a page and POST /caption at http://127.0.0.1:8080/
    python main.py help
"""
import glob
import os
import sys
import time

import fire

import config
from captioning import caption_images
from config import Config, UserError, command
from files import check_output_file, check_output_folder, read_json, write_json
from images import seen_photo
from model import READS_REGIONS, find_checkpoints, load_checkpoint

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
    check_retrieval_options(opt)
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
    if opt.retrieval_ckpt:
        statistics.update(specificity(results, references, opt))
    if opt.metrics_path:
        write_json({**scores, "images": len(results), "distinct_captions": distinct, "empty_captions": empty,
                    **statistics}, opt.metrics_path)
        print(f"scores written to {opt.metrics_path}")


def check_retrieval_options(opt: Config):
    """--retrieval-ckpt reads the scored photos' features from --val-caption-data-path."""
    if opt.retrieval_ckpt and not opt.val_caption_data_path:
        raise UserError("--retrieval-ckpt: give the scored images' encoded captions and features with "
                        "--val-caption-data-path=caption_val.pth")


def specificity(results, references, opt: Config):
    """How often a caption finds its own photo among all scored photos (the retrieval model of
    --retrieval-ckpt, photos' features from --val-caption-data-path): R@1, R@5, median rank, of the results
    and of people's captions (each photo's first reference), printed -> {"retrieval": ..., "people_retrieval": ...}."""
    from retrieval import load, photo_features, recall
    model = load(opt.retrieval_ckpt)
    images = list(results)
    features = photo_features(model, opt.val_caption_data_path, images)
    found = {"retrieval": recall(model.ranks([results[i] for i in images], features)),
             "people_retrieval": recall(model.ranks([references[i][0] for i in images], features))}
    for name, who in (("retrieval", "these captions"), ("people_retrieval", "people's (first reference)")):
        print(f"caption -> photo among {len(images)} photos, {who}: R@1 {found[name]['R@1']:.1%}, "
              f"R@5 {found[name]['R@5']:.1%}, median rank {found[name]['median_rank']:.0f}")
    return found


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
def retrieval(opt: Config):
    """Train the image-caption retrieval model that measures how specific captions are (see retrieval.py)
    on --caption-data-path and its pooled features -> --retrieval-ckpt."""
    import retrieval as retrieval_model
    if not opt.retrieval_ckpt:
        raise UserError("name the retrieval model to write with --retrieval-ckpt=PATH")
    check_output_file(opt.retrieval_ckpt, inputs=[opt.caption_data_path, opt.val_caption_data_path])
    retrieval_model.train(opt)


@command
def compare(opt: Config):
    """Two results files of the same images (--results=A.json,B.json) against --annotation-file: each
    system's CIDEr-D, BLEU-4 and ROUGE-L (with --retrieval-ckpt also caption->photo R@1 among the images,
    features from --val-caption-data-path), B - A with its 95% paired-bootstrap interval over the images
    (--resamples, --seed), and the images where B's CIDEr-D wins, ties and loses."""
    from captions import load_annotations
    from metrics import image_statistics, paired_bootstrap
    paths = [path.strip() for path in opt.results.split(",")] if opt.results else []
    if len(paths) != 2 or not all(paths) or not opt.annotation_file:
        raise UserError("give two results files of the same images, --results=A.json,B.json, and their references, "
                        "--annotation-file=val.json")
    check_retrieval_options(opt)
    if opt.metrics_path:
        check_output_file(opt.metrics_path, inputs=[*paths, opt.annotation_file])
    first, second = (read_results(path) for path in paths)
    if set(first) != set(second):
        only = sorted(set(first) ^ set(second))
        raise UserError(f"{paths[0]} and {paths[1]} caption different images ({len(only)} in one only, e.g. "
                        f"{only[0]!r}); compare results of the same images")
    references = {entry["image_id"]: entry["caption"] for entry in load_annotations(opt.annotation_file, opt.split)}
    missing = [image_id for image_id in first if image_id not in references]
    if missing:
        raise UserError(f"{opt.annotation_file}: no references for {len(missing)} of the images, e.g. {missing[0]!r}")
    second = {image_id: second[image_id] for image_id in first}  # the same order
    statistics = [image_statistics(system, references) for system in (first, second)]
    if opt.retrieval_ckpt:  # and how often each caption finds its own photo (per image: 1 or 0)
        from retrieval import load, photo_features
        model = load(opt.retrieval_ckpt)
        features = photo_features(model, opt.val_caption_data_path, list(first))
        for system, found in zip((first, second), statistics):
            found["R@1"] = (model.ranks(list(system.values()), features) <= 1).double().numpy()
    table = paired_bootstrap(*statistics, opt.resamples, opt.seed)
    print(f"{len(first)} images; A = {paths[0]}, B = {paths[1]}; 95% intervals of B - A from {opt.resamples} "
          f"paired resamples of the images (seed {opt.seed})")
    print(f"{'score':<8} {'A':>7} {'B':>7} {'B - A':>8}  95% interval")
    for name, row in table.items():
        if name != "images":
            low, high = row["interval"]
            print(f"{name:<8} {row['first']:7.4f} {row['second']:7.4f} {row['difference']:+8.4f}  "
                  f"[{low:+.4f}, {high:+.4f}]")
    images = table["images"]
    print(f"CIDEr-D per image, B against A: {images['wins']} wins, {images['ties']} ties, {images['losses']} losses")
    if opt.metrics_path:
        write_json(table, opt.metrics_path)


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


@command
def serve(opt: Config):
    """Serve --model-ckpt over HTTP at --host:--port: a page to drop photos on, POST /caption for programs."""
    from serve import run
    run(opt)


def help():
    """List every option of the toolkit with its default, valid values and what it does."""
    print(__doc__)
    print(config.describe())


if __name__ == "__main__":
    fire.Fire({"train": train, "generate": generate, "evaluate": evaluate, "compare": compare,
               "retrieval": retrieval, "replay": replay, "serve": serve, "help": help})
    if sys.argv[1:2] == ["generate"]:
        # Python's teardown of torch's modules allocates ~130 MB (on 2.14) to free what the OS frees
        # anyway; generate has written and closed its files, so it leaves at once: a lower peak.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

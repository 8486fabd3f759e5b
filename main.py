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

import fire

import config
from beam_search import caption_features
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
from model import CaptionModel, TransformerModel, find_checkpoint, load_checkpoint, model_from_checkpoint, quantized

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


def caption_images(paths, opt: Config):
    """paths -> ({path: n-best [(caption, score)]}, {path: error}) with the checkpoint's model."""
    checkpoint_path = find_checkpoint(opt)
    checkpoint = load_checkpoint(checkpoint_path)
    device = pick_device(opt.use_gpu)
    model = model_from_checkpoint(checkpoint, checkpoint_path).to(device)
    if opt.quantize:
        if device.type != "cpu":
            raise UserError("--quantize is for CPU inference; add --use-gpu=false")
        if isinstance(model, TransformerModel):
            raise UserError("--quantize is for the LSTM models (pooled, attention), not the transformer")
        model = quantized(model)
    backbone_name, ix2word = checkpoint["feature"]["backbone"], checkpoint["ix2word"]
    backbone = prepare_backbone(checkpoint_backbone(checkpoint, checkpoint_path), backbone_name, device)
    grid = checkpoint["feature"].get("grid", 0) if not isinstance(model, CaptionModel) else 0
    del checkpoint  # the model keeps its mapped weights; the rest (the optimizer state) is let go
    captions, errors = {}, {}
    done = 0
    for pooled, regions, batch_errors in encode_images(backbone, backbone_name, paths, device, opt.batch_size,
                                                       opt.num_workers, grid):
        batch_paths, done = paths[done:done + len(batch_errors)], done + len(batch_errors)
        errors.update((path, error) for path, error in zip(batch_paths, batch_errors) if error)
        readable = [i for i, error in enumerate(batch_errors) if not error]
        if readable:
            features = (pooled if regions is None else regions)[readable].to(device)  # (B', F) or (B', R, F)
            if not captions:  # the first search is about to map the decoder's weights in
                release_freed_memory()
            beams = caption_features(model, features, ix2word, opt)
            captions.update(zip([batch_paths[i] for i in readable], beams))
    return captions, errors


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
    if opt.output:
        check_output_file(opt.output, inputs=[opt.img, find_checkpoint(opt)])
    if opt.attention_map:
        check_output_folder(opt.attention_map, "--attention-map folder")
    paths = list_images(opt.img)
    if not paths:
        raise UserError(f"--img={opt.img}: no images found")
    captions, errors = caption_images(paths, opt)
    for path, beams in captions.items():
        for text, score, _ in beams:
            print(f"{path}\t{text}" + (f"\t{score:.3f}" if opt.n_best > 1 else ""))
    for path, error in errors.items():
        print(f"error: {path}: {error}", file=sys.stderr)
    if opt.output:
        write_results(opt.output, {os.path.basename(p): beams[0][0] for p, beams in captions.items()})
    if opt.attention_map:
        write_attention_maps(captions, opt.attention_map)
    if not captions:
        sys.exit(1)


def write_attention_maps(captions, folder):
    """One PNG per image: where the best caption looked, word by word."""
    from visualize import attention_figure
    if any(beams[0][2] is None for beams in captions.values()):
        raise UserError("--attention-map: this checkpoint holds the pooled model, which has no attention to show; "
                        "train with --model=attention")
    for path, beams in captions.items():
        target = os.path.join(folder, os.path.splitext(os.path.basename(path))[0] + ".attention.png")
        attention_figure(seen_photo(path), beams[0][2]).save(target)
        print(f"attention map: {target}", file=sys.stderr)


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
    """Score a model (or --results) against --annotation-file with BLEU-1..4, METEOR, ROUGE-L, CIDEr-D."""
    from captions import load_annotations
    from metrics import format_table, score_captions
    if not opt.annotation_file:
        raise UserError("give the references with --annotation-file=FILE.json")
    if opt.output and opt.output == opt.metrics_path:
        raise UserError(f"--output and --metrics-path are both {opt.output}; give them two files")
    for output in (opt.output, opt.metrics_path):
        if output:
            check_output_file(output, inputs=[opt.annotation_file, opt.results, "" if opt.results else
                                              find_checkpoint(opt)])
    references = {entry["image_id"]: entry["caption"] for entry in load_annotations(opt.annotation_file)}
    results = read_results(opt.results) if opt.results else caption_references(references, opt)
    try:
        scores = score_captions(results, references)
    except ValueError as error:
        raise UserError(f"{opt.results or opt.annotation_file}: {error}") from None
    distinct, empty = len(set(results.values())), sum(not caption.strip() for caption in results.values())
    if empty:
        print(f"warning: {empty} of the captions are empty (scored as such)", file=sys.stderr)
    print(f"{len(results)} images scored against {opt.annotation_file}; {distinct} distinct captions "
          "(0-1 scale; CIDEr-D is unbounded)")
    print(format_table(scores))
    if opt.metrics_path:
        write_json({**scores, "images": len(results), "distinct_captions": distinct, "empty_captions": empty},
                   opt.metrics_path)
        print(f"scores written to {opt.metrics_path}")


def caption_references(references, opt: Config):
    """Caption every image of the references with the model -> {image_id: caption}; says what it skipped."""
    paths = [os.path.join(opt.img_path, image_id) for image_id in references]
    captions, errors = caption_images(paths, dataclasses.replace(opt, n_best=1))
    for path, error in errors.items():
        print(f"skipped {path}: {error}", file=sys.stderr)
    if errors:
        print(f"warning: {len(errors)} of {len(paths)} images could not be read and are not scored",
              file=sys.stderr)
    results = {os.path.relpath(path, opt.img_path): beams[0][0] for path, beams in captions.items()}
    if opt.output:
        write_results(opt.output, results)
        print(f"captions written to {opt.output}")
    return results


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

"""Step 2: pooled CNN features of every image, row i = image ix2id[i], as a float16 .npy;
with --grid=G also the G*G region features the attention model looks at; with --dtype=int8 half the
size (int8 with a float32 scale per vector in a .scales.npy beside each; training reads them as floats).

    python feature_extract.py extract --caption-data-path=caption.pth --img-path=images/ --backbone=resnet50
    python feature_extract.py extract --caption-data-path=caption.pth --img-path=images/ --grid=7
    python feature_extract.py extract --caption-data-path=caption.pth --img-path=images/ --grid=7 --view=1
    python feature_extract.py extract --caption-data-path=caption.pth --img-path=images/ --grid=7 --dtype=int8

The features go beside the caption data (caption.pth -> caption.features.npy, caption.regions.npy;
--view=V, an augmented view of the photos for `main.py train --feature-views`: caption.viewV.*),
with a .json describing them and a .bad.tsv listing images that could not be read. An
interrupted run resumes where it stopped. `torchrun --nproc-per-node=N feature_extract.py extract ...`
splits the images into N contiguous parts, one per process (and GPU), written into the same files.
"""
import glob
import json
import os
import sys

import fire
import numpy as np
import torch
from tqdm import tqdm

import distributed
import images
from captions import caption_texts, load_caption_data
from config import Config, UserError, command
from feature_reads import quantize
from files import atomic_save, read_json, remove_leftovers, write_json


@command
def extract(opt: Config):
    """Write the features of every image of opt.caption_data_path; resumes an interrupted run.
    Under torchrun each process encodes its own contiguous rows of the same files."""
    data = load_caption_data(opt.caption_data_path)
    image_ids = data["ix2id"]
    path = images.features_path(opt.caption_data_path, view=opt.view)
    _check_images(opt, image_ids)
    device = images.pick_device(opt.use_gpu)
    distributed.start(device)
    weights = images.resolve_weights(opt.backbone, opt.weights)
    print(f"loading the {opt.backbone} backbone ({weights} weights)...", file=sys.stderr)
    network = images.prepare_backbone(images.build_backbone(opt.backbone, weights), opt.backbone, device)
    with torch.inference_mode():
        size = images.BACKBONES[opt.backbone].size
        feature_dim = network(torch.zeros(1, 3, size, size, device=device)).shape[1]
    meta = {"backbone": opt.backbone, "weights": weights, "num_images": len(image_ids),
            "feature_dim": feature_dim, "grid": opt.grid, "img_path": os.path.abspath(opt.img_path),
            "image_ids_sha1": images.image_list_hash(image_ids), "bad": {}, "dtype": opt.dtype,
            **({"view": opt.view} if opt.view else {})}
    shapes = _files(path, (len(image_ids), feature_dim), opt.dtype)  # every file written: path -> (shape, dtype)
    if opt.grid:
        regions_path = images.features_path(opt.caption_data_path, grid=True, view=opt.view)
        shapes.update(_files(regions_path, (len(image_ids), opt.grid ** 2, feature_dim), opt.dtype))
    if _already_extracted(shapes, meta):
        print(f"{path}: already extracted with these settings; delete it to extract again")
        return
    first, stop = distributed.shard(len(image_ids), opt.batch_size)  # this process's rows
    arrays, row = _open_partial(path, shapes, meta, first)
    paths = [os.path.join(opt.img_path, image_id) for image_id in image_ids[row:stop]]
    progress = tqdm(total=stop - first, initial=row - first, desc=f"{opt.backbone} features", unit="img")
    captions = [caption_texts(data, i) for i in range(row, stop)] if opt.view else None
    encoded = images.encode_images(network, opt.backbone, paths, device, opt.batch_size, opt.num_workers, opt.grid,
                                   opt.view, captions)
    for *batches, errors in encoded:
        stored = [part for batch in batches if batch is not None  # pooled (B, F), then any regions (B, G*G, F)
                  for part in _stored(batch, opt.dtype)]
        for array, part in zip(arrays.values(), stored):
            array[row:row + len(part)] = part
        meta["largest"] = max(meta.get("largest", 0.0), float(batches[0].abs().max()))
        meta["bad"].update({str(row + i): f"{image_ids[row + i]}\t{' '.join(e.split())}"
                            for i, e in enumerate(errors) if e})
        row += len(errors)
        _save_progress(path, arrays, meta, row)
        progress.update(len(errors))
    progress.close()
    distributed.barrier()  # every process's rows are written
    if distributed.rank_and_size()[0] == 0:
        _finish(path, arrays, meta)


# Extraction fails, and writes nothing over earlier features, when more than this share of the images
# is missing or unreadable: a wrong --img-path, not a few broken photos.
MOST_UNREADABLE = 0.5


def _check_images(opt, image_ids):
    """Before any work: the image folder, the share of its images that are there, the grid's size."""
    if not os.path.isdir(opt.img_path):
        raise UserError(f"--img-path={opt.img_path}: no such folder")
    present = sum(os.path.isfile(os.path.join(opt.img_path, image_id)) for image_id in image_ids)
    if len(image_ids) - present > MOST_UNREADABLE * len(image_ids):
        raise UserError(f"--img-path={opt.img_path}: only {present} of the {len(image_ids)} images of "
                        f"{opt.caption_data_path} are there (e.g. no {image_ids[0]}); is it the right folder?")
    side = -(-images.BACKBONES[opt.backbone].size // 32)  # the backbone's own feature map
    if opt.grid > side:
        raise UserError(f"--grid={opt.grid}: {opt.backbone}'s feature map is {side}x{side}; use at most {side}")


def _files(path, shape, dtype):
    """The files of one features array: {path: (shape, dtype)}, int8 codes with their scales beside them."""
    if dtype == "float16":
        return {path: (shape, np.float16)}
    return {path: (shape, np.int8), images.scales_path(path): (shape[:-1], np.float32)}


def _stored(batch, dtype):
    """A batch of features (B, ..., F) float32 -> what its files hold: [float16], or [int8 codes, scales (B, ...)]."""
    return [batch.numpy()] if dtype == "float16" else list(quantize(batch))


def _print_size(shapes):
    for path, (shape, dtype) in shapes.items():
        size = np.prod(shape) * np.dtype(dtype).itemsize
        print(f"{path}: {' x '.join(map(str, shape))} {np.dtype(dtype).name} = {size / 2 ** 30:.2f} GiB "
              f"({size / shape[0] / 1e3:.1f} kB an image)")


def _already_extracted(shapes, meta):
    """Finished with the same settings (the records a kill left behind after the finish are removed)."""
    path = next(iter(shapes))
    meta_path = path.replace(".npy", ".json")
    if not (all(os.path.isfile(array) for array in shapes) and os.path.isfile(meta_path)):
        return False
    if not _same_job(_read_state(meta_path) or {}, meta):
        return False
    _remove_records(path)
    return True


def _remove_records(path):
    """The progress records of every process, once the features are finished, and what a kill left
    of the last writes."""
    for record in glob.glob(glob.escape(path) + ".partial.*"):  # and a .tmp a kill left
        os.remove(record)
    for output in (path.replace(".npy", ".bad.tsv"), path.replace(".npy", ".json")):
        remove_leftovers(os.path.dirname(os.path.abspath(output)), os.path.basename(output))


def _same_job(saved, meta):
    """Were the saved features made from the same images, backbone, weights and grid?"""
    saved = {"dtype": "float16", **saved} if isinstance(saved, dict) else None  # features from before --dtype
    return saved is not None and all(saved.get(key) == value for key, value in meta.items()
                                     if key not in ("bad", "largest"))


def _state_path(path, rank):
    """Where process `rank` of the launch records how far it got."""
    return f"{path}.partial.{rank}-of-{distributed.rank_and_size()[1]}.json"


def _read_state(path):
    """A record this command wrote (a progress state, a description), or None when it is missing or
    damaged: the work it describes is then done again."""
    try:
        return read_json(path, "features record")
    except UserError:
        return None


def _open_partial(path, shapes, meta, first):
    """The partial arrays {path: memmap} and this process's next row: resumed when every process's
    record matches meta, else new arrays (made by process 0), starting at this process's `first` row."""
    rank, size = distributed.rank_and_size()
    states = [_read_state(_state_path(path, r)) for r in range(size)]
    resume = (all(state is not None and _same_job(state, meta) for state in states)
              and all(os.path.isfile(array + ".partial") for array in shapes))
    distributed.barrier()  # every process has decided before process 0 changes anything
    if not resume and rank == 0:
        _print_size(shapes)
        for array, (shape, dtype) in shapes.items():
            np.lib.format.open_memmap(array + ".partial", mode="w+", dtype=dtype, shape=shape).flush()
    distributed.barrier()
    arrays = {array: np.lib.format.open_memmap(array + ".partial", mode="r+") for array in shapes}
    if not resume:
        return arrays, first
    meta["bad"], meta["largest"] = states[rank]["bad"], states[rank].get("largest", 0.0)
    print(f"resuming {path} at image {states[rank]['done']} of {meta['num_images']}")
    return arrays, states[rank]["done"]


def _save_progress(path, arrays, meta, done):
    """Flush the rows written so far, then record how many: a crash never claims unwritten rows."""
    for array in arrays.values():
        array.flush()
    state_path = _state_path(path, distributed.rank_and_size()[0])
    with open(state_path + ".tmp", "w", encoding="utf-8") as file:
        json.dump({**meta, "done": done}, file)
    os.replace(state_path + ".tmp", state_path)


def _finish(path, arrays, meta):
    """Process 0, once all are done: the arrays under their names, the description, the bad images."""
    states = [_state_path(path, rank) for rank in range(distributed.rank_and_size()[1])]
    for state in filter(None, map(_read_state, states)):
        meta["bad"].update(state.get("bad", {}))
        meta["largest"] = max(meta.get("largest", 0.0), state.get("largest", 0.0))
    if len(meta["bad"]) > MOST_UNREADABLE * meta["num_images"]:
        for array_path in arrays:
            os.remove(array_path + ".partial")
        for state in states:
            os.remove(state)
        example = next(iter(meta["bad"].values()))
        raise UserError(f"{path}: {len(meta['bad'])} of the {meta['num_images']} images could not be read "
                        f"(e.g. {example}); nothing was written")
    if meta["largest"] < 1e-3:
        print(f"warning: every feature is (nearly) zero (largest {meta['largest']:.1e}): {meta['backbone']} with "
              f"{meta['weights']} weights describes nothing; use pretrained weights", file=sys.stderr)
    report = path.replace(".npy", ".bad.tsv")
    atomic_save("".join(f"{line}\n" for line in meta["bad"].values()), report,
                save=lambda text, file: file.write(text.encode("utf-8")))
    if os.path.isfile(path.replace(".npy", ".json")):  # an earlier extraction's: never a description of other arrays
        os.remove(path.replace(".npy", ".json"))
    for array_path, array in arrays.items():
        array.flush()
        os.replace(array_path + ".partial", array_path)
        if meta["dtype"] == "float16" and os.path.isfile(images.scales_path(array_path)):
            os.remove(images.scales_path(array_path))  # an earlier int8 extraction's
    arrays.clear()
    write_json(meta, path.replace(".npy", ".json"))  # last: the description marks the features finished
    _remove_records(path)
    for line in meta["bad"].values():
        print(f"bad image: {line}", file=sys.stderr)
    print(f"{path}: {meta['num_images']} x {meta['feature_dim']} {meta['dtype']} features"
          + (f" (and {meta['grid']}x{meta['grid']} regions)" if meta["grid"] else "")
          + f"; {len(meta['bad'])} unreadable images left out (listed in {report})")


if __name__ == "__main__":
    fire.Fire({"extract": extract})

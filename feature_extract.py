"""Step 2: pooled CNN features of every image, row i = image ix2id[i], as a float16 .npy;
with --grid=G also the G*G region features the attention model looks at.

    python feature_extract.py extract --caption-data-path=caption.pth --img-path=images/ --backbone=resnet50
    python feature_extract.py extract --caption-data-path=caption.pth --img-path=images/ --grid=7

The features go beside the caption data (caption.pth -> caption.features.npy, caption.regions.npy),
with a .json describing them and a .bad.tsv listing images that could not be read. An
interrupted run resumes where it stopped.
"""
import json
import os
import sys

import fire
import numpy as np
import torch
from tqdm import tqdm

import images
from captions import load_caption_data
from config import Config, command


@command
def extract(opt: Config):
    """Write the features of every image of opt.caption_data_path; resumes an interrupted run."""
    image_ids = load_caption_data(opt.caption_data_path)["ix2id"]
    path = images.features_path(opt.caption_data_path)
    device = images.pick_device(opt.use_gpu)
    weights = images.resolve_weights(opt.backbone, opt.weights)
    network = images.prepare_backbone(images.build_backbone(opt.backbone, weights), device)
    with torch.inference_mode():
        size = images.BACKBONES[opt.backbone].size
        feature_dim = network(torch.zeros(1, 3, size, size, device=device)).shape[1]
    meta = {"backbone": opt.backbone, "weights": weights, "num_images": len(image_ids),
            "feature_dim": feature_dim, "grid": opt.grid, "img_path": os.path.abspath(opt.img_path),
            "image_ids_sha1": images.image_list_hash(image_ids), "bad": {}}
    shapes = {path: (len(image_ids), feature_dim)}  # every file written: path -> array shape
    if opt.grid:
        shapes[images.features_path(opt.caption_data_path, grid=True)] = (len(image_ids), opt.grid ** 2, feature_dim)
    if _already_extracted(shapes, meta):
        print(f"{path}: already extracted with these settings; delete it to extract again")
        return
    _print_size(shapes)
    arrays, start = _open_partial(path, shapes, meta)
    paths = [os.path.join(opt.img_path, image_id) for image_id in image_ids[start:]]
    progress = tqdm(total=len(image_ids), initial=start, desc=f"{opt.backbone} features", unit="img")
    row = start
    encoded = images.encode_images(network, opt.backbone, paths, device, opt.batch_size, opt.num_workers, opt.grid)
    for *batches, errors in encoded:
        for array, batch in zip(arrays.values(), batches):  # pooled (B, F), then regions (B, G*G, F)
            array[row:row + len(batch)] = batch.numpy()
        meta["bad"].update({str(row + i): f"{image_ids[row + i]}\t{e}" for i, e in enumerate(errors) if e})
        row += len(errors)
        _save_progress(path, arrays, meta, row)
        progress.update(len(errors))
    progress.close()
    _finish(path, arrays, meta)


def _print_size(shapes):
    for path, shape in shapes.items():
        size = np.prod(shape) * 2  # float16
        print(f"{path}: {' x '.join(map(str, shape))} float16 = {size / 2 ** 30:.2f} GiB "
              f"({size / shape[0] / 1e3:.1f} kB an image)")


def _already_extracted(shapes, meta):
    meta_path = next(iter(shapes)).replace(".npy", ".json")
    if not (all(os.path.isfile(path) for path in shapes) and os.path.isfile(meta_path)):
        return False
    with open(meta_path, encoding="utf-8") as file:
        return _same_job(json.load(file), meta)


def _same_job(saved, meta):
    """Were the saved features made from the same images, backbone, weights and grid?"""
    return all(saved.get(key) == value for key, value in meta.items() if key != "bad")


def _open_partial(path, shapes, meta):
    """The partial arrays {path: memmap} and the next row: resumed if they match meta, else new."""
    state_path = path + ".partial.json"
    if os.path.isfile(state_path) and all(os.path.isfile(array + ".partial") for array in shapes):
        with open(state_path, encoding="utf-8") as file:
            state = json.load(file)
        if _same_job(state, meta):
            meta["bad"] = state["bad"]
            print(f"resuming {path} at image {state['done']} of {meta['num_images']}")
            return {array: np.lib.format.open_memmap(array + ".partial", mode="r+") for array in shapes}, state["done"]
    return {array: np.lib.format.open_memmap(array + ".partial", mode="w+", dtype=np.float16, shape=shape)
            for array, shape in shapes.items()}, 0


def _save_progress(path, arrays, meta, done):
    """Flush the rows written so far, then record how many: a crash never claims unwritten rows."""
    for array in arrays.values():
        array.flush()
    temporary = path + ".partial.json.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump({**meta, "done": done}, file)
    os.replace(temporary, path + ".partial.json")


def _finish(path, arrays, meta):
    for array_path, array in arrays.items():
        array.flush()
        os.replace(array_path + ".partial", array_path)
    arrays.clear()
    with open(path.replace(".npy", ".json"), "w", encoding="utf-8") as file:
        json.dump(meta, file, ensure_ascii=False, indent=1)
    report = path.replace(".npy", ".bad.tsv")
    with open(report, "w", encoding="utf-8") as file:
        file.writelines(f"{line}\n" for line in meta["bad"].values())
    os.remove(path + ".partial.json")
    for line in meta["bad"].values():
        print(f"bad image: {line}", file=sys.stderr)
    print(f"{path}: {meta['num_images']} x {meta['feature_dim']} float16 features"
          + (f" (and {meta['grid']}x{meta['grid']} regions)" if meta["grid"] else "")
          + f"; {len(meta['bad'])} unreadable images left out (listed in {report})")


if __name__ == "__main__":
    fire.Fire({"extract": extract})

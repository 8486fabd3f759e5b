"""Step 2: pooled CNN features of every image, row i = image ix2id[i], as a float16 .npy.

    python feature_extract.py extract --caption-data-path=caption.pth --img-path=images/ --backbone=resnet50

The features go beside the caption data (caption.pth -> caption.features.npy), with a
.json describing them and a .bad.tsv listing images that could not be read. An
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
        feature_dim = network(torch.zeros(1, 3, images.IMAGE_SIZE, images.IMAGE_SIZE, device=device)).shape[1]
    meta = {"backbone": opt.backbone, "weights": weights, "num_images": len(image_ids),
            "feature_dim": feature_dim, "img_path": os.path.abspath(opt.img_path),
            "image_ids_sha1": images.image_list_hash(image_ids), "bad": {}}
    if _already_extracted(path, meta):
        print(f"{path}: already extracted with these settings; delete it to extract again")
        return
    features, start = _open_partial(path, meta)
    paths = [os.path.join(opt.img_path, image_id) for image_id in image_ids[start:]]
    progress = tqdm(total=len(image_ids), initial=start, desc=f"{opt.backbone} features", unit="img")
    row = start
    for batch, errors in images.encode_images(network, paths, device, opt.batch_size, opt.num_workers):  # (B, F)
        features[row:row + len(batch)] = batch.numpy()
        meta["bad"].update({str(row + i): f"{image_ids[row + i]}\t{e}" for i, e in enumerate(errors) if e})
        row += len(batch)
        _save_progress(path, features, meta, row)
        progress.update(len(batch))
    progress.close()
    _finish(path, features, meta)


def _already_extracted(path, meta):
    meta_path = path.replace(".npy", ".json")
    if not (os.path.isfile(path) and os.path.isfile(meta_path)):
        return False
    with open(meta_path, encoding="utf-8") as file:
        return _same_job(json.load(file), meta)


def _same_job(saved, meta):
    """Were the saved features made from the same images, backbone and weights?"""
    return all(saved.get(key) == value for key, value in meta.items() if key != "bad")


def _open_partial(path, meta):
    """The partial features file and its next row: resumed if it matches meta, else new."""
    partial, state_path = path + ".partial", path + ".partial.json"
    if os.path.isfile(partial) and os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as file:
            state = json.load(file)
        if _same_job(state, meta):
            meta["bad"] = state["bad"]
            print(f"resuming {path} at image {state['done']} of {meta['num_images']}")
            return np.lib.format.open_memmap(partial, mode="r+"), state["done"]
    shape = (meta["num_images"], meta["feature_dim"])
    return np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=shape), 0


def _save_progress(path, features, meta, done):
    """Flush the rows written so far, then record how many: a crash never claims unwritten rows."""
    features.flush()
    temporary = path + ".partial.json.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump({**meta, "done": done}, file)
    os.replace(temporary, path + ".partial.json")


def _finish(path, features, meta):
    features.flush()
    del features
    os.replace(path + ".partial", path)
    with open(path.replace(".npy", ".json"), "w", encoding="utf-8") as file:
        json.dump(meta, file, ensure_ascii=False, indent=1)
    report = path.replace(".npy", ".bad.tsv")
    with open(report, "w", encoding="utf-8") as file:
        file.writelines(f"{line}\n" for line in meta["bad"].values())
    os.remove(path + ".partial.json")
    for line in meta["bad"].values():
        print(f"bad image: {line}", file=sys.stderr)
    print(f"{path}: {meta['num_images']} x {meta['feature_dim']} float16 features; "
          f"{len(meta['bad'])} unreadable images left out (listed in {report})")


if __name__ == "__main__":
    fire.Fire({"extract": extract})

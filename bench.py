"""How fast the toolkit is where users wait, on this machine: one table, and the numbers in a JSON file.

    python bench.py all                 # every part (under 5 minutes on 2 CPU cores)
    python bench.py beam                # batched beam search against a one-image-at-a-time loop
    python bench.py cache               # the transformer's key/value cache against re-running the prefix
    python bench.py extract             # feature_extract.py's pipeline against the bare backbone
    python bench.py train               # captions/s, memory and where the time goes
    python bench.py generate            # `main.py generate` for one photo (cold) and for a folder
    python bench.py serve               # `main.py serve` under 1, 8 and 32 clients, batching on and off
    python bench.py scale --images=210000 [--memory-limit=8G]   # AI Challenger's size rehearsed (rehearsal.py)

Data: `--caption-data-path`/`--val-caption-data-path` with their features and `--img-path` (e.g. the
Flickr8k-CN recipe's); by default a demo set made in `--work` (data/bench). Runs on CUDA when there is one.
"""
import collections
import concurrent.futures
import contextlib
import cProfile
import dataclasses
import json
import math
import os
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

import fire
import numpy as np
import torch

import images
from config import MODEL_NAMES, Config, UserError, parse

WORK = "data/bench"  # the demo data, checkpoints and bench.json
BEAM_BATCHES, BEAM_SIZES, VOCAB, MAX_LEN = (1, 16, 64, 256), (1, 3, 5), 5000, 30
PAD, END, UNKNOWN = 0, 1, 2
# </EOS>'s logit per unit of the bench models' word counter: it overtakes the other words' (about 70 and
# 280 in the two seeded models) after about 11 words, 3 to 23 by image.
END_SLOPE = {"pooled": 100.0, "attention": 450.0}


# --- beam search ----------------------------------------------------------------------------------
def textbook_beam_search(model, feature, end, banned, beam_size, max_len, length_norm=0.0, stop_early=False,
                         min_len=1):
    """The plain beam search of the tutorials, for one image: a Python list of hypotheses, one model
    step and one topk per hypothesis. Same rules as beam_search.py: from min_len words on each live
    caption + </EOS> joins the finished pool at every step, live beams go on by other allowed words
    -> (best words, score).
    Like the book chapter's generator it runs all max_len steps; stop_early adds beam_search.py's
    exact stop (for length_norm 0) once the best finished caption beats every live one."""
    image, state = model.start(feature[None])
    live = [([], 0.0, image, state)]  # words, score, next input, model state
    pool = []
    for t in range(max_len + 1):
        candidates = []
        for words, score, inputs, state in live:
            not_now = list(banned) + ([end] if t < min_len else [])
            log_probs, new_state = model.step(inputs, state, feature.new_tensor(not_now, dtype=torch.long))
            log_probs = log_probs[0]
            if t >= min_len:
                pool.append((words, (score + log_probs[end].item()) / (t + 1) ** length_norm))
            log_probs[end] = -math.inf  # the best continuations by other words
            values, indices = log_probs.topk(beam_size)
            candidates += [(words + [word], score + value, new_state)
                           for value, word in zip(values.tolist(), indices.tolist()) if value > -math.inf]
        if t == max_len:
            break
        best = sorted(candidates, key=lambda c: c[1], reverse=True)[:beam_size]
        if stop_early and length_norm == 0 and pool and max(score for _, score in pool) >= best[0][1]:
            break  # scores only fall: no live caption can beat the best finished one
        live = [(words, score, model.embed(feature.new_tensor([words[-1]], dtype=torch.long)), state)
                for words, score, state in best]
    return max(pool, key=lambda pair: pair[1])


def bench_model(kind):
    """A model of the default sizes over VOCAB words, and features for 256 images, that decodes like a
    trained one: its word distributions are peaked (the top word near certain), and </EOS> becomes
    the likeliest word after about 11 words, different for every image."""
    from model import build_model
    torch.manual_seed(0)
    feature_dim, regions = 1280, 49  # MobileNetV2's 7 x 7 map
    model = build_model(Config(model=kind), VOCAB, feature_dim).eval()
    if kind in END_SLOPE:  # (the updown's and transformer's captions run as their random weights say)
        with torch.no_grad():
            model.classifier.weight.mul_(1000.0)
            _count_words(model, kind)
    shape = (256, feature_dim) if kind == "pooled" else (256, regions, feature_dim)
    return model, torch.randn(shape).relu()


def _count_words(model, kind):
    """Make unit 0 of the last LSTM layer count words: its gates ignore the inputs (input, forget and
    output gates open, candidate 0.1), so its cell grows by 0.1 a word from a start set by the image,
    and </EOS>'s logit follows its output."""
    size = model.classifier.in_features
    if kind == "pooled":
        lstm = model.lstm
        weights = (lstm.weight_ih_l1, lstm.weight_hh_l1, lstm.bias_ih_l1, lstm.bias_hh_l1)
        cell_row = 3 * size  # image_to_state's output is (2, layers, H): c of layer 2
    else:
        weights = (model.cell.weight_ih, model.cell.weight_hh, model.cell.bias_ih, model.cell.bias_hh)
        cell_row = size  # (h, c)
    gates = [0, size, 2 * size, 3 * size]  # unit 0 of the gates i, f, g, o
    for weight in weights:
        weight[gates] = 0.0
    weights[2][gates] = torch.tensor([30.0, 30.0, math.atanh(0.1), 30.0])
    model.image_to_state.weight[cell_row] *= 3.0  # starts spread over about (-1, 1)
    model.classifier.weight[END] = 0.0
    model.classifier.weight[END, 0] = END_SLOPE[kind]
    model.classifier.bias[END] = 0.0


def beam(textbook_images=8, work=WORK, **options):
    """Images/s of beam_search.py at each batch and beam size, against the textbook loop as the book's
    generator runs it (all max_len steps) and with beam_search.py's exact early stop; on the bench
    models and, given --model-ckpt, on that trained model with --val-caption-data-path's features.
    (`work` is taken like the other parts take it; the search writes nothing there.)"""
    del work
    from beam_search import beam_search, native_kernels
    device, rows = images.pick_device(), []
    for kind, model, features, end, banned in _beam_models(parse(**options)):
        model, features = model.to(device), features.to(device)
        for beam_size in BEAM_SIZES:
            speeds = {}
            for stop_early in (False, True):
                start = time.perf_counter()
                with native_kernels():  # the kernels beam_search.py runs: only the search differs
                    reference = [textbook_beam_search(model, f, end, banned, beam_size, MAX_LEN, stop_early=stop_early)
                                 for f in features[:textbook_images]]
                speeds[stop_early] = textbook_images / (time.perf_counter() - start)
            for batch in BEAM_BATCHES:
                count, speed = max(batch, textbook_images), 0.0
                for _ in range(1 if batch >= 256 else 2):  # short runs: the better of two, as speed drifts
                    start = time.perf_counter()
                    found = [b[0] for s in range(0, count, batch) for b in
                             beam_search(model, features[s:s + batch], end, banned, beam_size, MAX_LEN)]
                    speed = max(speed, count / (time.perf_counter() - start))
                same = sum(f[0] == r[0] for f, r in zip(found, reference)) / min(count, textbook_images)
                words = sum(len(f[0]) for f in found) / len(found)
                rows.append({"device": device.type, "model": kind, "beam": beam_size, "batch": batch,
                             "images_per_s": speed, "textbook_images_per_s": speeds[False],
                             "speed_up": speed / speeds[False], "textbook_stopping_images_per_s": speeds[True],
                             "speed_up_vs_stopping": speed / speeds[True], "same_best_caption": same,
                             "mean_words": words})
    _table("beam search (images/s)", rows)
    return rows


def _beam_models(opt: Config):
    """(name, model, features of 256 images, </EOS>, banned words): the bench models (one of each kind), then the
    --model-ckpt model with the first 256 images of --val-caption-data-path's features."""
    for kind in MODEL_NAMES:
        yield (kind, *bench_model(kind), END, (PAD, UNKNOWN))
    if opt.model_ckpt:
        from captions import load_caption_data, special_indices
        from model import load_checkpoint, model_from_checkpoint
        checkpoint = load_checkpoint(opt.model_ckpt)
        val_ids = load_caption_data(opt.val_caption_data_path)["ix2id"]
        stored, _ = images.load_features(opt.val_caption_data_path, val_ids, checkpoint["feature"].get("grid", 0))
        features = torch.from_numpy(np.asarray(stored[np.arange(min(256, len(stored)))], np.float32))  # (256, F|R, F)
        name = f"trained {checkpoint['config'].get('model', 'pooled')}"
        yield (name, model_from_checkpoint(checkpoint, opt.model_ckpt), features,
               *special_indices(checkpoint["ix2word"]))


class PrefixRerun(torch.nn.Module):
    """A transformer decoding without its key/value cache, bench's baseline for the cache: every step
    runs its decoder over the whole prefix again (as a captioner without a cache does)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.vocab_size = model, model.vocab_size

    def start(self, regions):
        """-> first input (M, D); state: each layer's keys and values of the regions (once per image),
        the prefix's inputs so far (N, t, D)."""
        first, (looked_at, *_) = self.model.start(regions)
        return first, (looked_at, first.new_zeros(len(regions), 0, first.size(-1)))

    def embed(self, words):
        return self.model.embed(words)

    def step(self, inputs, state, banned=None):
        model, (looked_at, prefix) = self.model, state
        prefix = torch.cat([prefix, inputs.unsqueeze(1)], 1)  # (N, t+1, D)
        beams = len(prefix) // len(looked_at[0][0])
        x = prefix + model.positions[:prefix.size(1)]
        for layer, (keys, values) in zip(model.layers, looked_at):
            x = layer(x, (keys.repeat_interleave(beams, 0), values.repeat_interleave(beams, 0)))  # (N, t+1, D)
        logits = model.classifier(model.norm(x[:, -1]))  # (N, V)
        if banned is not None:
            logits = logits.index_fill(-1, banned, float("-inf"))
        return logits.log_softmax(-1), (looked_at, prefix)

    @staticmethod
    def select(state, rows):
        looked_at, prefix = state
        images = rows[:, 0] // (len(prefix) // len(looked_at[0][0]))  # (M',)
        return [(keys[images], values[images]) for keys, values in looked_at], prefix[rows.reshape(-1)]

    @staticmethod
    def attention(_state):
        return None


def cache(count=64, beam_size=3, work=WORK, **options):
    """Images/s of the transformer's search with its key/value cache against re-running the whole
    prefix at every step (PrefixRerun), same images and captions: on --model-ckpt's transformer when it
    is one, else the bench's. (`work` as in beam.)"""
    del work
    from beam_search import beam_search
    device = images.pick_device()
    kind, model, features, end, banned = [m for m in _beam_models(parse(**options)) if "transformer" in m[0]][-1]
    model, features = model.to(device), features[:count].to(device)
    speeds, found = {}, {}
    for name, searcher in (("cache", model), ("prefix re-run", PrefixRerun(model))):
        start = time.perf_counter()
        found[name] = [b[0][0] for b in beam_search(searcher, features, end, banned, beam_size, MAX_LEN)]
        speeds[name] = count / (time.perf_counter() - start)
    row = {"model": kind, "images": count, "beam": beam_size, "cache_images_per_s": speeds["cache"],
           "prefix_rerun_images_per_s": speeds["prefix re-run"], "speed_up": speeds["cache"] / speeds["prefix re-run"],
           "same_captions": sum(a == b for a, b in zip(found["cache"], found["prefix re-run"])) / count,
           "mean_words": sum(map(len, found["cache"])) / count}
    _table("transformer search: key/value cache against re-running the prefix", [row])
    return row


# --- extraction -----------------------------------------------------------------------------------
def extract(count=512, rounds=3, work=WORK, **options):
    """Images/s of feature extraction's pipeline (read, transform, forward) against the bare forward
    pass on ready tensors in channels_last, same backbone, batch, forward chunks and threads. The two alternate for
    `rounds` rounds, and the medians are reported: a shared machine's speed drifts between runs, and
    the ratio is taken within each round. Also the images/s of reading alone (what a DataLoader worker
    does: decode, resize, crop) on one core, and its share: the bare forward's time that reading the
    same photos takes, which the pipeline loses where its workers share the forward's cores."""
    opt = parse(**options)
    paths = _image_paths(opt, work)[:count]
    files = images.ImageFiles(paths, "mobilenet_v2")
    start = time.perf_counter()
    for index in range(len(files)):
        files[index]
    reading = len(paths) / (time.perf_counter() - start)
    device = images.pick_device(opt.use_gpu)
    network = images.prepare_backbone(images.build_backbone("mobilenet_v2", "none"), "mobilenet_v2", device)
    batches = [torch.randn(opt.batch_size, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
               for _ in range(math.ceil(len(paths) / opt.batch_size))]
    with torch.inference_mode():
        network(batches[0])  # warm up
    bare, pipeline = [], []
    for _ in range(rounds):
        with torch.inference_mode():
            _sync(device)
            start = time.perf_counter()
            for batch in batches:
                for chunk in images.forward_chunks(batch, device):  # as extraction runs it
                    network(chunk)
            _sync(device)
            bare.append(len(batches) * opt.batch_size / (time.perf_counter() - start))
        start = time.perf_counter()
        for _ in images.encode_images(network, "mobilenet_v2", paths, device, opt.batch_size, opt.num_workers):
            pass
        pipeline.append(len(paths) / (time.perf_counter() - start))
    row = {"backbone": "mobilenet_v2", "images": len(paths), "batch": opt.batch_size,
           "threads": torch.get_num_threads(), "pipeline_images_per_s": statistics.median(pipeline),
           "bare_forward_images_per_s": statistics.median(bare),
           "ratio": statistics.median(p / b for p, b in zip(pipeline, bare)),
           "reading_images_per_s_one_core": reading, "reading_share": statistics.median(bare) / reading}
    _table("extraction", [row])
    return row


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- training -------------------------------------------------------------------------------------
def _training_parts():
    """Where training time goes: the functions whose time (profiled) makes each part, and the loop of
    an epoch. Named by the functions themselves: a rename fails here instead of timing nothing."""
    from beam_search import caption_features
    from dataset import CaptionSplit
    from metrics import score_captions
    from trainer import Trainer
    return {"forward/backward": (Trainer.cross_entropy_step, Trainer.self_critical_step),
            "data loading": (CaptionSplit.batches, CaptionSplit.image_batches),
            "validation decoding": (caption_features,), "metrics": (score_captions,),
            "loop": (Trainer.train_epoch,)}


def train(batches=20, work=WORK, **options):
    """Captions/s, peak memory and where the time goes in cross-entropy and in self-critical training,
    each in a fresh process over `batches` batches, then one validation (on --eval-size images)."""
    opt = _bench_data(parse(**{"eval_size": 100, **options}), work)
    rows = []
    for model in MODEL_NAMES:
        folder = os.path.join(work, "train", model)
        shutil.rmtree(folder, ignore_errors=True)
        for phase in ("cross-entropy", "self-critical"):
            flags = [f"--phase={phase}", f"--batches={batches}", f"--model={model}", f"--checkpoint-dir={folder}",
                     f"--log-dir={folder}", f"--eval-size={opt.eval_size}", *_data_flags(opt)]
            output = subprocess.run([sys.executable, __file__, "train_phase", *flags], capture_output=True, text=True)
            if output.returncode:
                sys.exit(f"bench train {model} {phase} failed:\n{output.stderr[-2000:]}")
            rows.append(json.loads(output.stdout.strip().splitlines()[-1]))
    _table("training", rows)
    return rows


def _own_peak_mb():
    """This process's peak resident memory since it started (Linux's VmHWM; ru_maxrss would count
    the parent's memory at fork)."""
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def train_phase(phase, batches, **options):
    """(Used by `train`.) One phase, profiled; prints its numbers as a JSON line."""
    from model import ENCODES_REGIONS
    from trainer import Trainer
    opt = parse(**options)
    self_critical = phase == "self-critical"
    run = dataclasses.replace(opt, epoch=1, scst_epoch=int(self_critical), resume=self_critical, vis_port=1,
                              vis_timeout=0.1, plot_every=10 ** 9)
    trainer = Trainer(run)
    split = trainer.train_split
    # a shorter epoch, the same work per batch: `batches` batches of images, or of about as many captions
    images = batches * run.batch_size if self_critical else batches * split.images_per_batch(run.batch_size)
    split.rows = split.rows[:images]
    split.pairs = split.pairs_of(split.rows) if self_critical or opt.model in ENCODES_REGIONS else \
        split.pairs[:batches * run.batch_size]
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.runcall(trainer.train)
    wall = time.perf_counter() - start
    stats = pstats.Stats(profile).stats
    keys = {name: {(f.__code__.co_filename, f.__code__.co_firstlineno, f.__code__.co_name) for f in functions}
            for name, functions in _training_parts().items()}
    seconds = {name: sum(value[3] for key, value in stats.items() if key in functions)
               for name, functions in keys.items()}
    captions = len(split.rows) * opt.scst_samples if self_critical else len(split.pairs)
    print(json.dumps({"model": opt.model, "phase": phase, "captions": captions, "wall_s": wall,
                      "captions_per_s": captions / seconds.pop("loop"),
                      "peak_rss_mb": _own_peak_mb(),
                      **{f"{name} s": value for name, value in seconds.items()}}))


# --- generate -------------------------------------------------------------------------------------
def generate(count=200, work=WORK, **options):
    """Wall time and peak memory of `python main.py generate --img=ONE.jpg` as a cold process, and
    images/s of captioning a folder of `count` photos."""
    from captioning import caption_images
    opt = _bench_data(parse(**options), work)
    checkpoint = _checkpoint(opt, work)
    paths = _image_paths(opt, work)[:count]
    command = [sys.executable, "main.py", "generate", f"--img={paths[0]}", f"--model-ckpt={checkpoint}"]
    for _ in range(2):  # the first run also keeps the backbone as TorchScript: time the second, as users meet it
        start = time.perf_counter()
        peak_mb = _peak_of(command) / 1024
        cold = time.perf_counter() - start
    options = dataclasses.replace(opt, model_ckpt=checkpoint)
    start = time.perf_counter()
    caption_images(paths, options)
    row = {"one_photo_cold_s": cold, "one_photo_peak_mb": peak_mb,
           "folder_images": len(paths), "folder_images_per_s": len(paths) / (time.perf_counter() - start)}
    _table("generate", [row])
    return row


# --- serve ----------------------------------------------------------------------------------------
def serve(seconds=20, clients=(1, 8, 32), work=WORK, **options):
    """Requests/s, latency percentiles and errors of `main.py serve` under 1, 8 and 32 concurrent clients
    (each sending photos of --img-path one after the other for `seconds`), with batching (--max-batch-size,
    default 16) and without it (1); against `main.py generate` run once per photo."""
    opt = _bench_data(parse(**options), work)
    checkpoint, paths = _checkpoint(opt, work), _image_paths(opt, work)[:64]
    photos = [open(path, "rb").read() for path in paths]
    rows = []
    for batch in (opt.max_batch_size, 1):
        with _server(checkpoint, batch, opt.batch_timeout, opt.max_queue) as url:
            for count in clients if isinstance(clients, (tuple, list)) else [clients]:  # --clients=1,8 or 8
                rows.append({"max_batch_size": batch, "clients": count, **_drive(url, photos, count, seconds)})
    took = []
    for path in paths[:3]:
        started = time.perf_counter()
        subprocess.run([sys.executable, "main.py", "generate", f"--img={path}", f"--model-ckpt={checkpoint}"],
                       check=True, capture_output=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        took.append(1000 * (time.perf_counter() - started))
    rows.append({"max_batch_size": "generate per photo", "clients": 1, "requests": 3,
                 "requests_per_s": 3000 / sum(took), "p50_ms": statistics.median(took), "p95_ms": max(took),
                 "p99_ms": max(took), "errors": 0, "shed_503": 0})
    _table("serve (requests/s, latency in ms)", rows)
    return rows


@contextlib.contextmanager
def _server(checkpoint, batch, timeout, queue):
    """`main.py serve` on a free loopback port while the block runs -> its address."""
    import requests
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "main.py", "serve", f"--model-ckpt={checkpoint}", f"--port={port}",
                                f"--max-batch-size={batch}", f"--batch-timeout={timeout}", f"--max-queue={queue}"],
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=os.path.dirname(os.path.abspath(__file__)),
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while not _answers(requests, f"{url}/health"):
            if process.poll() is not None or time.time() > deadline:
                sys.exit("bench serve: the server did not start")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait()


def _answers(requests, url):
    try:
        return requests.get(url, timeout=1).ok
    except requests.RequestException:
        return False


def _drive(url, photos, clients, seconds):
    """`clients` threads, each POSTing photos one after another for `seconds` -> requests/s, latency
    percentiles (ms) of the answered ones, and the count of errors and of deliberate 503s."""
    import requests
    deadline, latencies, statuses = time.perf_counter() + seconds, [], collections.Counter()

    def client(number):
        with requests.Session() as session:
            sent = number
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                answer = session.post(f"{url}/caption", data=photos[sent % len(photos)], timeout=60,
                                      headers={"content-type": "image/jpeg"})
                statuses[answer.status_code] += 1
                if answer.ok:
                    latencies.append(1000 * (time.perf_counter() - started))
                sent += clients

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    percentiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"requests": len(latencies), "requests_per_s": len(latencies) / (time.perf_counter() - started),
            "p50_ms": percentiles[49], "p95_ms": percentiles[94], "p99_ms": percentiles[98],
            "errors": sum(count for status, count in statuses.items() if status not in (200, 503)),
            "shed_503": statuses[503]}


# A child's peak memory as the kernel counts it (ru_maxrss) starts from its parent's size at fork:
# run the command from a small Python process so that only the command's own memory shows.
PEAK_OF = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def _peak_of(command):
    """Run command -> its peak resident memory in kB."""
    result = subprocess.run([sys.executable, "-c", PEAK_OF, *command], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    if result.returncode:
        sys.exit(f"bench: {' '.join(command[1:3])} failed:\n{result.stderr[-2000:]}")
    return int(result.stdout)


def _checkpoint(opt, work):
    """--model-ckpt, else a pooled model trained for an epoch now (once)."""
    if opt.model_ckpt:
        return os.path.abspath(opt.model_ckpt)
    folder = os.path.join(work, "generate")
    path = os.path.join(folder, "best.pth")
    if not os.path.isfile(path):
        subprocess.run([sys.executable, "main.py", "train", *_data_flags(opt), "--epoch=1", "--scst-epoch=0",
                        "--overwrite", "--eval-size=0", "--metric=val_loss", f"--checkpoint-dir={folder}",
                        f"--log-dir={folder}", "--vis-port=1", "--vis-timeout=0.1"], check=True, capture_output=True,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    return os.path.abspath(path)


# --- scale ----------------------------------------------------------------------------------------
def scale(images=210000, memory_limit="", batches=100, val_images=1000, work="data/scale", sentences_from="",
          features_from="", dtype="float16"):
    """Each step of the pipeline on a made-up set of `images` photos (5 captions each, recombined from real
    ones; features in the extraction's format, float16 or --dtype=int8: random, or rows of --features-from's
    caption file repeated),
    each step in its own process, under --memory-limit (e.g. 8G) when given: seconds, batches/s, the share
    of each training step spent waiting for its batch, peak memory -> printed as JSON, and in
    work/scale-N[-LIMIT].json."""
    import rehearsal
    results = rehearsal.rehearse(images, work, memory_limit, batches, val_images, sentences_from, features_from,
                                 dtype)
    path = os.path.join(work, f"scale-{images}{'-' + dtype if dtype != 'float16' else ''}"
                              f"{'-' + memory_limit if memory_limit else ''}.json")
    with open(path, "w", encoding="utf-8") as file:
        json.dump(results, file, indent=1)
    print(json.dumps(results, indent=1))
    return results


# --- data, tables, all ----------------------------------------------------------------------------
def _bench_data(opt: Config, work):
    """The options as given when they name caption data, else a demo set made (once) in work/demo."""
    if os.path.isfile(opt.caption_data_path):
        return opt
    import demo_data
    from data_preprocess import process
    from feature_extract import extract as extract_features
    folder = os.path.join(work, "demo")
    train_path, val_path = os.path.join(folder, "caption.pth"), os.path.join(folder, "caption_val.pth")
    if not os.path.isfile(images.features_path(val_path).replace(".npy", ".json")):
        demo_data.make(out=folder, num_train=400, num_val=60)
        process(annotation_file=os.path.join(folder, "train.json"), caption_data_path=train_path, min_appear=1)
        process(annotation_file=os.path.join(folder, "val.json"), caption_data_path=val_path, vocab_from=train_path)
        weights = "default" if os.path.isfile(images.weights_path("mobilenet_v2", "IMAGENET1K_V1")) else "none"
        for path in (train_path, val_path):
            extract_features(caption_data_path=path, img_path=os.path.join(folder, "images"), backbone="mobilenet_v2",
                             weights=weights, grid=7)
    return dataclasses.replace(opt, caption_data_path=train_path, val_caption_data_path=val_path,
                               img_path=os.path.join(folder, "images"))


def _data_flags(opt: Config):
    return [f"--caption-data-path={os.path.abspath(opt.caption_data_path)}",
            f"--val-caption-data-path={os.path.abspath(opt.val_caption_data_path)}",
            f"--img-path={os.path.abspath(opt.img_path)}", f"--batch-size={opt.batch_size}"]


def _image_paths(opt: Config, work):
    """The photos of the folder --img-path, in order; if neither it nor --caption-data-path is given,
    the demo set's."""
    from main import list_images
    if opt.img_path == Config.img_path:
        opt = _bench_data(opt, work)
    paths = list_images(opt.img_path) if os.path.isdir(opt.img_path) else []
    if not paths:
        raise UserError(f"--img-path={opt.img_path}: no images to bench with")
    return paths


def _table(title, rows):
    """Print rows of numbers under a title, one column per key."""
    columns = list(rows[0])
    cells = [[f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}\n" + "  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for line in cells:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))
    sys.stdout.flush()


def run_all(work=WORK, **options):
    """Every part, each timed; the numbers also go to work/bench.json."""
    results = {"date": time.strftime("%Y-%m-%d"), "device": "cuda" if torch.cuda.is_available() else "cpu",
               "threads": torch.get_num_threads(), "torch": torch.__version__, "seconds": {}}
    for name, part in (("beam", beam), ("cache", cache), ("extract", extract), ("train", train),
                       ("generate", generate)):
        start = time.perf_counter()
        results[name] = part(work=work, **options)
        results["seconds"][name] = time.perf_counter() - start
    results["generate"]["folder_vs_extraction"] = (results["generate"]["folder_images_per_s"]
                                                   / results["extract"]["pipeline_images_per_s"])
    path = os.path.join(work, "bench.json")
    with open(path, "w", encoding="utf-8") as file:
        json.dump(results, file, indent=1)
    seconds = ", ".join(f"{name} {value:.0f} s" for name, value in results["seconds"].items())
    print(f"\ngenerate on a folder / extraction: {results['generate']['folder_vs_extraction']:.2f}\n"
          f"time taken: {seconds}, {sum(results['seconds'].values()):.0f} s in all; written to {path}")


def _printing_only(function):
    """A part as a command: it prints its table; fire does not print what it returns."""
    def command(*args, **kwargs):
        function(*args, **kwargs)
    command.__doc__ = function.__doc__
    return command


if __name__ == "__main__":
    try:
        fire.Fire({name: _printing_only(function) for name, function in [
            ("all", run_all), ("beam", beam), ("cache", cache), ("extract", extract), ("train", train),
            ("generate", generate), ("serve", serve), ("scale", scale), ("train_phase", train_phase)]})
    except UserError as error:
        sys.exit(f"error: {error}")

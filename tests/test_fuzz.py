"""Property-based fuzzing of every input a user hands the toolkit, through the real command lines
(fire, in this process): option values, annotation files, images, feature files and checkpoints; and as
`python main.py ...` runs them (subprocesses, names as typed): ensembles of checkpoint names and kinds,
--output and --attention-map targets, lists of extra text files, transformer options at the edges of
their ranges, and resumed runs with a model option changed.

For each generated input a command either succeeds or exits with one line, `error: ...`, naming the
file or option; never a traceback or a hang, and the good files it would write over stay byte-identical.
The `ci` profile (the default) keeps the suite short; `HYPOTHESIS_PROFILE=long python -m pytest
tests/test_fuzz.py` runs twenty times the examples, randomised.
"""
import csv
import dataclasses
import io
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import fire
import numpy as np
import pytest
import torch
from conftest import ROOT, command_line, mobilenet_weights, options
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_decoding import ending_model

import config
import data_preprocess
import feature_extract
import main
from beam_search import caption_features
from captions import load_annotations
from config import MODEL_NAMES, MODEL_OPTIONS
from images import ImageFiles, features_path
from model import Ensemble, checksum, load_checkpoint

settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", parent=settings.get_profile("ci"), max_examples=2000, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(count):
    """The settings of a test of `count` examples in the ci profile, as many times more as the profile has."""
    return settings(max_examples=count * settings.default.max_examples // 100)

COMMANDS = {"process": data_preprocess.process, "extract": feature_extract.extract, "train": main.train,
            "generate": main.generate, "evaluate": main.evaluate}


def run(*arguments):
    """Run a command line as `python X.py ...` would -> None on success, or the one-line error it exits with."""
    try:
        fire.Fire(COMMANDS, command=list(arguments))
    except SystemExit as exit_:
        assert exit_.code not in (0, None), "a command that fails must exit with status 1"
        return one_line(str(exit_.code))
    return None


def one_line(message):
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def snapshot(*paths):
    return {path: open(path, "rb").read() for path in paths}


# --- option values -------------------------------------------------------------------------------
VALUES = st.one_of(st.text(max_size=12), st.sampled_from(["nan", "inf", "-inf", "1e309", "-1", "0", "1.9", "True",
                                                          "false", "", "[1,2]", "{a: 1}", "None", "2.0", "1e3"]),
                   st.integers(-10 ** 6, 10 ** 6).map(str), st.floats(allow_nan=True).map(repr))
recorded = []


@config.command
def probe(opt):
    """Records the options it was given."""
    recorded.append(opt)


@given(name=st.sampled_from(sorted(config.FIELDS)), value=st.one_of(st.none(), VALUES), dashed=st.booleans())
def test_any_option_value_is_accepted_within_its_range_or_refused_in_one_line(name, value, dashed):
    flag = "--" + (name.replace("_", "-") if dashed else name)
    recorded.clear()
    try:
        fire.Fire({"probe": probe}, command=["probe", flag if value is None else f"{flag}={value}"])
    except SystemExit as exit_:
        message = str(exit_.code)
        assert message.startswith(f"error: {flag}") or message.startswith(f"error: --{name.replace('_', '-')}"), \
            message
        assert "\n" not in message
        return
    [opt] = recorded
    assert config.check(dataclasses.replace(opt)) == opt  # what was accepted is within every range
    assert isinstance(getattr(opt, name), {"str": str, "int": int, "float": float, "bool": bool}[
        config.FIELDS[name].type if isinstance(config.FIELDS[name].type, str) else config.FIELDS[name].type.__name__])


# --- annotation files ----------------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=4), max_leaves=12)
CAPTIONS = st.lists(st.text(max_size=12) | st.sampled_from(["一个男人在骑马。", "。"]), max_size=5) | JSON


def annotation_files(image_ids):
    """Annotation file contents: entries with these image ids (or any text), any JSON, any bytes."""
    entry = st.fixed_dictionaries({"image_id": st.text(max_size=10) | st.sampled_from(image_ids),
                                   "caption": CAPTIONS})
    return st.one_of(
        st.lists(entry, max_size=5).map(lambda entries: json.dumps(entries, ensure_ascii=False).encode("utf-8")),
        JSON.map(lambda value: json.dumps(value).encode()),
        st.binary(max_size=200),
    )


ANNOTATIONS = annotation_files(["a.jpg", "../x.jpg", "/etc/p"])


@given(content=ANNOTATIONS, bom=st.booleans())
def test_any_annotation_file_is_encoded_or_refused_without_touching_the_output(demo, tmp_path_factory, content, bom):
    folder = tmp_path_factory.mktemp("annotations")
    annotations, output = str(folder / "a.json"), str(folder / "caption.pth")
    open(annotations, "wb").write((b"\xef\xbb\xbf" if bom else b"") + content)
    shutil.copy(demo.caption_data_path, output)
    before = snapshot(annotations, output)
    error = run("process", f"--annotation-file={annotations}", f"--caption-data-path={output}", "--min-appear=1")
    if error:
        assert "a.json" in error, error
        assert snapshot(annotations, output) == before
    else:
        assert snapshot(annotations) == {annotations: before[annotations]}
        data = torch.load(output, weights_only=True)
        assert data["ix2id"] and all(captions for captions in data["caption"])



EXTRA_TEXT = annotation_files(["val_0000.jpg", "val_0001.jpg", "train_0000.jpg"])


@given(content=EXTRA_TEXT)
def test_any_extra_text_is_added_or_refused_and_never_changes_the_references(demo, tmp_path_factory, content):
    """The references: the same images, sentences and (every word being known at --min-appear=1)
    captions as without the extra text."""
    folder = tmp_path_factory.mktemp("extra")
    annotations = os.path.join(os.path.dirname(demo.caption_data_path), "val.json")
    extra, output, alone = str(folder / "x.json"), str(folder / "caption.pth"), str(folder / "alone.pth")
    open(extra, "wb").write(content)
    shutil.copy(demo.caption_data_path, output)
    before = snapshot(output)
    error = run("process", f"--annotation-file={annotations}", f"--extra-annotation-file={extra}",
                f"--caption-data-path={output}", "--min-appear=1")
    if error:
        assert "x.json" in error, error
        assert snapshot(output) == before
        return
    assert run("process", f"--annotation-file={annotations}", f"--caption-data-path={alone}", "--min-appear=1") is None
    data, without = (torch.load(path, weights_only=True) for path in (output, alone))
    assert data["ix2id"] == without["ix2id"] and data["sentences"] == without["sentences"]
    assert [[[data["ix2word"][ix] for ix in caption] for caption in row] for row in data["caption"]] == [
        [[without["ix2word"][ix] for ix in caption] for caption in row] for row in without["caption"]]
    assert len(data["extra_caption"]) == len(data["ix2id"]) and any(data["extra_caption"])

# --- images --------------------------------------------------------------------------------------
@st.composite
def image_files(draw):
    """Bytes of an image file: any mode, size (strips included), format, perhaps cut short; or noise."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1", "I;16", "I", "F", "CMYK", "LA"]))
    size = draw(st.sampled_from([(1, 1), (1, 60000), (60000, 1), (2, 7000)]) |
                st.tuples(st.integers(1, 400), st.integers(1, 400)))
    image = Image.new(mode, size, draw(st.integers(0, 255)))
    kind = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]))
    buffer = io.BytesIO()
    try:
        image.save(buffer, kind)
    except (OSError, ValueError, KeyError):  # a mode this format cannot store
        image.convert("RGB").save(buffer, "PNG")
    data = buffer.getvalue()
    return data[:draw(st.integers(0, len(data)))] if draw(st.booleans()) else data


@given(data=image_files(), backbone=st.sampled_from(["mobilenet_v2", "efficientnet_lite2"]))
def test_any_image_file_gives_pixels_or_an_error_never_an_exception(tmp_path_factory, data, backbone):
    path = tmp_path_factory.mktemp("image") / "photo.jpg"
    path.write_bytes(data)
    pixels, error = ImageFiles([str(path)], backbone)[0]
    size = 260 if backbone == "efficientnet_lite2" else 224
    assert pixels.shape == (size, size, 3) and pixels.dtype == torch.uint8
    assert isinstance(error, str) and "\n" not in error


# --- feature files -------------------------------------------------------------------------------
DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.bool_, np.complex64, np.uint8])
NEAR = {"rows": st.just(120) | st.sampled_from([0, 1, 119, 121]),  # half of them what extraction writes
        "shape": st.just((1280,)) | st.sampled_from([(), (7, 1280), (1, 2, 3), (1281,)])}
ARRAYS = st.builds(lambda dtype, rows, shape: np.ones((rows, *shape), dtype=dtype), DTYPES, NEAR["rows"],
                   NEAR["shape"])
META_KEYS = ["backbone", "weights", "num_images", "feature_dim", "grid", "img_path", "image_ids_sha1", "bad"]


@st.composite
def feature_damage(draw):
    """(what to write as the .npy: an array, bytes, 'truncate' or None to keep it; as the .json: JSON,
    bytes, a (key, new value or KeyError) change, or None to keep it); one of them or both."""
    which = draw(st.sampled_from(["npy", "meta", "both"]))
    npy = draw(ARRAYS | st.binary(max_size=200) | st.just("truncate")) if which != "meta" else None
    meta = draw(st.tuples(st.sampled_from(META_KEYS), st.just(KeyError) | JSON) | st.binary(max_size=100) | JSON
                ) if which != "npy" else None
    return npy, meta


def damage_features(path, npy, meta):
    meta_path = path.replace(".npy", ".json")
    if isinstance(npy, np.ndarray):
        np.save(path, npy)
    elif npy == "truncate":
        os.truncate(path, os.path.getsize(path) // 3)
    elif npy is not None:
        open(path, "wb").write(npy)
    if isinstance(meta, tuple):
        saved = json.load(open(meta_path))
        key, value = meta
        saved.pop(key) if value is KeyError else saved.update({key: value})
        json.dump(saved, open(meta_path, "w"))
    elif isinstance(meta, bytes):
        open(meta_path, "wb").write(meta)
    elif meta is not None:
        json.dump(meta, open(meta_path, "w"))


@given(damage=feature_damage())
def test_any_damaged_feature_file_is_refused_in_one_line(demo, tmp_path_factory, damage):
    folder = tmp_path_factory.mktemp("features")
    caption = str(folder / "caption.pth")
    shutil.copy(demo.caption_data_path, caption)
    for suffix in (".npy", ".json"):
        shutil.copy(features_path(demo.caption_data_path).replace(".npy", suffix),
                    features_path(caption).replace(".npy", suffix))
    damage_features(features_path(caption), *damage)
    error = run("train", f"--caption-data-path={caption}", "--epoch=0", "--scst-epoch=0", "--eval-size=0",
                "--metric=val_loss", f"--checkpoint-dir={folder / 'checkpoints'}", f"--log-dir={folder / 'logs'}",
                "--vis-port=1", "--vis-timeout=0.1")
    if error:
        assert "caption" in error, error
    else:  # accepted: what was written is what training can read
        features = np.load(features_path(caption))
        assert features.dtype in (np.float16, np.float32) and features.shape == (120, 1280)


# --- checkpoints ---------------------------------------------------------------------------------
TENSORS = st.builds(lambda dtype, shape, fill: torch.full(shape, fill).to(dtype),
                    st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.bool]),
                    st.sampled_from([(), (3,), (2, 2)]), st.sampled_from([0.0, 1.0, float("nan"), float("inf")]))


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-trained")
    main.train(**options(demo, folder, epoch=1, eval_size=0, metric="val_loss"))
    return torch.load(folder / "checkpoints" / "last.pth", weights_only=True)


@given(data=st.data())
def test_any_damaged_checkpoint_captions_or_is_refused_in_one_line(demo, trained, tmp_path_factory, capsys, data):
    checkpoint = {key: dict(value) if isinstance(value, dict) else value for key, value in trained.items()}
    checkpoint["ix2word"] = list(trained["ix2word"])
    place = data.draw(st.sampled_from(["", "config", "feature", "model"]))
    target = checkpoint[place] if place else checkpoint
    key = data.draw(st.sampled_from(sorted(target)))
    value = data.draw(st.just(KeyError) | st.none() | JSON | TENSORS)
    if value is KeyError:
        del target[key]
    else:
        target[key] = value
    path = tmp_path_factory.mktemp("checkpoint") / "damaged.pth"
    torch.save(checkpoint, path)
    capsys.readouterr()
    error = run("generate", f"--img={os.path.join(demo.img_path, 'val_0001.jpg')}", f"--model-ckpt={path}",
                "--num-workers=0")
    if error:
        assert "damaged.pth" in error, error
    else:
        [line] = capsys.readouterr().out.splitlines()
        assert line.split("\t")[1]  # a caption, never an empty one


# --- command lines: ensembles, extra text, transformer options, resume ---------------------------
# These run as `python main.py ...` runs them (names as typed: fire alone reads --model-ckpt=1,2 as two
# numbers), each in a fork of a Python that imported the toolkit once (a new one spends seconds on
# importing torch). The child ends as the interpreter does: sys.exit's message on stderr, status 1; a
# traceback, status 1; only the teardown of torch's modules (another second) is skipped.
SERVER = r"""
import atexit, json, os, runpy, sys, traceback
sys.path[0] = sys.argv[1]
import data_preprocess, feature_extract, main, trainer, visualize  # what the commands import, once
while request := sys.stdin.readline():
    argv, cwd, out, err = json.loads(request)
    child = os.fork()
    if not child:
        break
    print(child, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), flush=True)
else:
    sys.exit()
os.chdir(cwd)
for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY | os.O_CREAT),
                        (2, err, os.O_WRONLY | os.O_CREAT)):
    os.dup2(os.open(path, flags), fd)
sys.argv = argv
try:
    runpy.run_path(argv[0], run_name="__main__")
    status = 0
except SystemExit as stop:
    status = stop.code or 0
    if not isinstance(status, int):
        print(status, file=sys.stderr)
        status = 1
except BaseException:
    traceback.print_exc()
    status = 1
atexit._run_exitfuncs()
sys.stdout.flush()
sys.stderr.flush()
os._exit(status)
"""
HANG = 300  # seconds after which a command counts as hung (the slowest here takes seconds)


class CommandLines:
    """`python SCRIPT ARGUMENTS` in a folder, through the command server above."""

    def __init__(self, folder):
        self.folder, self.count, self.pending = folder, 0, b""
        self.server = subprocess.Popen([sys.executable, "-c", SERVER, ROOT], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE)

    def __call__(self, script, *arguments, cwd):
        """-> (exit status, stdout, stderr); a command still running after HANG seconds is killed and fails the test."""
        self.count += 1
        out, err = (os.path.join(self.folder, f"{self.count}.{stream}") for stream in ("out", "err"))
        request = [[os.path.join(ROOT, script), *arguments], str(cwd), out, err]
        self.server.stdin.write(json.dumps(request).encode() + b"\n")
        self.server.stdin.flush()
        child, status = int(self._line()), self._line(HANG)
        if status is None:
            os.kill(child, signal.SIGKILL)
            self._line()
            pytest.fail(f"hung: {script} {' '.join(arguments)} still ran after {HANG} s")
        return int(status), *(open(path, encoding="utf-8", errors="replace").read() for path in (out, err))

    def outcome(self, script, *arguments, cwd):
        """Run a command line and check what every command keeps to: exit status 0 or 1, no traceback,
        and on failure one line `error: ...` on stderr, its last -> (None or that line, stdout)."""
        status, out, err = self(script, *arguments, cwd=cwd)
        lines = err.splitlines()
        assert status in (0, 1) and "Traceback (most recent call last)" not in err, err[-3000:]
        assert [line for line in lines if line.startswith("error:")] == (lines[-1:] if status else []), err[-3000:]
        return one_line(lines[-1]) if status else None, out

    def _line(self, timeout=None):
        while b"\n" not in self.pending:
            if not select.select([self.server.stdout], [], [], timeout)[0]:
                return None
            chunk = os.read(self.server.stdout.fileno(), 4096)
            assert chunk, "the command server ended"
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode()


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    lines = CommandLines(tmp_path_factory.mktemp("command-lines"))
    yield lines
    lines.server.stdin.close()
    lines.server.wait(timeout=60)


@pytest.mark.parametrize("script, arguments", [("main.py", ["generate", "--img=x.jpg", "--model-ckpt=1,2"]),
                                               ("boom.py", [])])
def test_the_command_server_ends_a_command_as_python_does(shell, tmp_path, script, arguments):
    (tmp_path / "boom.py").write_text("import sys\nprint('out')\nraise ValueError(sys.argv)\n")
    path = os.path.join(ROOT if script == "main.py" else tmp_path, script)
    real = subprocess.run([sys.executable, path, *arguments], cwd=tmp_path, capture_output=True, text=True,
                          timeout=HANG)
    status, out, err = shell(path, *arguments, cwd=tmp_path)
    assert (status, out, err.splitlines()[-1]) == (real.returncode, real.stdout, real.stderr.splitlines()[-1])
    assert status == 1 and ("Traceback" in err) == ("Traceback" in real.stderr) == (script == "boom.py")


def tree(folder):
    """Every file under folder -> its bytes."""
    return snapshot(*(str(path) for path in Path(folder).rglob("*") if path.is_file()))


def all_load(folder):
    """Every checkpoint file in folder loads as one."""
    for path in Path(folder).glob("*.pth"):
        if path.is_file():
            load_checkpoint(str(path))


# File names as typed: numbers fire would read as such, commas (--model-ckpt's list separator), Chinese.
FILE_NAMES = (st.sampled_from(["1", "2", "007", "1,2", "a,b", "2,1", "1e3", "-1", "nan", "True", "模型.pth"])
              | st.text(st.sampled_from("12ab,.-_"), min_size=1, max_size=4)).filter(
    lambda name: name not in (".", ".."))
SMALL_RUN = {"epoch": 1, "eval_size": 0, "metric": "val_loss", "num_workers": 0, "model": "transformer", "d_model": 16,
             "heads": 2, "transformer_layers": 1}


def small_run(demo, small, folder, **changes):
    """The options of a one-epoch run on the small data set (validated on itself), its files under folder."""
    return options(demo, Path(folder), caption_data_path=small, val_caption_data_path=small, **{**SMALL_RUN, **changes})


@pytest.fixture(scope="module")
def small(demo, tmp_path_factory):
    """8 of the demo's training images in its vocabulary, with 7x7 region features: the caption .pth."""
    folder = tmp_path_factory.mktemp("small")
    entries = json.load(open(os.path.join(os.path.dirname(demo.caption_data_path), "train.json"), encoding="utf-8"))
    (folder / "small.json").write_text(json.dumps(entries[:8], ensure_ascii=False), encoding="utf-8")
    data = str(folder / "small.pth")
    assert run("process", f"--annotation-file={folder / 'small.json'}", f"--caption-data-path={data}",
               f"--vocab-from={demo.caption_data_path}") is None
    assert run("extract", f"--caption-data-path={data}", f"--img-path={demo.img_path}", "--backbone=mobilenet_v2",
               f"--weights={mobilenet_weights()}", "--num-workers=0", "--grid=7") is None
    return data


@pytest.fixture(scope="module")
def resumable(demo, small, tmp_path_factory):
    """A folder holding the checkpoints of a one-epoch transformer run on the small data (small_run's)."""
    folder = tmp_path_factory.mktemp("resumable")
    main.train(**small_run(demo, small, folder))
    return folder / "checkpoints"


@pytest.fixture(scope="module")
def checkpoint_files(demo, trained, small, resumable, tmp_path_factory):
    """A folder holding a file of each kind a checkpoint name may hold, named by the kind: each model's
    checkpoint (one vocabulary), one of another vocabulary, region models whose features say grid 0
    (written so, checksum and all), files that are no checkpoint."""
    folder = tmp_path_factory.mktemp("checkpoint-files")
    main.train(**small_run(demo, small, folder, model="attention", embedding_dim=16, hidden_size=32, attention_dim=16))
    attention, transformer = (torch.load(path / "best.pth", weights_only=True)
                              for path in (folder / "checkpoints", resumable))

    def save(kind, checkpoint, **changes):
        changed = {**checkpoint, **changes}
        torch.save({**changed, "checksum": checksum(changed)}, folder / kind)

    def grid_0(checkpoint):
        return {"feature": {**checkpoint["feature"], "grid": 0}}

    words = list(trained["ix2word"])
    words[-2:] = words[-1], words[-2]
    for kind, checkpoint, changes in (
            ("pooled", trained, {}), ("attention", attention, {}), ("transformer", transformer, {}),
            ("another vocabulary", trained, {"ix2word": words}), ("attention, grid 0", attention, grid_0(attention)),
            ("transformer, grid 0", transformer, grid_0(transformer))):
        save(kind, checkpoint, **changes)
    for kind, data in (("JSON", b'{"model": {}}'), ("empty", b""), ("noise", bytes(range(256)) * 4),
                       ("a photo", open(os.path.join(demo.img_path, "val_0001.jpg"), "rb").read())):
        (folder / kind).write_bytes(data)
    return folder


LOADABLE = ("pooled", "attention", "transformer", "another vocabulary")
NOT_TORCH = "not a file this toolkit wrote"
REFUSED = {"attention, grid 0": "(grid 0)", "transformer, grid 0": "(grid 0)", "JSON": NOT_TORCH, "a photo": NOT_TORCH,
           "empty": NOT_TORCH, "noise": "not a PyTorch file", "a folder": "not a regular file",
           "missing": "no such checkpoint"}


def place(path, kind, kinds):
    """Put at path a file of this kind: "a folder", "missing" or "new" (nothing), else a copy of the file
    kinds/KIND (checkpoint_files')."""
    if kind == "a folder":
        os.makedirs(path)
    elif kind not in ("missing", "new"):
        shutil.copy(Path(kinds) / kind, path)


def kind_of(files, part):
    """The kind of file a part of a comma-separated list names: files[part], a folder for . and .., or none."""
    return files.get(part, "a folder" if part in (".", "..") else "missing")


def ensemble_refusal(files, listed):
    """(what generate's error starts with, why) for --model-ckpt=LISTED, or None where it captions. The
    list is cut at every comma, those inside a name too: a part that is no file is a missing checkpoint."""
    parts = [part.strip() for part in ",".join(listed).split(",")]
    if "" in parts:
        return "--model-ckpt", "an empty checkpoint name"
    for part in parts:
        kind = kind_of(files, part)
        if kind in REFUSED:
            return f"{part}: ", REFUSED[kind]
        if (kind == "another vocabulary") != (files.get(parts[0]) == "another vocabulary"):
            return f"{part} and {parts[0]}: ", "their vocabularies differ"
    return None


# names of files of these kinds (checkpoints twice as often), and the --model-ckpt list of 2-3 of them (one
# may come twice)
ENSEMBLES = st.dictionaries(FILE_NAMES, st.sampled_from(LOADABLE * 2 + tuple(REFUSED)), min_size=1,
                            max_size=3).flatmap(lambda files: st.tuples(st.just(files), st.lists(
                                st.sampled_from(sorted(files)), min_size=2, max_size=3)))


@examples(30)
@given(case=ENSEMBLES)
@example(case=({"1": "pooled", "2": "transformer"}, ["1", "2"]))  # names fire reads as numbers
@example(case=({"1": "attention", "2": "another vocabulary"}, ["1", "2", "1"]))
@example(case=({"a,b": "pooled", "a": "attention"}, ["a,b", "a"]))  # b: missing
@example(case=({"7": "transformer", "8": "transformer, grid 0", "9": "pooled"}, ["7", "9", "8"]))
def test_any_ensemble_of_checkpoint_names_captions_or_is_refused_in_one_line(demo, shell, checkpoint_files,
                                                                              tmp_path_factory, case):
    files, listed = case
    folder = tmp_path_factory.mktemp("ensemble")
    for name, kind in files.items():
        place(folder / name, kind, checkpoint_files)
    before, photo = tree(folder), os.path.join(demo.img_path, "val_0001.jpg")
    error, out = shell.outcome("main.py", "generate", f"--img={photo}", f"--model-ckpt={','.join(listed)}",
                               "--num-workers=0", cwd=folder)
    assert tree(folder) == before
    refusal = ensemble_refusal(files, listed)
    if refusal:
        assert error and error.startswith(f"error: {refusal[0]}") and refusal[1] in error, (refusal, error)
    else:
        assert error is None
        [(path, caption)] = [line.split("\t") for line in out.splitlines()]
        assert path == photo and caption


# the photos of --img: their files, and --img
PHOTOS = {"one photo": (["{}.jpg"], "photos/{}.jpg"), "p.jpg and p.png": (["{}.jpg", "{}.png"], "photos"),
          "p.jpg in two folders": (["x/{}.jpg", "y/{}.jpg"], "photos/*/{}.jpg")}
TARGETS = st.fixed_dictionaries({
    "models": st.lists(st.sampled_from(["pooled", "attention", "transformer"]), min_size=1, max_size=2),
    "photos": st.sampled_from(sorted(PHOTOS)), "stem": st.sampled_from(["p", "1", "a,b", "007"]),
    "output": st.sampled_from([None, "new", "existing", "a folder", "the map folder", "a checkpoint", "a photo"]),
    "maps": st.sampled_from([None, "new", "holding maps", "a file", "a map is a folder"]),
    "names": st.tuples(FILE_NAMES, FILE_NAMES).filter(lambda names: len(set(names)) == 2)})  # --output's, the maps'


def target(models, photos, output, maps):
    """A case of TARGETS, named plainly."""
    return dict(models=models, photos=photos, stem="p", output=output, maps=maps, names=["r.json", "maps"])


def target_refusals(case):
    """What generate must refuse a case of TARGETS for (any of these in its error); [] where it captions."""
    output, maps = case["output"], case["maps"]
    reasons = {"a folder": ["is a folder"], "a checkpoint": ["is also an input"], "a photo": ["is also an input"],
               "the map folder": ["one path for a file" if maps in ("new", "a file") else "is a folder"] if maps else []
               }.get(output, [])
    reasons += {"a file": ["must be a folder"], "a map is a folder": ["is a folder; the attention map"]}.get(maps, [])
    reasons += ["would have one image_id"] if output and case["photos"] == "p.jpg in two folders" else []
    return reasons + (["no attention to show"] if maps and set(case["models"]) == {"pooled"} else [])


@examples(35)
@given(case=TARGETS)
@example(case=target(["attention"], "p.jpg and p.png", None, "holding maps"))
@example(case=target(["pooled"], "one photo", "existing", "new"))
@example(case=target(["transformer", "pooled"], "p.jpg in two folders", "new", "new"))
@example(case=target(["pooled"], "p.jpg and p.png", "a photo", None))
def test_outputs_and_attention_maps_are_written_one_per_photo_or_refused_before_any_is(
        demo, shell, checkpoint_files, tmp_path_factory, case):
    folder = tmp_path_factory.mktemp("targets")
    names, img = PHOTOS[case["photos"]]
    photos = [os.path.join("photos", name.format(case["stem"])) for name in names]
    for path in photos:
        os.makedirs(folder / os.path.dirname(path), exist_ok=True)
        Image.open(os.path.join(demo.img_path, "val_0001.jpg")).save(folder / path)
    models = [os.path.join("models", f"{kind}.pth") for kind in case["models"]]
    os.makedirs(folder / "models")
    for path, kind in zip(models, case["models"]):
        place(folder / path, kind, checkpoint_files)
    output, maps = case["names"]
    output = {"the map folder": maps, "a checkpoint": models[0], "a photo": photos[0]}.get(case["output"], output)
    place(folder / output, {"existing": "JSON", "a folder": "a folder"}.get(case["output"], "new"), checkpoint_files)
    place(folder / maps, {"holding maps": "a folder", "a file": "JSON"}.get(case["maps"], "new"), checkpoint_files)
    for name in [case["stem"], "other"] if case["maps"] == "holding maps" else []:
        place(folder / maps / f"{name}.attention.png", "a photo", checkpoint_files)
    if case["maps"] == "a map is a folder":
        os.makedirs(folder / maps / f"{case['stem']}.attention.png")
    before = tree(folder)
    error, out = shell.outcome("main.py", "generate", f"--img={img.format(case['stem'])}",
                               f"--model-ckpt={','.join(models)}", "--num-workers=0",
                               *([f"--output={output}"] if case["output"] else []),
                               *([f"--attention-map={maps}"] if case["maps"] else []), cwd=folder)
    after, reasons = tree(folder), target_refusals(case)
    if reasons:
        assert error and any(reason in error for reason in reasons), (reasons, error)
        assert after == before  # nothing written, nothing changed
        return
    assert error is None
    captions = [line.split("\t") for line in out.splitlines()]
    assert [path for path, _ in captions] == photos and all(caption for _, caption in captions)
    if case["output"]:
        results = json.load(open(folder / output, encoding="utf-8"))
        assert sorted(entry["image_id"] for entry in results) == sorted(os.path.basename(path) for path in photos)
    written = {path for path in after if after[path] != before.get(path)}
    drawn = {path for path in written if case["maps"] and Path(path).parent == folder / maps}
    assert written - drawn == ({str(folder / output)} if case["output"] else set())  # the others kept their bytes
    assert len(drawn) == len(photos) * bool(case["maps"])  # a map per photo, none over another
    assert all(Image.open(path).format == "PNG" for path in drawn)


# An extra file's kind: more captions of the annotation file's images, any content, none, a folder, or the
# annotation file itself under one of its names (a symbolic and a hard link beside it).
EXTRA_KINDS = ("more captions", "more captions", "any content", "missing", "a folder", "the annotation file")
SAME_FILE = ("val.json", "./val.json", "ABSOLUTE/val.json", "link.json", "hard.json")
MORE_CAPTIONS = json.dumps([{"image_id": "val_0001.jpg", "caption": ["两条小狗在草地上奔跑。"]}], ensure_ascii=False)


@st.composite
def extra_files(draw):
    """[(name, kind, content)] of 1-3 extra files, and what --caption-data-path is."""
    files = []
    for name, kind in draw(st.lists(st.tuples(FILE_NAMES, st.sampled_from(EXTRA_KINDS)), min_size=1, max_size=3,
                                    unique_by=lambda file: file[0])):
        name = draw(st.sampled_from(SAME_FILE)) if kind == "the annotation file" else name
        files.append((name, kind, draw(EXTRA_TEXT) if kind == "any content" else MORE_CAPTIONS.encode()))
    return files, draw(st.sampled_from(["new", "new", "existing", "the annotation file", "a folder"]))


def extra_text_errors(parts, files, output):
    """What process may end with for --extra-annotation-file=PARTS: ([(the start of its error, why)], whether
    it may succeed instead). A file of any content may be refused, named first, or not."""
    if "" in parts:
        return [("--extra-annotation-file", "an empty file name")], False
    same = [part for part in parts if files.get(part) == "the annotation file"]
    if same:
        return [(f"--extra-annotation-file={same[0]}", "is --annotation-file itself")], False
    if output in ("a folder", "the annotation file"):
        return [{"a folder": ("caption.pth: ", "is a folder"), "the annotation file": ("val.json: ", "an input")}[
            output]], False
    errors = []
    for part in parts:
        kind = kind_of(files, part)
        if kind in ("missing", "a folder"):
            return errors + [(f"{part}: ", {"missing": "no such", "a folder": "not a regular file"}[kind])], False
        errors += [(f"{part}: ", "")] if kind == "any content" else []
    return errors, True


@examples(40)
@given(case=extra_files())
@example(case=([("1", "more captions", MORE_CAPTIONS.encode()), ("2", "more captions", MORE_CAPTIONS.encode())], "new"))
@example(case=([("1", "more captions", MORE_CAPTIONS.encode()), ("hard.json", "the annotation file", b"")], "new"))
def test_any_list_of_extra_text_files_is_added_or_refused_in_one_line(demo, shell, tmp_path_factory, case):
    files, output = case
    folder = tmp_path_factory.mktemp("extra-files")
    shutil.copy(demo.annotation_file, folder / "val.json")
    os.symlink("val.json", folder / "link.json")
    os.link(folder / "val.json", folder / "hard.json")
    kinds = {name.replace("ABSOLUTE", str(folder)): "the annotation file" for name in SAME_FILE}
    for name, kind, content in files:
        if kind != "the annotation file":
            kinds[name] = kind
            if kind in ("missing", "a folder"):
                place(folder / name, kind, None)
            else:
                (folder / name).write_bytes(content)
    caption = "val.json" if output == "the annotation file" else "caption.pth"
    if output == "existing":
        shutil.copy(demo.caption_data_path, folder / caption)
    elif output == "a folder":
        os.makedirs(folder / caption)
    names = [name.replace("ABSOLUTE", str(folder)) for name, _, _ in files]
    before = tree(folder)
    error, _ = shell.outcome("data_preprocess.py", "process", "--annotation-file=val.json",
                             f"--extra-annotation-file={','.join(names)}", f"--caption-data-path={caption}",
                             "--min-appear=1", cwd=folder)
    errors, may_succeed = extra_text_errors([part.strip() for part in ",".join(names).split(",")], kinds, output)
    if error:
        assert any(error.startswith(f"error: {start}") and why in error for start, why in errors), (errors, error)
        assert tree(folder) == before
        return
    assert may_succeed, errors
    encoded, alone = (torch.load(path, weights_only=True) for path in (folder / caption, demo.val_caption_data_path))
    assert encoded["ix2id"] == alone["ix2id"] and encoded["sentences"] == alone["sentences"]
    assert any(encoded["extra_caption"])
    after = tree(folder)
    assert {path for path in after if after[path] != before.get(path)} == {str(folder / caption)}


# Transformer options at the edges of their ranges (heads that do not divide the width among them), and
# in half of the cases one past an edge. 4096 wide only with 24 layers, which no memory here holds with
# Adam's state: a model that fits would train for minutes.
INSIDE = {"d_model": [8, 16, 4096], "heads": [1, 2, 3, 8, 64], "transformer_layers": [1, 2, 24],
          "dropout": [0.0, 0.999]}
OUTSIDE = {"d_model": [7, 4097], "heads": [0, 65], "transformer_layers": [0, 25], "dropout": [-0.1, 1.0]}


@st.composite
def transformer_edges(draw):
    edges = {name: draw(st.sampled_from(values)) for name, values in INSIDE.items()}
    past = draw(st.sampled_from([None] * len(OUTSIDE) + sorted(OUTSIDE)))
    if past:
        edges[past] = draw(st.sampled_from(OUTSIDE[past]))
    assume(edges["d_model"] != 4096 or edges["transformer_layers"] == 24)
    return edges


CHECKPOINT_DIRS = ("new", "new", "a file", "last.pth is a folder", "best.pth is a folder")


def transformer_refusal(edges, checkpoint_dir):
    """What train must refuse these options for (in its error), in the order it checks; None where it trains."""
    within = {"dropout": 0 <= edges["dropout"] < 1, "d_model": 8 <= edges["d_model"] <= 4096,
              "heads": 1 <= edges["heads"] <= 64, "transformer_layers": 1 <= edges["transformer_layers"] <= 24}
    outside = [name for name, inside in within.items() if not inside]  # in the order config checks them
    if outside:
        return f"--{outside[0].replace('_', '-')}="
    if edges["d_model"] % edges["heads"]:
        return "does not divide"
    if checkpoint_dir == "a file":
        return "must be a folder"
    if edges["d_model"] == 4096:
        return "choose smaller sizes"
    return {"last.pth is a folder": "last.pth", "best.pth is a folder": "best.pth"}.get(checkpoint_dir)


@examples(20)
@given(edges=transformer_edges(), checkpoint_dir=st.sampled_from(CHECKPOINT_DIRS))
@example(edges={"d_model": 4096, "heads": 64, "transformer_layers": 24, "dropout": 0.0}, checkpoint_dir="new")
@example(edges={"d_model": 8, "heads": 8, "transformer_layers": 2, "dropout": 0.999}, checkpoint_dir="new")
def test_transformer_options_at_their_edges_train_or_are_refused_in_one_line(demo, shell, small, tmp_path_factory,
                                                                            edges, checkpoint_dir):
    folder = tmp_path_factory.mktemp("transformer")
    checkpoints = folder / "checkpoints"
    if checkpoint_dir == "a file":
        checkpoints.write_bytes(b"")
    elif checkpoint_dir != "new":
        os.makedirs(checkpoints / checkpoint_dir.split()[0])  # last.pth or best.pth
    before = tree(folder)
    error, _ = shell.outcome("main.py", "train", *command_line(small_run(demo, small, folder, overwrite=True, **edges)),
                             cwd=folder)
    refusal = transformer_refusal(edges, checkpoint_dir)
    if refusal:
        assert error and refusal in error, (refusal, error)
    else:
        assert error is None
        saved = load_checkpoint(str(checkpoints / "best.pth"))["config"]
        assert {name: saved[name] for name in edges} == edges
    if checkpoints.is_dir():
        all_load(checkpoints)
    after = tree(folder)
    assert {path: after.get(path) for path in before} == before


# Each model option changed to another value of its range (or kept) when a run is resumed.
CHANGES = {"model": st.sampled_from(MODEL_NAMES), "embedding_dim": st.sampled_from([1, 64, 65536]),
           "hidden_size": st.sampled_from([1, 128, 200]), "num_layers": st.integers(1, 3),
           "dropout": st.sampled_from([0.0, 0.3, 0.5]), "attention_dim": st.sampled_from([1, 512, 513]),
           "alpha_c": st.sampled_from([0.0, 1.0, 2.5]), "d_model": st.sampled_from([8, 16, 32, 64]),
           "heads": st.integers(1, 64), "transformer_layers": st.integers(1, 24), "max_caption_len": st.integers(1, 60)}
assert set(CHANGES) == set(MODEL_OPTIONS)


@examples(25)
@given(change=st.none() | st.sampled_from(sorted(MODEL_OPTIONS)).flatmap(
    lambda name: st.tuples(st.just(name), CHANGES[name])))
@example(change=("heads", 4))
@example(change=("dropout", 0.5))
def test_resuming_with_any_model_option_changed_is_refused_in_one_line(demo, shell, small, resumable,
                                                                      tmp_path_factory, change):
    folder = tmp_path_factory.mktemp("resume")
    shutil.copytree(resumable, folder / "checkpoints")
    before = tree(folder)
    run_options = small_run(demo, small, folder, epoch=2, resume=True)
    error, _ = shell.outcome("main.py", "train", *command_line({**run_options, **dict([change] if change else [])}),
                             cwd=folder)
    all_load(folder / "checkpoints")
    if change and change[1] != run_options[change[0]]:
        assert error and error.startswith(f"error: --{change[0].replace('_', '-')}="), (change, error)
        assert tree(folder) == before
    else:
        assert error is None
        assert load_checkpoint(str(folder / "checkpoints" / "last.pth"))["state"]["epoch"] == 2


# --- caption files in every format, and decoding options over their whole float range ----------------
NAMES = st.from_regex(r"[a-z0-9_]{1,8}\.jpg", fullmatch=True)
SENTENCES = st.text(st.sampled_from("一只狗在草地上跑，。男人骑车的 ,\"'#ab1"), min_size=1, max_size=12).filter(
    lambda text: text == text.strip())
CAPTIONED = st.dictionaries(NAMES, st.lists(SENTENCES, min_size=1, max_size=3), min_size=1, max_size=5)


def written(captions, kind):
    """{image: [caption]} written as a caption file of `kind` -> its text."""
    if kind == "ai challenger":
        return json.dumps([{"image_id": i, "caption": c} for i, c in captions.items()], ensure_ascii=False)
    if kind == "coco":
        ids = {image: number for number, image in enumerate(captions)}
        return json.dumps({"images": [{"id": ids[i], "file_name": i} for i in captions],
                           "annotations": [{"image_id": ids[i], "caption": c} for i in captions for c in captions[i]]},
                          ensure_ascii=False)
    if kind == "karpathy":
        return json.dumps({"images": [{"filename": i, "split": "train", "sentences": [{"raw": c} for c in cs]}
                                      for i, cs in captions.items()]}, ensure_ascii=False)
    if kind == "caption lines":
        return "".join(f"{i}#{n} {c}\n" for i, cs in captions.items() for n, c in enumerate(cs))
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t" if kind == "tsv" else ",")
    writer.writerow(["image", "caption"])
    writer.writerows([i, c] for i, cs in captions.items() for c in cs)
    return buffer.getvalue()


@st.composite
def caption_files(draw):
    """(bytes of a caption file of any format, the entries it holds or None where it was damaged): any
    encoding, line ends, blank lines, a header repeated mid-file, random bytes inside its structure."""
    captions, kind = draw(CAPTIONED), draw(st.sampled_from(["ai challenger", "coco", "karpathy", "caption lines",
                                                             "csv", "tsv"]))
    text = written(captions, kind)
    if kind in ("caption lines", "csv", "tsv"):
        lines = text.splitlines(keepends=True)
        if kind != "caption lines" and draw(st.booleans()):  # files joined with cat: the header again
            lines.insert(draw(st.integers(1, len(lines))), lines[0])
        text = "\n" * draw(st.integers(0, 2)) + "".join(lines)
        if draw(st.booleans()):
            text = text.replace("\n", "\r\n")
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "gbk", "utf-16"]))
    content = text.encode(encoding, errors="replace")
    expected = [{"image_id": i, "caption": c} for i, c in captions.items()]
    if content != text.encode("utf-8") and encoding != "utf-8-sig":
        expected = None  # another encoding: refused, unless its bytes are UTF-8's
    if draw(st.booleans()):
        at = draw(st.integers(0, len(content)))
        content, expected = content[:at] + draw(st.binary(min_size=1, max_size=6)) + content[at:], None
    return content, expected


@examples(150)
@given(case=caption_files())
@example(case=("image,caption\nA,一只狗在跑\nB,\"一只猫在\nc.jpg,一只鸟在飞\nd.jpg,一匹马\n".encode(), None))
@example(case=("a.jpg#0 狗\n2903617548_d3e38d7f88.jpg#7一只猫在跑\n".encode(), None))
def test_any_caption_file_reads_as_written_or_is_refused_in_one_line(tmp_path_factory, case):
    content, expected = case
    path = tmp_path_factory.mktemp("formats") / "captions"
    path.write_bytes(content)
    try:
        entries = load_annotations(str(path))
    except config.UserError as error:
        assert str(error).startswith(f"{path}: ") and "\n" not in str(error), error
        assert expected is None, error  # a well-formed file is never refused
        return
    if expected is not None:
        assert [(e["image_id"], e["caption"]) for e in entries] == [(e["image_id"], e["caption"]) for e in expected]
    assert all(entry["image_id"] not in ("image", "image_id") for entry in entries)  # no header as an image


NINE_WORDS = ["</PAD>", "</EOS>", "</UNKNOWN>", "a", "b", "c", "d", "e", "f"]
EDGES = [5e-324, 1e-300, 1e-50, 1e-9, 1.0, 1e9, 1e39, 1e300, 1.7e308]


@st.composite
def decoding_options(draw):
    """Options of one decoding method, each float anywhere in its range, its edges and beyond float32's."""
    method = draw(st.sampled_from(["beam", "greedy", "sample", "diverse"]))
    positive = st.sampled_from(EDGES) | st.floats(min_value=5e-324, allow_infinity=False)
    options = {"decoding": method, "max_gen_len": 10}
    if method == "sample":
        options.update(temperature=draw(positive), top_p=draw(st.sampled_from([5e-324, 1e-300, 1e-9, 0.5, 1.0])
                                                                | st.floats(5e-324, 1.0)),
                       top_k=draw(st.integers(0, 12)), n_best=draw(st.integers(1, 4)), seed=draw(st.integers(0, 9)))
    if method in ("beam", "diverse"):
        options.update(beam_size=draw(st.sampled_from([2, 4])), n_best=2)
    if method == "diverse":
        options.update(diversity_groups=2, diversity_lambda=draw(st.just(0.0) | positive))
    return options


@examples(100)
@given(options=decoding_options(), ensemble=st.booleans())
@example(options={"decoding": "sample", "temperature": 1e-50, "n_best": 3, "seed": 3, "max_gen_len": 10}, ensemble=True)
@example(options={"decoding": "sample", "top_p": 5e-324, "n_best": 3, "seed": 3, "max_gen_len": 10}, ensemble=False)
@example(options={"decoding": "diverse", "beam_size": 4, "n_best": 2, "diversity_groups": 2,
                  "diversity_lambda": 1e300, "max_gen_len": 10}, ensemble=False)
def test_any_decoding_option_gives_the_asked_captions_of_real_words(options, ensemble):
    """Every method at any value of its options: the n-best count honoured (sample: exactly; a search: at
    most, all different), captions of real words, none a run of one word to the maximum length."""
    opt = config.parse(**options)
    model, features = ending_model("attention", 3)
    if ensemble:
        model = Ensemble([model, ending_model("attention", 4)[0]], [features.shape[1:]] * 2)
        features = torch.cat([features.flatten(1)] * 2, 1)
    for image in caption_features(model, features, NINE_WORDS, opt):
        texts = [text for text, _, _ in image]
        assert len(texts) == opt.n_best if opt.decoding in ("sample", "greedy") else 1 <= len(texts) <= opt.n_best
        for text, score, _ in image:
            assert set(text) <= set("abcdef") and len(text) >= 1 and math.isfinite(score), (text, score)
            assert not (len(text) == opt.max_gen_len and len(set(text)) == 1), text

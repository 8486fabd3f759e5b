"""Every caption format caption_formats.py reads gives the caption .pth the AI Challenger JSON of the
same captions gives; splits, bad files and mixed formats are handled as the loader handles them."""
import csv
import io
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from conftest import ROOT, SHARED
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captions import load_annotations
from config import UserError
from data_preprocess import process

ZHC = os.path.join(SHARED, "annotations", "flickr8kcn_train_zhc.json")
KEYS = ("word2ix", "ix2word", "id2ix", "ix2id", "caption", "sentences", "extra_caption")
SPLITS = ["train"] * 12 + ["val"] * 4 + ["test"] * 4  # of the 20 images


@pytest.fixture(scope="module")
def entries():
    """The first 20 images of the shared Flickr8k-CN zhc training captions."""
    if not os.path.isfile(ZHC):
        pytest.skip(f"{ZHC}: the shared Flickr8k-CN data is absent")
    with open(ZHC, encoding="utf-8") as file:
        return [{"image_id": e["image_id"], "caption": e["caption"]} for e in json.load(file)[:20]]


# --- the formats, written from AI Challenger entries ---------------------------------------------
def ai_challenger(entries):
    return json.dumps(entries, ensure_ascii=False)


def coco(entries):
    """Ids that are not row numbers; the annotations ordered caption number first, as images interleave."""
    images = [{"id": 100 + i, "file_name": e["image_id"]} for i, e in enumerate(entries)]
    captions = sorted((n, i, c) for i, e in enumerate(entries) for n, c in enumerate(e["caption"]))
    annotations = [{"id": k, "image_id": 100 + i, "caption": c} for k, (_, i, c) in enumerate(captions)]
    return json.dumps({"info": {}, "images": images, "annotations": annotations}, ensure_ascii=False)


def karpathy(entries, splits=None, folder=""):
    images = [{"filename": e["image_id"], "split": (splits or SPLITS)[i % 20], "imgid": i,
               "sentences": [{"raw": c, "tokens": list(c)} for c in e["caption"]]} for i, e in enumerate(entries)]
    for image in images if folder else []:
        image["filepath"] = folder
    return json.dumps({"dataset": "flickr8k", "images": images}, ensure_ascii=False)


def caption_lines(entries, separator=" ", extension=True):
    """Flickr8k-CN's x.jpg#zhc#N lines; without the extension, COCO-CN's x#N lines."""
    name = (lambda image: image) if extension else (lambda image: os.path.splitext(image)[0])
    return "".join(f"{name(e['image_id'])}#zhc#{n}{separator}{c}\n"
                   for e in entries for n, c in enumerate(e["caption"]))


def table(entries, delimiter=",", header=("image", "caption")):
    text = io.StringIO()
    writer = csv.writer(text, delimiter=delimiter)
    writer.writerow(header)
    writer.writerows((e["image_id"], c) for e in entries for c in e["caption"])
    return text.getvalue()


def interleaved_table(entries):
    """A CSV whose images' rows are mixed: gathered, each image in first-seen order."""
    rows = sorted(((n, e["image_id"], c) for e in entries for n, c in enumerate(e["caption"])), key=lambda r: r[0])
    return "file_name,source,sentence\n" + "".join(f'{image},zhc,"{c}"\n' for _, image, c in rows)


FORMATS = {
    "coco": coco, "karpathy": karpathy, "flickr8k-cn lines": caption_lines,
    "coco-cn lines": lambda entries: caption_lines(entries, "\t", extension=False),
    "csv": table, "tsv": lambda entries: table(entries, "\t", ("image_id", "text")),
}


def plain(entries):
    """Entries as AI Challenger's (a Karpathy entry also keeps its split)."""
    return [{"image_id": e["image_id"], "caption": e["caption"]} for e in entries]


def write(path, text, bom=False):
    path.write_text(text, encoding="utf-8-sig" if bom else "utf-8")
    return str(path)


def encoded(path, **options):
    """process(...) -> the loaded caption .pth's content (the annotation file's path aside)."""
    out = str(path) + ".pth"
    process(caption_data_path=out, min_appear=1, **options)
    data = torch.load(out, weights_only=True)
    return {key: data[key] for key in KEYS}


# --- same captions, same .pth --------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMATS)
def test_every_format_gives_the_pth_of_the_same_ai_challenger_json(tmp_path, entries, name):
    expected = encoded(tmp_path / "a.json", annotation_file=write(tmp_path / "a.json", ai_challenger(entries)))
    other = write(tmp_path / "captions.other", FORMATS[name](entries), bom=name == "csv")
    assert plain(load_annotations(other)) == entries
    assert encoded(tmp_path / "b", annotation_file=other) == expected


def test_rows_of_an_image_are_gathered_in_first_seen_order(tmp_path, entries):
    assert load_annotations(write(tmp_path / "c.csv", interleaved_table(entries))) == entries


def test_karpathy_split_chooses_the_images_and_filepath_is_their_folder(tmp_path, entries):
    path = write(tmp_path / "dataset_flickr8k.json", karpathy(entries))
    val = [e for e, split in zip(entries, SPLITS) if split == "val"]
    assert encoded(tmp_path / "v", annotation_file=path, split="val") == encoded(
        tmp_path / "a", annotation_file=write(tmp_path / "a.json", ai_challenger(val)))
    assert [e["image_id"] for e in load_annotations(path, "test")] == [e["image_id"] for e in entries[16:]]
    with_folder = write(tmp_path / "dataset_coco.json", karpathy(entries, folder="val2014"))
    assert [e["image_id"] for e in load_annotations(with_folder, "train")] == [
        "val2014/" + e["image_id"] for e in entries[:12]]


def test_a_caption_with_a_comma_is_one_quoted_csv_field(tmp_path):
    entries = [{"image_id": "a.jpg", "caption": ["一只狗,在跑", '他说"你好"']},
               {"image_id": "b.jpg", "caption": ["猫"]}]
    path = write(tmp_path / "c.csv", table(entries))
    assert '"一只狗,在跑"' in open(path, encoding="utf-8").read()
    assert load_annotations(path) == entries


def test_extra_text_may_be_in_another_format_than_the_captions(tmp_path, entries):
    main = write(tmp_path / "main.txt", caption_lines(entries[:10]))
    extra = [{"image_id": e["image_id"], "caption": [c + "。" for c in e["caption"][:2]]} for e in entries[5:15]]
    as_json = encoded(tmp_path / "a", annotation_file=main,
                      extra_annotation_file=write(tmp_path / "x.json", ai_challenger(extra)))
    as_csv = encoded(tmp_path / "b", annotation_file=main,
                     extra_annotation_file=write(tmp_path / "x.csv", table(extra)))
    assert as_csv == as_json and sum(map(bool, as_csv["extra_caption"])) == 5


# --- bad files: one line ---------------------------------------------------------------------------
@pytest.mark.parametrize("content, problem", [
    ("hello world\nfoo bar\n", "not a caption file this toolkit reads: expected a list of"),
    ('{"foo": [1, 2]}', "it begins '{\"foo\": [1, 2]}'"),
    ("", "it is empty"),
    ("x" * 200000, "it begins 'xxxxxxxxxx"),
    ('"Image";"Caption"\na.jpg;狗\n', "CSV/TSV with a header naming the image and caption columns"),
    ("a.jpg#0 狗\nb.jpg 猫\n", "line 2 is not IMAGE#N SENTENCE: 'b.jpg 猫'"),
    ("image,caption\na.jpg\n", "line 2: fewer columns than the header names"),
    ("image,caption\nA,一只狗在跑\nB,\"一只猫在\nc.jpg,一只鸟在飞\nd.jpg,一匹马\n",
     "line 3: a quoted field opens there and never closes"),
    ("a.jpg#0 狗\n2903617548_d3e38d7f88.jpg#7一只猫在跑\n", "line 2 is not IMAGE#N SENTENCE"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}]}', "expected an object with 'annotations' (list)"),
    ("image,caption\n../a.jpg,狗\n", "entry 0: image_id '../a.jpg' points outside"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "狗"}]}',
     'annotations[0]: image_id 2 is not the id of one of "images"'),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], "annotations": []}',
     "images[1]: id 1 already appears"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}', "none of its 1 images has a caption"),
    ('{"images": [{"filename": "a.jpg", "sentences": [{"tokens": ["狗"]}]}]}',
     "images[0].sentences[0]: expected an object with 'raw' (str)"),
    ('{"images": [{"filename": "a.jpg", "sentences": [{"raw": "狗"}]}, '
     '{"filename": "a.jpg", "sentences": [{"raw": "猫"}]}]}',
     "entry 1: image_id 'a.jpg' already appears in entry 0"),
    ('{"images": {"filename": "a.jpg"}}', "expected an object with 'images' (list)"),
])
def test_a_bad_file_of_any_format_is_one_line(tmp_path, content, problem):
    path = write(tmp_path / "bad", content)
    with pytest.raises(SystemExit) as error:
        process(annotation_file=path, caption_data_path=str(tmp_path / "c.pth"))
    assert str(error.value).startswith(f"error: {path}: ") and problem in str(error.value), error.value
    assert "\n" not in str(error.value) and not (tmp_path / "c.pth").exists()


def test_an_image_without_captions_is_left_out_and_counted_in_every_format(tmp_path, capsys):
    coco = ('{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}], '
            '"annotations": [{"image_id": 2, "caption": "狗"}]}')
    karpathy = ('{"images": [{"filename": "a.jpg", "sentences": []}, '
                '{"filename": "b.jpg", "sentences": [{"raw": "狗"}]}]}')
    challenger = '[{"image_id": "a.jpg", "caption": []}, {"image_id": "b.jpg", "caption": ["狗"]}]'
    for name, content in (("coco", coco), ("karpathy", karpathy), ("challenger", challenger)):
        path = write(tmp_path / name, content)
        assert [(e["image_id"], e["caption"]) for e in load_annotations(path)] == [("b.jpg", ["狗"])]
        assert f"{path}: left out 1 images with no caption" in capsys.readouterr().err


def test_a_header_repeated_mid_file_is_not_a_caption_and_a_long_caption_reads_as_in_caption_lines(tmp_path):
    joined = write(tmp_path / "joined.csv", "image,caption\na.jpg,一只狗\nimage,caption\nb.jpg,一只猫\n")
    assert load_annotations(joined) == [{"image_id": "a.jpg", "caption": ["一只狗"]},
                                        {"image_id": "b.jpg", "caption": ["一只猫"]}]
    long = "狗" * 1_000_000
    as_csv = load_annotations(write(tmp_path / "long.csv", f"image,caption\na.jpg,{long}\n"))
    assert as_csv == load_annotations(write(tmp_path / "long.txt", f"a.jpg#0 {long}\n")) == [
        {"image_id": "a.jpg", "caption": [long]}]


def test_a_file_not_in_utf8_is_one_line(tmp_path):
    (tmp_path / "gbk.csv").write_bytes("image,caption\na.jpg,一只狗\n".encode("gbk"))
    with pytest.raises(UserError, match="gbk.csv: not UTF-8 text; caption files are read as UTF-8"):
        load_annotations(str(tmp_path / "gbk.csv"))


def test_a_split_for_a_file_without_splits_or_one_that_selects_nothing_is_one_line(tmp_path, entries):
    with pytest.raises(UserError, match="--split=train chooses images of a Karpathy dataset_.*this file is CSV/TSV"):
        load_annotations(write(tmp_path / "c.csv", table(entries)), "train")
    with pytest.raises(UserError, match="--split=restval selects no image; the file's splits: test, train, val$"):
        load_annotations(write(tmp_path / "k.json", karpathy(entries)), "restval")
    with pytest.raises(SystemExit, match="--split=dev: choose one of train, val, test, restval, or leave it empty$"):
        process(annotation_file=str(tmp_path / "k.json"), split="dev")


BAD = {"ai challenger": '[{"image_id": "a.jpg", "caption": ["狗"]}, {"image_id": "a.jpg", "caption": ["猫"]}]',
       "coco": '{"images": [], "annotations": [{"image_id": 1, "caption": "狗"}]}',
       "karpathy": '{"images": [{"filename": "a.jpg", "sentences": "狗"}]}',
       "caption lines": "a.jpg#0 狗\n#1 猫\n", "csv": "image,caption\na.jpg\n"}


@pytest.mark.parametrize("name", BAD)
def test_the_command_line_exits_1_with_one_line_for_a_bad_file_of_each_format(tmp_path, name):
    path = write(tmp_path / "bad", BAD[name])
    result = subprocess.run([sys.executable, "data_preprocess.py", "process", f"--annotation-file={path}",
                             f"--caption-data-path={tmp_path / 'c.pth'}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: {path}: ") and result.stderr.count("\n") == 1, result.stderr


# --- any captions, any format: the same entries back -----------------------------------------------
IDS = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,10}\.jpg", fullmatch=True)
SENTENCES = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=15).map(
    str.strip).filter(bool)
ENTRIES = st.lists(st.fixed_dictionaries({"image_id": IDS, "caption": st.lists(SENTENCES, min_size=1, max_size=4)}),
                   min_size=1, max_size=6, unique_by=lambda entry: entry["image_id"])
WRITERS = {**FORMATS, "ai challenger": ai_challenger,
           "tsv lines": lambda entries: caption_lines(entries, "\t"),
           "csv, other columns": lambda entries: table(entries, header=("filename", "sentence"))}


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=ENTRIES, name=st.sampled_from(sorted(WRITERS)), bom=st.booleans())
def test_any_captions_written_in_any_format_read_back_as_the_same_entries(entries, name, bom):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "captions")
        with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as file:
            file.write(WRITERS[name](entries))
        assert plain(load_annotations(path)) == entries


JSON = st.recursive(st.none() | st.integers() | st.text(max_size=6), lambda inner: st.lists(inner, max_size=3) | (
    st.dictionaries(st.sampled_from(["id", "file_name", "filename", "filepath", "sentences", "raw", "image_id",
                                     "caption", "split"]), inner, max_size=4)), max_leaves=10)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(data=st.fixed_dictionaries({"images": JSON}, optional={"annotations": JSON}), split=st.sampled_from(["", "val"]))
def test_any_coco_or_karpathy_shaped_json_is_read_or_refused_in_one_line(data, split):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "captions.json")
        with open(path, "w", encoding="utf-8") as file:
            json.dump(data, file)
        try:
            entries = load_annotations(path, split)
        except UserError as error:
            assert str(error).startswith(path) and "\n" not in str(error)
            return
    assert entries and all(isinstance(e["image_id"], str) and all(isinstance(c, str) for c in e["caption"])
                           for e in entries)

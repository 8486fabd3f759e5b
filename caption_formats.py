"""Caption files in the formats data sets ship in, told apart by their content (never by the file
name), each read into the AI Challenger entries the toolkit encodes: [{"image_id", "caption": [...]}].

    AI Challenger JSON  [{"image_id": "x.jpg", "caption": ["一只狗在跑", ...]}, ...]
    COCO JSON           {"images": [{"id": 1, "file_name": "x.jpg"}, ...],
                         "annotations": [{"image_id": 1, "caption": "一只狗在跑"}, ...]}
    Karpathy JSON       {"images": [{"filepath": "val2014" (optional), "filename": "x.jpg", "split": "val",
                                     "sentences": [{"raw": "一只狗在跑", "tokens": [...]}, ...]}, ...]}
    caption lines       x.jpg#zhc#0 一只狗在跑                      (Flickr8k-CN: IMAGE#anything, a space or a
                        COCO_val2014_000000000139#0<TAB>一只狗在跑   tab, the sentence; COCO-CN: no extension)
    CSV / TSV           image,caption  then  x.jpg,一只狗在跑        (a header row, then one caption a row)

The entries are not checked here: captions.load_annotations checks them, whatever their format.
"""
import csv
import io
import os
import posixpath
import re

from config import INT_LIMIT, UserError
from files import check_input_file, read_json

IMAGE_COLUMNS = ("image", "image_id", "file_name", "filename")
CAPTION_COLUMNS = ("caption", "sentence", "text")
# IMAGE#N SENTENCE, on a stripped line: the tag after # is ASCII (#0, #zhc#0), so a sentence glued to it
# (x.jpg#7一只猫) is not a line of this format
LINE = re.compile(r"([^#\s]+)#[!-~]*(?:\s+(.*))?")
FORMATS = ('a list of {"image_id", "caption"} entries (AI Challenger JSON), {"images", "annotations"} (COCO '
           'JSON), {"images": [{"filename", "sentences"}]} (Karpathy JSON), IMAGE#N SENTENCE lines (Flickr8k-CN, '
           "COCO-CN) or CSV/TSV with a header naming the image and caption columns")


def read_entries(path, split=""):
    """The captions of the file at path as AI Challenger entries, whatever its format; split: only
    the images of that split of a Karpathy file."""
    kind, reader, content = detect(path)
    entries = reader(content, path)
    if not split:
        return entries
    if reader is not read_karpathy:
        raise UserError(f"{path}: --split={split} chooses images of a Karpathy dataset_*.json; this file is "
                        f"{kind}, which has no splits")
    chosen = [entry for entry in entries if entry["split"] == split]
    if not chosen:
        splits = ", ".join(sorted({str(entry["split"]) for entry in entries})) or "none"
        raise UserError(f"{path}: --split={split} selects no image; the file's splits: {splits}")
    return chosen


def detect(path):
    """-> (the name of the format of the file at path, its reader, the content the reader takes)."""
    text = _read_text(path)
    if text.lstrip()[:1] in ("[", "{"):
        data = read_json(path, "caption file")
        if isinstance(data, list):
            return "AI Challenger JSON", read_ai_challenger, data
        if isinstance(data, dict) and ("annotations" in data or _names_coco_images(data)):
            return "COCO JSON", read_coco, data
        if isinstance(data, dict) and "images" in data:
            return "Karpathy JSON", read_karpathy, data
    else:
        first = _first_line(text)
        if _columns(first.split(_delimiter(first))):
            return "CSV/TSV", read_table, text
        if LINE.fullmatch(first):
            return "caption lines", read_lines, text
    found = f"it begins {text[:40]!r}" if text.strip() else "it is empty"
    raise UserError(f"{path}: not a caption file this toolkit reads: expected {FORMATS}; {found}")


def read_ai_challenger(entries, path):
    """AI Challenger JSON: already the entries."""
    return entries


def read_coco(data, path):
    """COCO JSON -> an entry for each of "images", in their order, with its annotations' captions."""
    names = {}  # id -> file_name
    for index, image in enumerate(_field(data, "images", list, path)):
        image_id = _field(image, "id", (int, str), f"{path}: images[{index}]")
        if image_id in names:
            raise UserError(f"{path}: images[{index}]: id {image_id!r} already appears")
        names[image_id] = _field(image, "file_name", str, f"{path}: images[{index}]")
    captions = {image_id: [] for image_id in names}
    for index, annotation in enumerate(_field(data, "annotations", list, path)):
        where = f"{path}: annotations[{index}]"
        image_id = _field(annotation, "image_id", (int, str), where)
        if image_id not in captions:
            raise UserError(f'{where}: image_id {image_id!r} is not the id of one of "images"')
        captions[image_id].append(_field(annotation, "caption", str, where))
    return [{"image_id": names[image_id], "caption": captions[image_id]} for image_id in names]


def read_karpathy(data, path):
    """Karpathy JSON -> an entry for each image (filepath/filename when it has a filepath), its
    "raw" sentences the captions (tokens may be characters or words), its split kept for --split."""
    entries = []
    for index, image in enumerate(_field(data, "images", list, path)):
        where = f"{path}: images[{index}]"
        name = _field(image, "filename", str, where)
        folder = _field(image, "filepath", str, where) if "filepath" in image else ""
        sentences = _field(image, "sentences", list, where)
        captions = [_field(sentence, "raw", str, f"{where}.sentences[{number}]")
                    for number, sentence in enumerate(sentences)]
        entries.append({"image_id": posixpath.join(folder, name), "caption": captions, "split": image.get("split")})
    return entries


def read_lines(text, path):
    """IMAGE#N SENTENCE lines -> entries; an IMAGE without an extension is IMAGE.jpg (COCO-CN writes
    COCO_val2014_000000000139#0 for the photo COCO_val2014_000000000139.jpg; Flickr8k-CN writes x.jpg#zhc#0)."""
    pairs = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        match = LINE.fullmatch(line.strip())
        if not match:
            raise UserError(f"{path}: line {number} is not IMAGE#N SENTENCE: {line.strip()[:40]!r}")
        image, sentence = match.groups()
        pairs.append((image if os.path.splitext(image)[1] else image + ".jpg", sentence or ""))
    return _gather(pairs)


def read_table(text, path):
    """CSV (or TSV: a tab in the header) with image and caption columns -> entries, an image's rows
    gathered in file order. A row that repeats the header (files joined with cat) is left out."""
    rows = _table_rows(text, path)
    _, header = next(rows)
    image, caption = _columns(header)
    pairs = []
    for line, row in rows:
        if row == header:
            continue
        if len(row) <= max(image, caption):
            raise UserError(f"{path}: line {line}: fewer columns than the header names")
        pairs.append((row[image].strip(), row[caption]))
    return _gather(pairs)


def _table_rows(text, path):
    """(the line a row begins on, the row) for each row of a CSV/TSV that is not blank. A field may be as
    long as a caption line may (no csv field limit); a quote that never closes is one line naming where
    it opens."""
    csv.field_size_limit(INT_LIMIT - 1)
    rows = csv.reader(io.StringIO(text), delimiter=_delimiter(_first_line(text)), strict=True)
    while True:
        line = rows.line_num + 1  # a quoted field may span lines: the row begins here
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as error:
            if "end of data" in str(error):
                raise UserError(f"{path}: line {line}: a quoted field opens there and never closes") from None
            raise UserError(f"{path}: line {line}: not valid CSV: {error}") from None
        if "".join(row).strip():
            yield line, row


def _read_text(path):
    """The file as text: UTF-8, with or without the BOM Windows editors write; else one line."""
    check_input_file(path, "caption file")
    try:
        with open(path, encoding="utf-8-sig") as file:
            return file.read()
    except OSError as error:
        raise UserError(f"{path}: cannot read the annotation file: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; caption files are read as UTF-8 (convert it first, e.g. "
                        "iconv -f GBK -t UTF-8)") from None


def _field(item, key, kinds, where):
    """item[key], when item is an object holding a value of kinds there; else one line."""
    if not isinstance(item, dict) or not isinstance(item.get(key), kinds):
        names = " or ".join(kind.__name__ for kind in kinds) if isinstance(kinds, tuple) else kinds.__name__
        raise UserError(f"{where}: expected an object with {key!r} ({names})")
    return item[key]


def _names_coco_images(data):
    """Whether data's "images" are COCO's ({"id", "file_name"}), whatever else it lacks."""
    images = data.get("images")
    return isinstance(images, list) and bool(images) and isinstance(images[0], dict) and "file_name" in images[0]


def _first_line(text):
    """The first line that is not blank, stripped."""
    return next((line.strip() for line in text.split("\n") if line.strip()), "")


def _delimiter(header):
    return "\t" if "\t" in header else ","


def _columns(header):
    """(image column, caption column) of a header row, or None when it names no such pair."""
    names = [name.strip().strip('"').lower() for name in header]
    image = next((i for i, name in enumerate(names) if name in IMAGE_COLUMNS), None)
    caption = next((i for i, name in enumerate(names) if name in CAPTION_COLUMNS), None)
    return None if image is None or caption is None else (image, caption)


def _gather(pairs):
    """(image, caption) pairs -> entries, images in first-seen order, each image's captions in file order."""
    captions = {}
    for image, caption in pairs:
        captions.setdefault(image, []).append(caption)
    return [{"image_id": image, "caption": texts} for image, texts in captions.items()]

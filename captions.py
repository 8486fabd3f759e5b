"""Chinese captions as the toolkit reads them: annotation files, cleaning, jieba words, special tokens."""
import collections
import functools
import logging
import os
import re
import sys
import typing
import warnings

from caption_formats import read_entries
from config import UserError
from files import load_pth

PAD, EOS, UNKNOWN = "</PAD>", "</EOS>", "</UNKNOWN>"
CAPTION_KEYS = ("word2ix", "ix2word", "id2ix", "ix2id", "caption", "padding", "end", "unknown")

def clean(sentence):
    """Remove "。", spaces and line breaks, as AI Challenger's scorer does."""
    return re.sub(r"[。\s]", "", sentence)


@functools.cache
def _jieba():
    """jieba, imported when first needed (generate never needs it)."""
    with warnings.catch_warnings():  # jieba 0.42 imports the deprecated pkg_resources
        warnings.simplefilter("ignore", UserWarning)
        import jieba
    jieba.setLogLevel(logging.WARNING)
    return jieba


def tokenize(sentence):
    """A caption as jieba precise-mode words."""
    return _jieba().lcut(clean(sentence), cut_all=False)


def special_indices(ix2word):
    """-> index of </EOS>, and the indices a caption may never contain (</PAD>, </UNKNOWN>)."""
    return ix2word.index(EOS), [ix2word.index(token) for token in (PAD, UNKNOWN) if token in ix2word]


# A word that ends fewer than this share of its training uses, seen at least this often, leaves a
# caption unfinished (一个, 的, 在, 正在, 和 ...): the search never ends a caption on it (--ending-rule).
UNFINISHED_END_SHARE, UNFINISHED_MIN_COUNT = 0.005, 20


def unfinished_words(captions, ix2word):
    """The words the training captions (rows of word-index captions) almost never end on -> sorted
    indices; read from the captions themselves, not typed by hand."""
    uses, ends = collections.Counter(), collections.Counter()
    for row in captions:
        for caption in row:
            uses.update(caption)
            ends.update(caption[-1:])
    special = {ix2word.index(token) for token in (PAD, EOS, UNKNOWN) if token in ix2word}
    return sorted(ix for ix, count in uses.items() if count >= UNFINISHED_MIN_COUNT and ix not in special
                  and ends[ix] < UNFINISHED_END_SHARE * count)


def repeated_words(captions):
    """The words the training captions (rows of word-index captions) say twice in a row somewhere -> sorted
    indices (哈哈 may be one; 的 never is): a word not among them never follows itself (--ending-rule)."""
    return sorted({a for row in captions for caption in row for a, b in zip(caption, caption[1:]) if a == b})


class Habits(typing.NamedTuple):
    """What the training captions never do, as rules for decoding (--ending-rule): end on an `unfinished`
    word, say a word twice in a row unless it is `repeatable` (None: not known, e.g. an older
    checkpoint's: every word may)."""

    unfinished: tuple = ()
    repeatable: tuple | None = None

    def of(self, opt):
        """The habits that decoding with opt keeps: none without --ending-rule, no repeats with --no-repeat."""
        habits = self if opt.ending_rule else NO_HABITS
        return habits._replace(repeatable=()) if opt.no_repeat else habits


NO_HABITS = Habits()


def caption_texts(data, row):
    """Every caption of a row of caption data, its extra training text too, as text."""
    extra = (data.get("extra_caption") or [[]] * len(data["caption"]))[row]
    return ["".join(data["ix2word"][ix] for ix in caption) for caption in data["caption"][row] + extra]


def load_annotations(path, split=""):
    """Read and validate a caption file of any format caption_formats.py reads (split: only that split
    of a Karpathy file) -> AI Challenger entries [{"image_id", "caption": [...]}]; an image with no
    caption (a COCO image no annotation names, a Karpathy image without sentences) is left out and counted."""
    entries = read_entries(path, split)
    if not entries:
        raise UserError(f"{path}: the annotation list is empty")
    seen = {}
    for index, entry in enumerate(entries):
        problem = _entry_problem(entry)
        if not problem and entry["image_id"] in seen:
            problem = f"image_id {entry['image_id']!r} already appears in entry {seen[entry['image_id']]}"
        if problem:
            raise UserError(f"{path}: entry {index}: {problem}")
        seen[entry["image_id"]] = index
    captioned = [entry for entry in entries if entry["caption"]]
    if not captioned:
        raise UserError(f"{path}: none of its {len(entries)} images has a caption")
    if len(captioned) < len(entries):
        print(f"warning: {path}: left out {len(entries) - len(captioned)} images with no caption", file=sys.stderr)
    return captioned


def _entry_problem(entry):
    if not isinstance(entry, dict):
        return f"expected an object, got {type(entry).__name__}"
    image_id = entry.get("image_id")
    if not isinstance(image_id, str) or not image_id:
        return "missing or empty image_id"
    if os.path.isabs(image_id) or os.path.normpath(image_id).split(os.sep)[0] == "..":
        return f"image_id {image_id!r} points outside the image folder"
    if not image_id.isprintable() or not _encodable(image_id):
        return f"image_id {image_id!r} holds a control character or is not valid Unicode"
    captions = entry.get("caption")
    if not isinstance(captions, list):
        return "caption must be a list of sentences"
    for number, caption in enumerate(captions):
        if not isinstance(caption, str):
            return f"caption {number} is a {type(caption).__name__}, not a string"
    return None


def _encodable(text):
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a lone surrogate
        return False


def load_caption_data(path):
    """An encoded caption file (data_preprocess.py), checked to be one; never runs code from it."""
    data = load_pth(path, "caption data file", CAPTION_KEYS)
    problem = vocabulary_problem(data["ix2word"])
    if not problem and not (isinstance(data["ix2id"], list) and _encoded_rows(data["caption"], len(data["ix2id"]),
                                                                           len(data["ix2word"]))):
        problem = "its image list and captions do not match"
    elif not problem and not _encoded_rows(data.get("extra_caption", []), len(data["ix2id"]), len(data["ix2word"]),
                                           missing_ok=True):
        problem = "its extra training text does not match its images and vocabulary"
    elif not problem and not data["ix2id"]:
        problem = "it holds no images"
    if problem:
        raise UserError(f"{path}: not a caption data file of this toolkit: {problem}")
    return data


def _encoded_rows(rows, count, vocabulary, missing_ok=False):
    """Whether rows holds count rows of captions, each a list of word indices into the vocabulary
    (or, missing_ok, is empty: a file of an older version, or without extra text)."""
    if missing_ok and isinstance(rows, list) and not rows:
        return True
    return isinstance(rows, list) and len(rows) == count and all(
        isinstance(captions, list) and all(isinstance(caption, list) and all(
            type(ix) is int and 0 <= ix < vocabulary for ix in caption) for caption in captions) for captions in rows)


def vocabulary_problem(ix2word):
    """Why ix2word cannot be a vocabulary of this toolkit, or None."""
    if not isinstance(ix2word, list) or not all(isinstance(word, str) for word in ix2word):
        return "its vocabulary is not a list of words"
    missing = [token for token in (PAD, EOS, UNKNOWN) if token not in ix2word]
    if missing:
        return f"its vocabulary lacks {', '.join(missing)}"
    if len(set(ix2word)) != len(ix2word):
        return "its vocabulary holds a word twice"
    return None

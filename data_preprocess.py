"""Step 1: AI Challenger caption JSON -> jieba words -> vocabulary -> one caption .pth.

    python data_preprocess.py process --annotation-file=train.json --caption-data-path=caption.pth
    python data_preprocess.py process --annotation-file=val.json --caption-data-path=caption_val.pth \\
        --vocab-from=caption.pth
"""
import collections
import json
import logging
import os
import re
import warnings

import fire
from tqdm import tqdm

with warnings.catch_warnings():  # jieba 0.42 imports the deprecated pkg_resources
    warnings.simplefilter("ignore", UserWarning)
    import jieba

from config import Config, UserError, command
from files import atomic_save, load_pth

PAD, EOS, UNKNOWN = "</PAD>", "</EOS>", "</UNKNOWN>"
CAPTION_KEYS = ("word2ix", "ix2word", "id2ix", "ix2id", "caption", "padding", "end", "unknown")
README = """word2ix: word -> index; ix2word: index -> word (a list)
id2ix: image_id -> row; ix2id: row -> image_id (row i of the features file is image ix2id[i])
caption[row]: the captions of that image, each a list of word indices (no </EOS>)
sentences[row]: the same captions as text, cleaned (the references for scoring)
padding, end, unknown: the special tokens; dropped: annotation entries with no usable caption"""

jieba.setLogLevel(logging.WARNING)


def clean(sentence):
    """Remove "。", spaces and line breaks, as AI Challenger's scorer does."""
    return re.sub(r"[。\s]", "", sentence)


def tokenize(sentence):
    """A caption as jieba precise-mode words."""
    return jieba.lcut(clean(sentence), cut_all=False)


def load_annotations(path):
    """Read and validate an AI Challenger annotation file: [{"image_id", "caption": [...]}]."""
    try:
        with open(path, encoding="utf-8") as file:
            entries = json.load(file)
    except OSError as error:
        raise UserError(f"{path}: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(entries, list):
        raise UserError(f'{path}: expected a list of {{"image_id", "caption"}} entries, got a {type(entries).__name__}')
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
    return entries


def _entry_problem(entry):
    if not isinstance(entry, dict):
        return f"expected an object, got {type(entry).__name__}"
    if not isinstance(entry.get("image_id"), str) or not entry["image_id"]:
        return "missing or empty image_id"
    captions = entry.get("caption")
    if not isinstance(captions, list) or not captions:
        return "caption must be a non-empty list of sentences"
    for number, caption in enumerate(captions):
        if not isinstance(caption, str):
            return f"caption {number} is a {type(caption).__name__}, not a string"
    return None


def build_vocabulary(tokenized, max_words, min_appear):
    """The max_words most frequent words seen at least min_appear times, after the special tokens."""
    counts = collections.Counter(word for captions in tokenized for words in captions for word in words)
    frequent = [word for word, count in counts.most_common() if count >= min_appear][:max_words]
    ix2word = [PAD, EOS, UNKNOWN] + frequent
    return ix2word


def encode(tokenized, word2ix, max_len):
    """Word lists -> index lists, truncated to max_len words."""
    unknown = word2ix[UNKNOWN]
    return [[[word2ix.get(word, unknown) for word in words[:max_len]] for words in captions] for captions in tokenized]


def check_round_trip(image_ids, sentences, encoded, ix2word, max_len):
    """Indices -> words -> sentence must give back the cleaned original sentence."""
    checked = 0
    for image_id, originals, captions in zip(image_ids, sentences, encoded):
        for original, indices in zip(originals, captions):
            words = [ix2word[ix] for ix in indices]
            if UNKNOWN in words or len(indices) == max_len:
                continue
            if "".join(words) != original:
                raise AssertionError(f"round trip failed for {image_id}: {original!r} -> {words}")
            checked += 1
    return checked


@command
def process(opt: Config):
    """Encode opt.annotation_file into opt.caption_data_path."""
    if not opt.annotation_file:
        raise UserError("give the captions to encode with --annotation-file=FILE.json")
    entries = load_annotations(opt.annotation_file)
    tokenized, empty = [], 0
    for entry in tqdm(entries, desc="jieba", unit="image"):
        words = [tokenize(sentence) for sentence in entry["caption"]]
        empty += sum(not w for w in words)
        tokenized.append([w for w in words if w])
    kept = [i for i, captions in enumerate(tokenized) if captions]
    dropped = len(entries) - len(kept)
    entries, tokenized = [entries[i] for i in kept], [tokenized[i] for i in kept]

    if opt.vocab_from:
        ix2word = load_pth(opt.vocab_from, "caption data file", CAPTION_KEYS)["ix2word"]
    else:
        ix2word = build_vocabulary(tokenized, opt.max_words, opt.min_appear)
    word2ix = {word: ix for ix, word in enumerate(ix2word)}
    encoded = encode(tokenized, word2ix, opt.max_caption_len)
    ix2id = [entry["image_id"] for entry in entries]
    sentences = [[clean(s) for s in entry["caption"] if clean(s)] for entry in entries]
    checked = check_round_trip(ix2id, sentences, encoded, ix2word, opt.max_caption_len)
    data = {
        "word2ix": word2ix, "ix2word": ix2word,
        "id2ix": {image_id: ix for ix, image_id in enumerate(ix2id)}, "ix2id": ix2id,
        "caption": encoded, "sentences": sentences,
        "padding": PAD, "end": EOS, "unknown": UNKNOWN, "readme": README,
        "annotation_file": os.path.abspath(opt.annotation_file),
    }
    atomic_save(data, opt.caption_data_path)
    truncated = sum(len(words) > opt.max_caption_len for captions in tokenized for words in captions)
    print(f"{opt.caption_data_path}: {len(ix2id)} images, {sum(map(len, encoded))} captions, "
          f"vocabulary {len(ix2word)} words; skipped {empty} empty captions and "
          f"{dropped} images left with none; truncated {truncated}; "
          f"round trip checked on {checked} captions")


if __name__ == "__main__":
    fire.Fire({"process": process})

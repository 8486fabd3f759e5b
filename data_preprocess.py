"""Step 1: a caption file (AI Challenger, COCO or Karpathy JSON, Flickr8k-CN lines, CSV/TSV: see
caption_formats.py) -> jieba words -> vocabulary -> one caption .pth.

    python data_preprocess.py process --annotation-file=train.json --caption-data-path=caption.pth
    python data_preprocess.py process --annotation-file=val.json --caption-data-path=caption_val.pth \\
        --vocab-from=caption.pth
"""
import collections
import os
import sys

import fire
from tqdm import tqdm

from captions import EOS, PAD, UNKNOWN, clean, load_annotations, load_caption_data, tokenize
from config import Config, UserError, command
from files import atomic_save, check_output_file

README = """word2ix: word -> index; ix2word: index -> word (a list)
id2ix: image_id -> row; ix2id: row -> image_id (row i of the features file is image ix2id[i])
caption[row]: the captions of that image, each a list of word indices (no </EOS>)
sentences[row]: the same captions as text, cleaned (the references for scoring)
extra_caption[row]: more training text of that image (--extra-annotation-file), encoded as caption
padding, end, unknown: the special tokens; dropped: annotation entries with no usable caption"""


SPECIAL = (PAD, EOS, UNKNOWN)


def build_vocabulary(tokenized, max_words, min_appear):
    """The max_words most frequent words seen at least min_appear times, after the special tokens."""
    counts = collections.Counter(word for captions in tokenized for words in captions for word in words)
    frequent = [word for word, count in counts.most_common() if count >= min_appear][:max_words]
    return [*SPECIAL, *frequent]


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


def _warn_unknown_words(encoded, unknown, opt):
    """Say so when most words of the captions are </UNKNOWN>: the model would learn little else."""
    words = [ix for captions in encoded for caption in captions for ix in caption]
    share = words.count(unknown) / max(1, len(words))
    if share > 0.5:
        cause = "not in the vocabulary of " + opt.vocab_from if opt.vocab_from else (
            f"seen fewer than --min-appear={opt.min_appear} times; a small data set needs --min-appear=1")
        print(f"warning: {share:.0%} of the words are </UNKNOWN> ({cause})", file=sys.stderr)


def tokenize_entries(entries, description):
    """Each entry's captions as jieba word lists (empty captions left out) -> (lists, empty captions)."""
    tokenized, empty = [], 0
    for entry in tqdm(entries, desc=f"jieba {description}", unit="image"):
        words = [tokenize(sentence) for sentence in entry["caption"]]
        empty += sum(not w for w in words)
        tokenized.append([w for w in words if w])
    return tokenized, empty


def extra_files(files):
    """The --extra-annotation-file list (comma-separated) as paths; an empty name in it is refused."""
    paths = [path.strip() for path in files.split(",")] if files else []
    if "" in paths:
        raise UserError(f"--extra-annotation-file={files}: an empty file name in the list")
    return paths


def extra_text(paths, image_ids):
    """The word lists of the extra annotation files for each of image_ids, in that order ([] for an
    image they lack); a file that captions none of these images is refused."""
    extra = {image_id: [] for image_id in image_ids}
    for path in paths:
        entries = [entry for entry in load_annotations(path) if entry["image_id"] in extra]  # the others: unused
        if not entries:
            raise UserError(f"{path}: captions none of the images of --annotation-file; the extra text must be "
                            "about the same images")
        tokenized = tokenize_entries(entries, os.path.basename(path))[0]
        if not any(tokenized):
            raise UserError(f"{path}: no caption of its images has a word left once 。 and spaces are removed; "
                            "it adds nothing")
        for entry, words in zip(entries, tokenized):
            extra[entry["image_id"]].extend(words)
    return [extra[image_id] for image_id in image_ids]


@command
def process(opt: Config):
    """Encode opt.annotation_file (and opt.extra_annotation_file) into opt.caption_data_path."""
    if not opt.annotation_file:
        raise UserError("give the captions to encode with --annotation-file=FILE.json")
    extra_paths = extra_files(opt.extra_annotation_file)
    for path in extra_paths:
        if os.path.exists(path) and os.path.exists(opt.annotation_file) and os.path.samefile(path, opt.annotation_file):
            raise UserError(f"--extra-annotation-file={path} is --annotation-file itself: it adds nothing; "
                            "leave it out")
    check_output_file(opt.caption_data_path, inputs=[opt.annotation_file, *extra_paths])
    entries = load_annotations(opt.annotation_file, opt.split)
    vocabulary = load_caption_data(opt.vocab_from)["ix2word"] if opt.vocab_from else None  # read first
    tokenized, empty = tokenize_entries(entries, os.path.basename(opt.annotation_file))
    kept = [i for i, captions in enumerate(tokenized) if captions]
    dropped = len(entries) - len(kept)
    entries, tokenized = [entries[i] for i in kept], [tokenized[i] for i in kept]
    if not entries:
        raise UserError(f"{opt.annotation_file}: no caption has a word left once 。 and spaces are removed; "
                        "nothing to encode")
    ix2id = [entry["image_id"] for entry in entries]
    extra = extra_text(extra_paths, ix2id)
    ix2word = vocabulary or build_vocabulary(tokenized + extra, opt.max_words, opt.min_appear)  # of all the text
    if len(ix2word) == len(SPECIAL):
        raise UserError(f"{opt.annotation_file}: no word appears --min-appear={opt.min_appear} times; "
                        "lower --min-appear")
    word2ix = {word: ix for ix, word in enumerate(ix2word)}
    encoded = encode(tokenized, word2ix, opt.max_caption_len)
    sentences = [[clean(s) for s in entry["caption"] if clean(s)] for entry in entries]
    checked = check_round_trip(ix2id, sentences, encoded, ix2word, opt.max_caption_len)
    data = {
        "word2ix": word2ix, "ix2word": ix2word,
        "id2ix": {image_id: ix for ix, image_id in enumerate(ix2id)}, "ix2id": ix2id,
        "caption": encoded, "sentences": sentences, "extra_caption": encode(extra, word2ix, opt.max_caption_len),
        "padding": PAD, "end": EOS, "unknown": UNKNOWN, "readme": README,
        "annotation_file": os.path.abspath(opt.annotation_file),
    }
    atomic_save(data, opt.caption_data_path)
    truncated = sum(len(words) > opt.max_caption_len for captions in tokenized for words in captions)
    total = sum(map(len, encoded))
    extra_total = sum(map(len, extra))
    more = f" (and {extra_total} extra training captions for {sum(map(bool, extra))} images)" if extra_total else ""
    print(f"{opt.caption_data_path}: {len(ix2id)} images, {total} captions{more}, vocabulary {len(ix2word)} words; "
          f"skipped {empty} empty captions and "
          f"{dropped} images left with none; truncated {truncated}; round trip checked on {checked} of "
          f"{total} captions (the others hold </UNKNOWN> words or were truncated)")
    _warn_unknown_words(encoded, word2ix[UNKNOWN], opt)


if __name__ == "__main__":
    fire.Fire({"process": process})

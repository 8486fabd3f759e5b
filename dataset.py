"""Caption data + features as training batches, and the train/validation split."""
import functools
import os

import numpy as np
import torch

from captions import Habits, load_caption_data, repeated_words, special_indices, unfinished_words
from config import Config, UserError
from feature_reads import row_reader
from images import load_features
from model import READS_REGIONS


class CaptionSplit:
    """The usable images of one caption file (or a subset of its rows) with their features.

    Everything else reads the caption data through its accessors."""

    def __init__(self, caption_data, features, meta, rows, extra_text=True):
        self._data, self._features, self.meta, self.extra_text = caption_data, features, meta, extra_text
        self.rows = np.asarray(rows, dtype=np.int64)
        self.ix2word = caption_data["ix2word"]
        self.end, self.banned = special_indices(self.ix2word)  # </EOS>; </PAD> and </UNKNOWN>
        self.unknown = caption_data["word2ix"][caption_data["unknown"]]
        self.feature_dim = features.shape[-1]
        self._reader = row_reader(features)
        extra, captions = caption_data.get("extra_caption") if extra_text else None, caption_data["caption"]
        # what cross-entropy learns from: the captions, then any extra text (the references stay the captions)
        self._training_captions = [own + more for own, more in zip(captions, extra)] if extra else captions
        self.pairs = self.pairs_of(self.rows)  # one (row, caption number) pair per training caption
        self._pair_rows = np.array([row for row, _ in self.pairs], dtype=np.int64)  # (P,) the row of each pair

    @functools.cached_property
    def habits(self):
        """What no caption should do (end on 一个, say 的 twice in a row...), read from the captions of
        every row of the file."""
        return Habits(tuple(unfinished_words(self._data["caption"], self.ix2word)),
                      tuple(repeated_words(self._data["caption"])))

    @property
    def has_extra_text(self):
        return self.extra_text and any(self._data.get("extra_caption") or [])

    def without_extra_text(self):
        """The same rows, learning from their captions alone."""
        return CaptionSplit(self._data, self._features, self.meta, self.rows, extra_text=False)

    @property
    def features(self):
        return self._features

    @property
    def image_ids(self):
        return self._data["ix2id"]

    def with_features(self, features):
        """The same rows with other features (indexed by row like the stored ones)."""
        return CaptionSplit(self._data, features, self.meta, self.rows, self.extra_text)

    # --- accessors ---
    def image_id(self, row):
        return self._data["ix2id"][row]

    def image_path(self, row):
        return os.path.join(self.meta["img_path"], self.image_id(row))

    def human_caption(self, row):
        """The first reference caption of a row, as text."""
        return self._data["sentences"][row][0]

    def sentences(self, row):
        """The reference sentences of a row."""
        return self._data["sentences"][row]

    def training_text(self, row):
        """Every training caption of a row (the captions, then any extra text), as text."""
        return ["".join(self.ix2word[ix] for ix in caption) for caption in self._training_captions[row]]

    def references(self, rows):
        """{image_id: reference sentences} of rows (for scoring)."""
        return {self.image_id(row): self.sentences(row) for row in rows}

    def pairs_of(self, rows):
        """(row, caption number) of every training caption of rows."""
        return [(row, i) for row in rows for i in range(len(self._training_captions[row]))]

    def word_captions(self):
        """{row: its captions (the references, no extra text) as word-index lists} for every row of the split."""
        return {int(row): self._data["caption"][row] for row in self.rows}

    def features_of(self, rows):
        """rows (B,) -> features (B, F) or regions (B, R, F), float32."""
        return self.stored_features_of(rows).float()

    def stored_features_of(self, rows):
        """rows (B,) -> features (B, F) or (B, R, F) as stored (float16: half the bytes to move; the device
        makes them float32; int8 features come dequantized, as float32): read from the file with one pread per run of
        consecutive rows (feature_reads.RowReader), or indexed where they are in memory."""
        rows = np.asarray(rows)
        return torch.from_numpy(np.ascontiguousarray(self._reader.read(rows) if self._reader else self._features[rows]))

    # --- batches ---
    # A batch is `batch_size` rows of the whole run; under torchrun each of the `processes` takes
    # every processes-th of them, from `process` on (DistributedSampler's split, batch by batch).
    # `block` > 1 shuffles blocks of that many consecutive rows of the file instead of single captions
    # (--read-block): a batch then reads a few runs of consecutive rows, which a disk serves sequentially,
    # and each process takes a stretch of it, so that its rows stay in runs.
    def batches(self, batch_size, seed=None, skip=0, process=0, processes=1, block=1):
        """Yield (rows (b,), features (b, F) as stored, captions (b, T), lengths (b,)): this process's share of
        each batch. Shuffled by `seed`; the first `skip` batches are left out (to resume mid-epoch)."""
        for chunk in _shuffled_chunks(self._pair_rows, batch_size, seed, skip, process, processes, block):
            yield self.collate([self.pairs[i] for i in chunk])

    def image_batches(self, batch_size, seed, skip=0, process=0, processes=1, block=1):
        """Yield (rows (b,), features (b, F) as stored): each image once, shuffled by `seed`, shared as batches are."""
        for rows in self.row_batches(batch_size, seed, skip, process, processes, block):
            yield rows, self.stored_features_of(rows)

    def row_batches(self, batch_size, seed, skip=0, process=0, processes=1, block=1):
        """This process's rows (b,) of each batch of images, shuffled by `seed`."""
        return [self.rows[chunk] for chunk in _shuffled_chunks(self.rows, batch_size, seed, skip, process,
                                                                processes, block)]

    def num_batches(self, batch_size, images=False, processes=1):
        return len(_batch_starts(len(self.rows) if images else len(self.pairs), batch_size, processes))

    def collate(self, pairs):
        """(row, caption number) pairs -> rows (B,), features (B, F) as stored, captions (B, T), lengths (B,)."""
        rows = np.array([row for row, _ in pairs])
        return rows, self.stored_features_of(rows), *self.captions_of(pairs)

    def captions_of_images(self, rows):
        """rows (b,) -> all their captions (n, T), lengths (n,) (see captions_of), the image of each (n,)."""
        pairs = self.pairs_of(rows)
        index = {row: k for k, row in enumerate(rows)}
        return *self.captions_of(pairs), torch.tensor([index[row] for row, _ in pairs])

    def grouped_batches(self, images, seed, skip=0, process=0, processes=1, block=1):
        """Yield (rows (b,), features (b, ...) as stored, captions (n, T), lengths (n,), image of each (n,)):
        batches of `images` whole images with all their captions, shuffled and shared as row_batches."""
        for rows in self.row_batches(images, seed, skip, process, processes, block):
            yield rows, self.stored_features_of(rows), *self.captions_of_images(rows)

    def images_per_batch(self, captions):
        """Whole images to a batch of about `captions` captions."""
        return max(1, round(captions * len(self.rows) / len(self.pairs)))

    def captions_of(self, pairs):
        """(row, caption number) pairs -> captions (B, T) ending in </EOS>, padded with </PAD> (0),
        and lengths (B,) counting the </EOS>."""
        sentences = [self._training_captions[row][i] + [self.end] for row, i in pairs]
        lengths = torch.tensor([len(s) for s in sentences])
        captions = torch.zeros(len(pairs), int(lengths.max()), dtype=torch.long)  # (B, T)
        for b, sentence in enumerate(sentences):
            captions[b, :len(sentence)] = torch.tensor(sentence)
        return captions, lengths


def _batch_starts(count, batch_size, processes):
    """Where the batches of range(count) start; a last batch too small to give every process a row
    joins the one before."""
    starts = list(range(0, count, batch_size))
    if len(starts) > 1 and count - starts[-1] < processes:
        starts.pop()
    return starts


def _shuffled_chunks(rows, batch_size, seed, skip, process=0, processes=1, block=1):
    """This process's share of each batch of positions into `rows` (the file row of each item, ascending),
    shuffled by `seed` (None: in order), the first `skip` batches left out."""
    order = np.arange(len(rows)) if seed is None else read_order(rows, seed, block)
    starts = _batch_starts(len(rows), batch_size, processes)
    for start, stop in list(zip(starts, [*starts[1:], len(rows)]))[skip:]:
        batch = order[start:stop]  # in blocks, each process takes a stretch of the batch: its runs stay runs
        yield batch[process::processes] if block <= 1 else np.array_split(batch, processes)[process]


def read_order(rows, seed, block):
    """rows (n,) -> the positions (n,) in a random order: with block > 1, the blocks of rows r // block
    in a random order, each block's items shuffled within it."""
    rng = np.random.default_rng(seed)
    if block <= 1 or not len(rows):
        return rng.permutation(len(rows))
    blocks = np.asarray(rows) // block
    place = rng.permutation(int(blocks.max()) + 1)  # where each block goes
    return np.lexsort((rng.random(len(rows)), place[blocks]))


def training_views(opt: Config, split):
    """The training features of each of --feature-views views of the photos (view 0: the split's own),
    each checked to come from the split's encoder; view e % N is read in epoch e."""
    grid, views = opt.model in READS_REGIONS, [split.features]
    for view in range(1, opt.feature_views):
        features, meta = load_features(opt.caption_data_path, split.image_ids, grid, view)
        if _encoder(meta, grid) != _encoder(split.meta, grid):
            raise UserError(f"{opt.caption_data_path}: view {view}'s features come from {_encoder(meta, grid)}, "
                            f"view 0's from {_encoder(split.meta, grid)}; extract them with the same --backbone")
        views.append(features)
    return views


def load_split(caption_data_path, ix2word=None, grid=False):
    """Caption data, its features (regions with grid) and usable rows; optionally checked to share
    the vocabulary ix2word."""
    data = load_caption_data(caption_data_path)
    if ix2word is not None and data["ix2word"] != ix2word:
        raise UserError(f"{caption_data_path}: another vocabulary than the training data; "
                        "encode it with --vocab-from=<training caption .pth>")
    features, meta = load_features(caption_data_path, data["ix2id"], grid)
    usable = [row for row in range(len(data["ix2id"])) if str(row) not in meta["bad"]]
    if not usable:
        raise UserError(f"{caption_data_path}: none of its images could be read at extraction; nothing to train on")
    return data, features, meta, usable


def _encoder(meta, grid):
    """What made a features file, as far as the model sees it."""
    return f"{meta['backbone']} {meta['weights']}" + (f" {meta['grid']}x{meta['grid']} regions" if grid else "")


def train_val_splits(opt: Config):
    """(train, val) CaptionSplits: the val file when given, else a seeded fraction of the images.
    The attention model reads region features, the pooled one pooled features. Validation (its loss
    too) reads the captions only, never the extra training text."""
    grid = opt.model in READS_REGIONS
    data, features, meta, usable = load_split(opt.caption_data_path, grid=grid)
    if opt.val_caption_data_path:
        val_data, val_features, val_meta, val_usable = load_split(opt.val_caption_data_path, data["ix2word"], grid)
        train_encoder, val_encoder = (_encoder(m, grid) for m in (meta, val_meta))
        if train_encoder != val_encoder:
            raise UserError(f"{opt.val_caption_data_path}: features from {val_encoder}, "
                            f"training features from {train_encoder}")
        return (CaptionSplit(data, features, meta, usable),
                CaptionSplit(val_data, val_features, val_meta, val_usable, extra_text=False))
    shuffled = np.random.default_rng(opt.seed).permutation(usable)
    held_out = max(1, int(len(shuffled) * opt.val_fraction))
    if held_out >= len(shuffled):
        raise UserError(f"{opt.caption_data_path}: too few usable images ({len(usable)}) to hold out validation data")
    return (CaptionSplit(data, features, meta, sorted(shuffled[held_out:])),
            CaptionSplit(data, features, meta, sorted(shuffled[:held_out]), extra_text=False))

"""How specific a caption is: an image-caption retrieval model (VSE++, Faghri et al., 2018) asked which
photo a caption describes.

A photo's pooled features go through a linear map, a caption's words through embeddings and a GRU, both
into one space where the cosine says how well they match. Training (`main.py retrieval`, the training
split only) pushes each photo's caption above the other captions of its batch and each caption's photo
above the other photos, by a margin, counting only the hardest negative (VSE++'s max of hinges). A
caption's rank among the scored photos (1: its own photo first) measures how specific it is: a caption
that fits many photos (一群人在街道上) ranks its own photo low.
"""
import dataclasses
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence
from tqdm import tqdm

from captions import EOS, UNKNOWN, tokenize, vocabulary_problem
from config import Config, UserError
from dataset import load_split
from files import atomic_save, load_pth
from model import checksum

JOINT, WORD_DIM, MARGIN, WARM_UP_EPOCHS = 512, 300, 0.2, 2
KEYS = ("kind", "model", "config", "ix2word", "end", "feature")


class RetrievalModel(nn.Module):
    """Photos and captions into one space of unit vectors (JOINT wide)."""

    def __init__(self, vocab_size, feature_dim, joint=JOINT, word_dim=WORD_DIM):
        super().__init__()
        self.image = nn.Linear(feature_dim, joint)
        self.embedding = nn.Embedding(vocab_size, word_dim)
        self.gru = nn.GRU(word_dim, joint, batch_first=True)

    def photos(self, features):
        """Pooled features (B, F) -> (B, D) unit vectors."""
        return F.normalize(self.image(features), dim=-1)

    def captions(self, words, lengths):
        """Padded word indices (B, T) and their lengths (B,) -> (B, D) unit vectors: the GRU's last state."""
        packed = pack_padded_sequence(self.embedding(words), lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, last = self.gru(packed)  # (1, B, D)
        return F.normalize(last[0], dim=-1)


def hardest_negative_loss(photos, captions, margin=MARGIN, hardest=True):
    """photos (B, D) and their captions (B, D), row i matching row i -> the sum over the batch of the
    hinge on the hardest other caption of each photo and the hardest other photo of each caption
    (hardest=False: on every other one, VSE0's sum of hinges, which a model from scratch learns from
    first: the hardest negatives alone give it little to start with)."""
    scores = photos @ captions.T  # (B, B): photo i against caption j
    matching = scores.diag()
    others = torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    against_captions = (margin + scores - matching.view(-1, 1)).clamp(min=0).masked_fill(others, 0)
    against_photos = (margin + scores - matching.view(1, -1)).clamp(min=0).masked_fill(others, 0)
    if not hardest:
        return against_captions.sum() + against_photos.sum()
    return against_captions.max(1).values.sum() + against_photos.max(0).values.sum()


@dataclasses.dataclass
class Retrieval:
    """A trained retrieval model with its vocabulary, ready to score captions against photos."""

    model: RetrievalModel
    word2ix: dict
    feature: dict  # the features it reads: backbone, weights, feature_dim

    def embed_captions(self, texts):
        """Caption texts -> (N, D), cut into words by jieba."""
        return self.embed_words([tokenize(text) for text in texts])

    @torch.no_grad()
    def embed_words(self, captions, batch_size=256):
        """Captions as word lists -> (N, D): unknown words as </UNKNOWN> (an empty caption: </EOS>)."""
        unknown, end = self.word2ix[UNKNOWN], self.word2ix[EOS]
        rows = [[self.word2ix.get(word, unknown) for word in words] or [end] for words in captions]
        return torch.cat([self._embed(rows[start:start + batch_size]) for start in range(0, len(rows), batch_size)])

    def _embed(self, rows):
        lengths = torch.tensor([len(row) for row in rows])
        words = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for i, row in enumerate(rows):
            words[i, :len(row)] = torch.tensor(row)
        return self.model.captions(words, lengths)

    @torch.no_grad()
    def similarity(self, texts, features):
        """Captions (B texts) against photos' pooled features (N, F) -> cosines (B, N)."""
        return self.embed_captions(texts) @ self.model.photos(features.float()).T

    def ranks(self, texts, features):
        """Caption i of texts describes photo i of features (N, F) -> the rank of each caption's own photo
        among all N (1: first), (N,)."""
        scores = self.similarity(texts, features)  # (N, N)
        own = scores.diag().unsqueeze(1)
        return (scores > own).sum(1) + 1


@torch.no_grad()
def batch_discriminability(retrieval, captions, features, samples):
    """How well each caption picks its own photo out of a batch (Luo et al., 2018): minus the VSE++ hinge
    of its photo against the hardest other photo. captions: `samples` word lists per photo, photo by photo;
    features: the photos' pooled features (B, F) -> (B * samples,) in [-(2 + MARGIN), 0]."""
    scores = retrieval.embed_words(captions) @ retrieval.model.photos(features.float()).T  # (N, B)
    own_photo = torch.arange(len(features)).repeat_interleave(samples)  # (N,)
    own = scores.gather(1, own_photo.unsqueeze(1))  # (N, 1)
    hinges = (MARGIN + scores - own).clamp(min=0)  # (N, B)
    hinges[torch.arange(len(scores)), own_photo] = 0  # a photo is not its own negative
    return -hinges.max(1).values


def recall(ranks):
    """Ranks (N,) -> {R@1, R@5 (shares), median rank}."""
    ranks = ranks.float()
    return {"R@1": float((ranks <= 1).float().mean()), "R@5": float((ranks <= 5).float().mean()),
            "median_rank": float(ranks.median())}


def train(opt: Config):
    """Train on --caption-data-path's captions and pooled features, --retrieval-epoch epochs (one random
    caption of each photo per epoch, so no photo is its own negative; the first WARM_UP_EPOCHS on the
    sum of hinges); with --val-caption-data-path keep the epoch whose captions of the first --eval-size val
    photos find their photos best (R@1), so the other val photos stay unseen -> writes --retrieval-ckpt."""
    torch.manual_seed(opt.seed)
    data, features, meta, rows = load_split(opt.caption_data_path)
    val = None
    if opt.val_caption_data_path and opt.eval_size:
        *val, val_rows = load_split(opt.val_caption_data_path, data["ix2word"])
        val = (*val, val_rows[:opt.eval_size])
    model = RetrievalModel(len(data["ix2word"]), features.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=opt.lr)
    rng, best = np.random.default_rng(opt.seed), -math.inf
    for epoch in range(opt.retrieval_epoch):
        model.train()
        order = rng.permutation(rows)
        for start in tqdm(range(0, len(order), opt.batch_size), desc=f"retrieval epoch {epoch + 1}", unit="batch"):
            batch = order[start:start + opt.batch_size]
            if len(batch) < 2:
                continue
            captions = [data["caption"][row][rng.integers(len(data["caption"][row]))] for row in batch]
            lengths = torch.tensor([len(c) for c in captions])
            words = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long)
            for i, caption in enumerate(captions):
                words[i, :len(caption)] = torch.tensor(caption)
            photos = model.photos(torch.from_numpy(np.asarray(features[batch], dtype=np.float32)))
            loss = hardest_negative_loss(photos, model.captions(words, lengths), hardest=epoch >= WARM_UP_EPOCHS)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 2.0)
            optimizer.step()
        score = validate(model, data["ix2word"], meta, val) if val else epoch
        print(f"retrieval epoch {epoch + 1}: " + (f"caption->photo R@1 {score:.3f} among the first {len(val[3])} val "
                                                  "photos" if val else "trained"))
        if score > best:
            best = score
            save(opt.retrieval_ckpt, model, data["ix2word"], meta)
    print(f"{opt.retrieval_ckpt}: the retrieval model" + (f" (R@1 {best:.3f} among the first {len(val[3])} val "
                                                          "photos)" if val else ""))


def validate(model, ix2word, meta, val):
    """Caption->photo R@1 of the val rows' first captions among their photos."""
    data, features, _, rows = val
    model.eval()
    retrieval = Retrieval(model, {word: ix for ix, word in enumerate(ix2word)}, meta)
    texts = [data["sentences"][row][0] for row in rows]
    return recall(retrieval.ranks(texts, torch.from_numpy(np.asarray(features[rows], dtype=np.float32))))["R@1"]


def save(path, model, ix2word, meta):
    """The weights, vocabulary and the features they read, with a checksum, written atomically."""
    config = {"joint": model.image.out_features, "word_dim": model.embedding.embedding_dim}
    feature = {"backbone": meta["backbone"], "weights": meta["weights"], "feature_dim": model.image.in_features}
    checkpoint = {"kind": "retrieval", "model": model.state_dict(), "config": config, "ix2word": ix2word, "end": EOS,
                  "feature": feature}
    atomic_save({**checkpoint, "checksum": checksum(checkpoint)}, path)


def load(path):
    """A retrieval checkpoint -> Retrieval, checked (its kind, vocabulary, sizes and checksum)."""
    checkpoint = load_pth(path, "retrieval checkpoint", KEYS)
    if checkpoint["kind"] != "retrieval":
        raise UserError(f"{path}: not a retrieval checkpoint (main.py retrieval writes them)")
    config, feature = checkpoint["config"], checkpoint["feature"]
    problem = vocabulary_problem(checkpoint["ix2word"])
    if not problem and not (isinstance(config, dict) and isinstance(feature, dict) and all(
            isinstance(value, int) and value > 0 for value in (config.get("joint"), config.get("word_dim"),
                                                                feature.get("feature_dim")))
            and isinstance(feature.get("backbone"), str) and isinstance(feature.get("weights"), str)):
        problem = "its sizes or feature description (backbone, weights, feature_dim) are missing or wrong"
    if not problem and checkpoint.get("checksum") != checksum(checkpoint):
        problem = "its weights or vocabulary differ from what was saved (checksum): the file is damaged"
    if problem:
        raise UserError(f"{path}: not a usable retrieval checkpoint: {problem}")
    ix2word = checkpoint["ix2word"]
    model = RetrievalModel(len(ix2word), feature["feature_dim"], config["joint"], config["word_dim"])
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, TypeError) as error:
        raise UserError(f"{path}: its weights do not fit a retrieval model ({str(error)[:150]})") from None
    return Retrieval(model.eval(), {word: ix for ix, word in enumerate(ix2word)}, feature)


def pooled_features(retrieval, caption_data_path):
    """A caption file's caption data and pooled features (memory-mapped, by row), checked to be what the
    retrieval model reads."""
    data, features, meta, _ = load_split(caption_data_path)
    if (meta["backbone"], meta["weights"]) != (retrieval.feature["backbone"], retrieval.feature["weights"]):
        raise UserError(f"{caption_data_path}: features from {meta['backbone']} {meta['weights']}; the retrieval "
                        f"model reads {retrieval.feature['backbone']} {retrieval.feature['weights']}'s")
    return data, features


def photo_features(retrieval, caption_data_path, image_ids):
    """The pooled features of image_ids from a caption file's features, checked -> (N, F) float32."""
    data, features = pooled_features(retrieval, caption_data_path)
    missing = [image_id for image_id in image_ids if image_id not in data["id2ix"]]
    if missing:
        raise UserError(f"{caption_data_path}: has no features of {len(missing)} scored images, e.g. {missing[0]!r}")
    rows = [data["id2ix"][image_id] for image_id in image_ids]
    return torch.from_numpy(np.asarray(features[rows], dtype=np.float32))

"""Beam search over a batch of images and all their beams at once.

At each time step one model step runs for all live beams of the images still searching (one
beam per image at the first step, then K). Every live beam may end there: its caption + </EOS>
joins the image's pool of finished captions, ranked by score / length**length_norm (length
counts the </EOS>). The K live beams are the best continuations by other words, so a finished
caption never competes with live ones. The n-best of the pool are returned. </PAD> and
</UNKNOWN> are never emitted. Beam size 1 is greedy decoding.

A model decodes through the interface model.py describes (start, step, embed, select,
attention); with an attention model each caption comes with the region weights of its words.
"""
import contextlib

import torch
from torch.nn import functional as F

from captions import special_indices
from config import UserError


@contextlib.contextmanager
def native_kernels():
    """PyTorch's own CPU kernels instead of oneDNN's: for a search's small batches its LSTM is as fast
    or faster (1.7x for one image), and generate's peak memory is 7 MB lower."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


@torch.no_grad()
@native_kernels()
def beam_search(model, features, end, banned=(), beam_size=3, max_len=30, length_norm=0.0, n_best=1, min_len=1,
                unfinished=()):
    """features (B, F) or regions (B, R, F) -> for each image, up to n_best (word indices, score,
    attention) triples, best first.

    A caption has min_len to max_len words and stops before </EOS> (index `end`); its score is its
    log-probability / length**length_norm; `banned` word indices are never emitted, and a caption
    never ends on an `unfinished` word (一个, 的 ...) before max_len. attention is each word's region
    weights (words, R), or None for a model without attention.
    """
    batch, k, vocab = features.size(0), beam_size, model.vocab_size
    check_search(n_best, k, vocab - 1 - len(banned), min_len, max_len)
    device = features.device
    banned = torch.as_tensor(banned, dtype=torch.long, device=device)
    with_end = torch.cat([banned, banned.new_tensor([end])])  # before min_len words a caption cannot end
    cannot_end = torch.zeros(vocab, dtype=torch.bool, device=device)  # (V,): the unfinished words
    cannot_end[list(unfinished)] = True
    inputs, state = model.start(features)  # one beam per image at first: (B, E)
    going = torch.arange(batch, device=device)  # (A,) the images still searching: A rows of what follows
    scores = torch.zeros(batch, 1, device=device)  # (A, beams): the live captions' log-probabilities
    tokens = torch.zeros(batch, 1, 0, dtype=torch.long, device=device)  # (A, beams, t)
    regions = model.attention(state)  # (B, R) or None: does the model attend?
    weights = None if regions is None else regions.new_zeros(batch, 1, 0, regions.size(-1))  # (A, beams, t, R)
    pool_scores, pool_tokens, pool_weights = [], [], []  # per step: (B, K), (B, beams, t), (B, beams, t, R)
    best_finished = scores.new_full((batch, n_best), float("-inf"))  # (A, n_best) pool scores so far
    for t in range(max_len + 1):
        log_probs, state = model.step(inputs, state, banned if t >= min_len else with_end)
        total = scores.unsqueeze(-1) + log_probs.view(len(going), -1, vocab)  # (A, beams, V)
        if 0 < t < max_len:
            total[:, :, end].masked_fill_(cannot_end[tokens[:, :, -1]], float("-inf"))  # by each beam's last word
        finished = total[:, :, end] / (t + 1) ** length_norm  # (A, beams): -inf before min_len words
        best_finished = torch.cat([best_finished, finished], 1).topk(n_best, dim=1).values
        finished = F.pad(finished, (0, k - finished.size(1)), value=float("-inf"))  # (A, K)
        pool_scores.append(_every_image(finished, going, batch, float("-inf")))
        pool_tokens.append(_every_image(tokens, going, batch, 0))
        pool_weights.append(None if weights is None else _every_image(weights, going, batch, 0.0))
        if t == max_len:
            break
        total[:, :, end] = float("-inf")  # live beams go on with other words
        beams = total.size(1)
        scores, best = total.view(len(going), -1).topk(k, dim=1)  # (A, K)
        parent, word = best // vocab, best % vocab  # (A, K) each
        tokens = torch.cat([_follow(tokens, parent), word.unsqueeze(-1)], -1)
        if weights is not None:
            step_weights = model.attention(state).view(len(going), beams, 1, -1)  # (A, beams, 1, R)
            weights = torch.cat([_follow(weights, parent), _follow(step_weights, parent)], 2)  # (A, K, t+1, R)
        state_rows = parent + torch.arange(len(going), device=device).unsqueeze(1) * beams  # (A, K)
        if length_norm == 0:
            # Unnormalised scores only fall: once an image's n_best-th finished caption beats its best live
            # beam, no later caption can enter its n-best, and its beams leave the batch.
            searching = best_finished[:, -1] < scores.max(1).values  # (A,)
            if not bool(searching.any()):
                break
            if not bool(searching.all()):
                keep = searching.nonzero().squeeze(1)
                going, scores, tokens, best_finished, word, state_rows = (
                    x[keep] for x in (going, scores, tokens, best_finished, word, state_rows))
                weights = None if weights is None else weights[keep]
        state = model.select(state, state_rows)
        inputs = model.embed(word.view(-1))  # (A*K, E)
    return _n_best(torch.cat(pool_scores, 1), pool_tokens, pool_weights, k, n_best)


def check_search(n_best, beam_size, usable_words, min_len=1, max_len=30):
    """Refuse a search that cannot run: n_best <= beam_size <= the words a caption can use, min_len <= max_len."""
    if not 1 <= n_best <= beam_size <= usable_words:
        raise UserError(f"--n-best={n_best} and --beam-size={beam_size}: need n-best <= beam size <= the "
                        f"{usable_words} words this vocabulary's captions can use")
    if not 1 <= min_len <= max_len:
        raise UserError(f"--min-len={min_len} and --max-gen-len={max_len}: need 1 <= min-len <= max-gen-len")


def _every_image(values, going, batch, fill):
    """values (A, ...) of the images still searching -> (B, ...), `fill` for the images done."""
    if len(going) == batch:
        return values
    return values.new_full((batch, *values.shape[1:]), fill).index_copy_(0, going, values)


def _follow(history, parent):
    """history (B, beams, ...) of each beam -> (B, K, ...) that of each new beam's parent, parent (B, K)."""
    index = parent.view(*parent.shape, *[1] * (history.dim() - 2)).expand(*parent.shape, *history.shape[2:])
    return history.gather(1, index)


def _n_best(pool_scores, pool_tokens, pool_weights, k, n_best):
    """pool_scores (B, steps*K) -> per image the n_best finite (words, score, attention), best first."""
    results = []
    values, indices = pool_scores.topk(min(n_best, pool_scores.size(1)), dim=1)
    for image, (image_values, image_indices) in enumerate(zip(values.tolist(), indices.tolist())):
        results.append([(pool_tokens[index // k][image, index % k].tolist(), value,
                         None if pool_weights[index // k] is None else pool_weights[index // k][image, index % k])
                        for value, index in zip(image_values, image_indices) if value != float("-inf")])
    return results


def caption_features(model, features, ix2word, opt, n_best=None, unfinished=()):
    """features (N, F) or regions (N, R, F) -> for each row, the n-best (caption text, score,
    words with their region weights [(word, (R,) weights)] or None), in batches of opt.batch_size;
    with --ending-rule no caption ends on an `unfinished` word index."""
    end, banned = special_indices(ix2word)
    unfinished = unfinished if opt.ending_rule else ()
    results = []
    for start in range(0, len(features), opt.batch_size):
        batch = features[start:start + opt.batch_size]  # (B, F) or (B, R, F)
        for beams in beam_search(model, batch, end, banned, opt.beam_size, opt.max_gen_len, opt.length_norm,
                                 n_best or opt.n_best, opt.min_len, unfinished):
            results.append([("".join(ix2word[ix] for ix in words), score,
                             None if weights is None else [(ix2word[ix], w.cpu()) for ix, w in zip(words, weights)])
                            for words, score, weights in beams])
    return results

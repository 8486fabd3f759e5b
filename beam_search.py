"""Beam search and diverse beam search over a batch of images and all their beams at once, and
caption_features, which captions features by every decoding method (--decoding; greedy decoding,
sampling and the rules all methods obey are in decoding.py).

At each time step one model step runs for all live beams of the images still searching (one
beam per image at the first step, then K). Every live beam may end there: its caption + </EOS>
joins the image's pool of finished captions, ranked by score / length**length_norm (length
counts the </EOS>). The K live beams are the best continuations by other words, so a finished
caption never competes with live ones. The n-best of the pool are returned. </PAD> and
</UNKNOWN> are never emitted.

Diverse beam search (Vijayakumar et al., 2018) splits the K beams into G groups of K/G, searched
group after group at each step: a continuation of a group's beams ranks by its log-probability
minus lambda x the times earlier groups chose its word at this step (Hamming diversity); the beams
keep their log-probabilities, which rank the finished captions. The n-best are each group's best
caption first (by score), then each group's second best, and so on, each caption once. One group
is beam search.

A model decodes through the interface model.py describes (start, step, embed, select,
attention); with an attention model each caption comes with the region weights of its words.
"""
import torch
from torch.nn import functional as F

from captions import NO_HABITS, special_indices
from decoding import (
    FLOAT32_LARGE,
    Rules,
    check_search,
    finished_prefix,
    greedy,
    image_generators,
    native_kernels,
    sample,
)


@torch.no_grad()
@native_kernels()
def beam_search(model, features, end, banned=(), beam_size=3, max_len=30, length_norm=0.0, n_best=1, min_len=1,
                unfinished=(), repeatable=None, groups=1, diversity=0.0):
    """features (B, F) or regions (B, R, F) -> for each image, up to n_best (word indices, score,
    attention) triples, best first.

    A caption has min_len to max_len words and stops before </EOS> (index `end`); its score is its
    log-probability / length**length_norm; `banned` word indices are never emitted, a caption never
    ends on an `unfinished` word (一个, 的 ...) before max_len, and no word but the `repeatable` ones
    (None: every word) follows itself. groups > 1: diverse beam search, penalty `diversity` (lambda).
    attention is each word's region weights (words, R), or None for a model without attention.
    """
    batch, k, vocab = features.size(0), beam_size, model.vocab_size
    check_search(n_best, k, vocab - 1 - len(banned), min_len, max_len, groups, repeatable)
    device = features.device
    rules = Rules(vocab, end, banned, min_len, max_len, unfinished, repeatable, device)
    inputs, state = model.start(features)  # one beam per image at first: (B, E)
    going = torch.arange(batch, device=device)  # (A,) the images still searching: A rows of what follows
    scores = torch.zeros(batch, 1, device=device)  # (A, beams): the live captions' log-probabilities
    tokens = torch.zeros(batch, 1, 0, dtype=torch.long, device=device)  # (A, beams, t)
    regions = model.attention(state)  # (B, R) or None: does the model attend?
    weights = None if regions is None else regions.new_zeros(batch, 1, 0, regions.size(-1))  # (A, beams, t, R)
    pool_scores, pool_tokens, pool_weights = [], [], []  # per step: (B, K), (B, beams, t), (B, beams, t, R)
    best_finished = scores.new_full((batch, groups, n_best), float("-inf"))  # (A, G, n_best) pool scores so far
    for t in range(max_len + 1):
        log_probs, state = rules.step(model, inputs, state, t, tokens[:, :, -1].reshape(-1) if t else None)
        total = scores.unsqueeze(-1) + log_probs.view(len(going), -1, vocab)  # (A, beams, V)
        finished = total[:, :, end] / (t + 1) ** length_norm  # (A, beams): -inf before min_len words
        finished = F.pad(finished, (0, k - finished.size(1)), value=float("-inf"))  # (A, K)
        best_finished = torch.cat([best_finished, finished.view(len(going), groups, -1)], 2).topk(n_best, 2).values
        pool_scores.append(_every_image(finished, going, batch, float("-inf")))
        pool_tokens.append(_every_image(tokens, going, batch, 0))
        pool_weights.append(None if weights is None else _every_image(weights, going, batch, 0.0))
        if t == max_len:
            break
        total[:, :, end] = float("-inf")  # live beams go on with other words
        beams = total.size(1)
        scores, parent, word = _choose(total, groups, k // groups, diversity)  # (A, K) each
        tokens = torch.cat([_follow(tokens, parent), word.unsqueeze(-1)], -1)
        if weights is not None:
            step_weights = model.attention(state).view(len(going), beams, 1, -1)  # (A, beams, 1, R)
            weights = torch.cat([_follow(weights, parent), _follow(step_weights, parent)], 2)  # (A, K, t+1, R)
        state_rows = parent + torch.arange(len(going), device=device).unsqueeze(1) * beams  # (A, K)
        if length_norm == 0:
            # Unnormalised scores only fall: once each group's n_best-th finished caption beats its best live
            # beam, no later caption can enter an n-best of the image, and its beams leave the batch.
            live_best = scores.view(len(going), groups, -1).max(2).values  # (A, G)
            searching = (best_finished[:, :, -1] < live_best).any(1)  # (A,)
            if not bool(searching.any()):
                break
            if not bool(searching.all()):
                keep = searching.nonzero().squeeze(1)
                going, scores, tokens, best_finished, word, state_rows = (
                    x[keep] for x in (going, scores, tokens, best_finished, word, state_rows))
                weights = None if weights is None else weights[keep]
        state = model.select(state, state_rows)
        inputs = model.embed(word.view(-1))  # (A*K, E)
    return _n_best(torch.cat(pool_scores, 1), pool_tokens, pool_weights, k, n_best, groups)


def _choose(total, groups, width, diversity):
    """total (A, beams, V): the log-probability of every continuation, beams 1 (the first step) or
    groups * width -> the new beams' log-probabilities, parents (beam indices) and words, each
    (A, groups * width): group after group, the `width` best continuations of the group's own beams
    (at the first step, of the one beam), a word's rank lowered by diversity x the times earlier
    groups chose it at this step."""
    images, beams, vocab = total.shape
    chosen = total.new_zeros(images, vocab)  # (A, V): how often earlier groups chose each word
    diversity = min(diversity, FLOAT32_LARGE)  # an inf penalty x 0 choices would be NaN, which topk ranks first
    picks = []
    for group in range(groups):
        first = group * width if beams > 1 else 0
        own = total[:, first:first + width]  # (A, width, V), or (A, 1, V) at the first step
        penalised = own - diversity * chosen.unsqueeze(1) if group else own
        best = penalised.flatten(1).topk(width, dim=1).indices  # (A, width)
        word = best % vocab
        picks.append((own.flatten(1).gather(1, best), best // vocab + first, word))
        chosen.scatter_add_(1, word, word.new_ones(word.shape, dtype=chosen.dtype))
    return (torch.cat(part, 1) for part in zip(*picks))


def _every_image(values, going, batch, fill):
    """values (A, ...) of the images still searching -> (B, ...), `fill` for the images done."""
    if len(going) == batch:
        return values
    return values.new_full((batch, *values.shape[1:]), fill).index_copy_(0, going, values)


def _follow(history, parent):
    """history (B, beams, ...) of each beam -> (B, K, ...) that of each new beam's parent, parent (B, K)."""
    index = parent.view(*parent.shape, *[1] * (history.dim() - 2)).expand(*parent.shape, *history.shape[2:])
    return history.gather(1, index)


def _n_best(pool_scores, pool_tokens, pool_weights, k, n_best, groups):
    """pool_scores (B, steps*K) -> per image up to n_best different finite (words, score, attention):
    each group's best caption first (by score), then each group's second best, and so on."""
    batch, width = len(pool_scores), k // groups
    by_group = pool_scores.view(batch, -1, groups, width).transpose(1, 2).reshape(batch, groups, -1)  # (B, G, steps*w)
    values, indices = by_group.topk(min(n_best, by_group.size(2)), dim=2)  # (B, G, n)
    results = []
    for image, (image_values, image_indices) in enumerate(zip(values.tolist(), indices.tolist())):
        ranked = sorted((rank, -value, index // width * k + group * width + index % width)  # a column of pool_scores
                        for group, (group_values, group_indices) in enumerate(zip(image_values, image_indices))
                        for rank, (value, index) in enumerate(zip(group_values, group_indices))
                        if value != float("-inf"))
        captions = {}
        for _, value, column in ranked:
            step, beam = divmod(column, k)
            words = tuple(pool_tokens[step][image, beam].tolist())
            if words not in captions and len(captions) < n_best:
                captions[words] = (list(words), -value,
                                   None if pool_weights[step] is None else pool_weights[step][image, beam])
        results.append(list(captions.values()))
    return results


def decode(model, features, end, banned, opt, n_best=1, habits=NO_HABITS):
    """features (B, F) or regions (B, R, F) -> for each image its captions by opt.decoding, as
    (word indices, score, attention) best first: beam and diverse n_best, greedy one, sample n_best;
    the captions keep the training captions' `habits` (see captions.Habits.of)."""
    unfinished, repeatable = habits.of(opt)
    if opt.decoding in ("beam", "diverse"):
        groups = (opt.diversity_groups or opt.beam_size) if opt.decoding == "diverse" else 1
        return beam_search(model, features, end, banned, opt.beam_size, opt.max_gen_len, opt.length_norm, n_best,
                           opt.min_len, unfinished, repeatable, groups, opt.diversity_lambda)
    rules = Rules(model.vocab_size, end, banned, opt.min_len, opt.max_gen_len, unfinished, repeatable,
                  features.device)
    if opt.decoding == "greedy":
        return greedy(model, features, rules, opt.length_norm)
    return sample(model, features, rules, image_generators(features, opt.seed), n_best, opt.temperature, opt.top_k,
                  opt.top_p, opt.length_norm)


def most_captions(opt):
    """The most captions per photo opt's decoding gives: the beam's, one (greedy) or --n-best samples."""
    return {"greedy": 1, "sample": opt.n_best}.get(opt.decoding, opt.beam_size)


def caption_features(model, features, ix2word, opt, n_best=None, habits=NO_HABITS):
    """features (N, F) or regions (N, R, F) -> for each row, its captions by --decoding (n_best, default
    --n-best; greedy: one) as (caption text, score, words with their region weights [(word, (R,) weights)]
    or None), best first, in batches of opt.batch_size. The captions keep the training captions' habits
    (--ending-rule); one that ran to --max-gen-len without ending well is cut back to its finished prefix."""
    end, banned = special_indices(ix2word)
    unfinished = habits.of(opt).unfinished
    results = []
    for start in range(0, len(features), opt.batch_size):
        batch = features[start:start + opt.batch_size]  # (B, F) or (B, R, F)
        for captions in decode(model, batch, end, banned, opt, n_best or opt.n_best, habits):
            results.append([_said(finished_prefix(words, opt.max_gen_len, unfinished), score, weights, ix2word)
                            for words, score, weights in captions])
    return results


def _said(words, score, weights, ix2word):
    """A caption's word indices -> (text, score, [(word, its region weights)] or None)."""
    return ("".join(ix2word[ix] for ix in words), score,
            None if weights is None else [(ix2word[ix], w.cpu()) for ix, w in zip(words, weights)])

"""Beam search over a batch of images and all their beams at once.

At each time step one LSTM step runs for all B*K beams. A finished beam keeps its score
and competes with the live ones until the end; candidates are ranked by total
log-probability, and the final n-best by score / length**length_norm.
Beam size 1 is greedy decoding.
"""
import torch


@torch.no_grad()
def beam_search(model, features, end, beam_size=3, max_len=30, length_norm=0.0, n_best=1):
    """features (B, F) -> for each image, the n_best (word indices, score) pairs, best first.

    A caption's indices stop before </EOS> (index `end`); score is its normalised log-probability.
    """
    batch, k = features.size(0), beam_size
    vocab = model.classifier.out_features
    if not 1 <= n_best <= k <= vocab:
        raise ValueError(f"need 1 <= n_best ({n_best}) <= beam_size ({k}) <= vocabulary size ({vocab})")
    inputs, state = model.start(features)
    inputs = inputs.repeat_interleave(k, dim=0)  # (B*K, E)
    state = tuple(s.repeat_interleave(k, dim=1) for s in state)  # h, c: (layers, B*K, H)
    scores = torch.full((batch, k), float("-inf"), device=features.device)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive
    tokens = torch.zeros(batch, k, 0, dtype=torch.long, device=features.device)
    finished = torch.zeros(batch, k, dtype=torch.bool, device=features.device)
    # A finished beam's only continuation: </EOS> again, at no cost.
    frozen = torch.full((vocab,), float("-inf"), device=features.device)
    frozen[end] = 0.0
    for _ in range(max_len):
        log_probs, state = model.step(inputs, state)  # (B*K, V)
        log_probs = torch.where(finished.unsqueeze(-1), frozen, log_probs.view(batch, k, vocab))
        candidates = (scores.unsqueeze(-1) + log_probs).view(batch, k * vocab)  # (B, K*V)
        scores, best = candidates.topk(k, dim=1)  # (B, K)
        parent, word = best // vocab, best % vocab  # (B, K) each
        tokens = torch.cat([tokens.gather(1, parent.unsqueeze(-1).expand_as(tokens)), word.unsqueeze(-1)], -1)
        finished = finished.gather(1, parent) | (word == end)
        rows = (parent + torch.arange(batch, device=parent.device).unsqueeze(1) * k).view(-1)  # (B*K,)
        state = tuple(s[:, rows] for s in state)  # h, c: (layers, B*K, H)
        if finished.all():
            break
        inputs = model.embedding(word.view(-1))  # (B*K, E)
    return [_n_best(tokens[i].tolist(), scores[i].tolist(), end, length_norm, n_best) for i in range(batch)]


def _n_best(beams, scores, end, length_norm, n_best):
    """Cut each beam at </EOS>, normalise its score by length, keep the n_best."""
    ranked = []
    for words, score in zip(beams, scores):
        length = words.index(end) + 1 if end in words else len(words)  # </EOS> counts as a step
        ranked.append((words[:length - (end in words)], score / length ** length_norm))
    ranked.sort(key=lambda pair: pair[1], reverse=True)
    return ranked[:n_best]


def caption_features(model, features, ix2word, end, opt, n_best=None):
    """features (N, F) -> for each row, the n-best (caption text, score), in batches of opt.batch_size."""
    results = []
    for start in range(0, len(features), opt.batch_size):
        batch = features[start:start + opt.batch_size]  # (B, F)
        for beams in beam_search(model, batch, end, opt.beam_size, opt.max_gen_len, opt.length_norm,
                                 n_best or opt.n_best):
            results.append([("".join(ix2word[ix] for ix in words), score) for words, score in beams])
    return results

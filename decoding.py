"""What every decoding method shares (the rules a caption obeys, the CPU kernels, the size checks),
and greedy decoding and sampling, batched over images; beam_search.py holds (diverse) beam search
and caption_features, which decodes by --decoding.

Greedy decoding takes the likeliest word at every step and stops where that word is </EOS>. (Beam
search of size 1 follows the same words but keeps each step's ended caption and returns the likeliest
of them: a prefix of greedy's caption where an earlier ending was likelier, else the same caption.)
Sampling draws `samples` captions per image from the model's word probabilities at a temperature,
cut to the top_k likeliest words and to the nucleus (Holtzman et al., 2020): the fewest likeliest
words whose probabilities sum to top_p. Each image draws its random numbers from a generator of its
own, `samples` of them per step, so its captions are the same whether it is decoded alone or with
others. A caption's score is its log-probability under the model (with the rules, without the
temperature or the cuts) / length**length_norm, as beam search scores it; an image's samples come
best first.
"""
import contextlib
import hashlib

import torch

from config import UserError

NUCLEUS_BOUND = 128  # the nucleus is looked for among the likeliest 128 words first (192 x 5000: 9 ms, a sort 54)
# float32 holds numbers of about 1e-38 to 3e38: a temperature or a diversity lambda beyond these bounds
# rounds to 0 or inf in it, and 0 x inf or inf - inf is NaN. At 1e-30 sampling is already greedy, at 1e30
# uniform over the words the rules allow, and a lambda of 1e30 ranks any chosen word below every other.
FLOAT32_SMALL, FLOAT32_LARGE = 1e-30, 1e30


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


def check_search(n_best, beam_size, usable_words, min_len=1, max_len=30, groups=1, repeatable=None):
    """Refuse a search that cannot run: n_best <= beam_size <= the words a caption can use, groups dividing
    beam_size, min_len <= max_len, and a second word to go on with where no word may follow itself."""
    if not 1 <= n_best <= beam_size <= usable_words:
        raise UserError(f"--n-best={n_best} and --beam-size={beam_size}: need n-best <= beam size <= the "
                        f"{usable_words} words this vocabulary's captions can use")
    if beam_size % groups:
        raise UserError(f"--diversity-groups={groups} does not divide --beam-size={beam_size}")
    if not 1 <= min_len <= max_len:
        raise UserError(f"--min-len={min_len} and --max-gen-len={max_len}: need 1 <= min-len <= max-gen-len")
    if repeatable is not None and not len(repeatable) and usable_words < 2:
        raise UserError("no word may follow itself (--no-repeat or the training captions' rule), and this "
                        "vocabulary's captions can use one word only, so no caption could go on")


class Rules:
    """The rules of every decoding method: `banned` words (</PAD>, </UNKNOWN>) never come out; </EOS>
    (index `end`) neither before min_len words nor, before max_len words, after an `unfinished` word
    (一个, 的 ...); a caption ends at max_len words; no word follows itself except the `repeatable`
    ones (None: every word may)."""

    def __init__(self, vocab_size, end, banned=(), min_len=1, max_len=30, unfinished=(), repeatable=None,
                 device=None):
        self.end, self.min_len, self.max_len, self.repeatable = end, min_len, max_len, repeatable
        self.usable_words = vocab_size - 1 - len(banned)
        self.banned = torch.as_tensor(banned, dtype=torch.long, device=device)
        self.with_end = torch.cat([self.banned, self.banned.new_tensor([end])])  # before min_len words
        self.cannot_end = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # (V,): the unfinished words
        self.cannot_end[list(unfinished)] = True
        self.cannot_repeat = torch.ones(vocab_size, dtype=torch.bool, device=device)  # (V,)
        self.cannot_repeat[list(repeatable or ())] = False

    def step(self, model, inputs, state, t, last=None):
        """Step t of the model for N rows whose last words are `last` (N,), None at t = 0 -> the
        log-probabilities (N, V) with the rules applied (a word they forbid: -inf), the new state."""
        log_probs, state = model.step(inputs, state, self.banned if t >= self.min_len else self.with_end)
        if last is not None:
            if t < self.max_len:
                log_probs[:, self.end].masked_fill_(self.cannot_end[last], float("-inf"))
            if self.repeatable is not None:
                said_again = log_probs.gather(1, last.unsqueeze(1))  # (N, 1)
                said_again.masked_fill_(self.cannot_repeat[last].unsqueeze(1), float("-inf"))
                log_probs.scatter_(1, last.unsqueeze(1), said_again)
        return log_probs, state


def finished_prefix(words, max_len, unfinished):
    """A caption the search ended at max_len on an unfinished word -> its longest prefix that ends on a
    word that may end a caption (the run that could not end well cut back); any other caption as it is."""
    if len(words) < max_len or not words or words[-1] not in unfinished:
        return words
    ends = [i for i, word in enumerate(words) if word not in unfinished]
    return words[:ends[-1] + 1] if ends else words


def greedy(model, features, rules, length_norm=0.0):
    """features (B, F) or regions (B, R, F) -> for each image [(words, score, attention)], its words the
    likeliest at every step; attention is each word's region weights (words, R), or None."""
    return _decode(model, features, rules, 1, lambda log_probs, _going: log_probs.argmax(-1), length_norm)


def sample(model, features, rules, generators, samples=1, temperature=1.0, top_k=0, top_p=1.0, length_norm=0.0):
    """features (B, F) or regions (B, R, F) -> for each image `samples` (words, score, attention), best
    first, drawn at `temperature` from the top_k words (0: all) and the top_p nucleus; generators: one
    torch.Generator (CPU) per image, e.g. image_generators(features, seed)."""

    def pick(log_probs, going):  # (A*S, V), (A,) -> (A*S,)
        uniforms = torch.stack([torch.rand(samples, generator=generators[i]) for i in going.tolist()])  # (A, S)
        return draw(cut(log_probs, temperature, top_k, top_p), uniforms.view(-1).to(log_probs.device))

    return _decode(model, features, rules, samples, pick, length_norm)


def image_generators(features, seed):
    """One CPU generator per image, seeded by `seed` and the image's features (B, ...): an image draws
    the same numbers whatever images it is decoded with, in whatever order and batch size."""
    return [torch.Generator().manual_seed(_image_seed(row, seed)) for row in features.detach().cpu()]


def _image_seed(row, seed):
    """One image's features and `seed` -> a 64-bit seed."""
    digest = hashlib.blake2b(row.contiguous().numpy().tobytes(), digest_size=8, salt=seed.to_bytes(16, "little"))
    return int.from_bytes(digest.digest(), "little")


def cut(log_probs, temperature=1.0, top_k=0, top_p=1.0):
    """log_probs (N, V) -> the probabilities (N, V), unnormalised, of softmax(log_probs / temperature)
    kept to the top_k likeliest words (0: all) and, of those, the nucleus: the likeliest words, in
    order, until their share reaches top_p (the likeliest word always stays)."""
    top = log_probs.max(-1, keepdim=True).values  # (N, 1): 0 / temperature stays 0 at any temperature
    temperature = min(max(temperature, FLOAT32_SMALL), FLOAT32_LARGE)  # greedy below, uniform above
    probabilities = ((log_probs - top) / temperature).softmax(-1)  # (N, V)
    # the cuts rank words by log_probs: at a high temperature their probabilities tie in float32
    if 0 < top_k < probabilities.size(-1):
        kth = log_probs.topk(top_k, dim=-1).values[:, -1:]  # (N, 1)
        probabilities = probabilities.masked_fill(log_probs < kth, 0.0)
    if top_p < 1:
        total = probabilities.sum(-1, keepdim=True)  # (N, 1)
        order = log_probs.topk(min(NUCLEUS_BOUND, probabilities.size(-1)), dim=-1).indices  # (N, n)
        ordered = probabilities.gather(-1, order)
        if bool((ordered.sum(-1, keepdim=True) < top_p * total).any()):  # a wider nucleus: sort all words
            order = log_probs.argsort(-1, descending=True)  # (N, V)
            ordered = probabilities.gather(-1, order)
        outside = ordered.cumsum(-1) - ordered >= top_p * total  # the likelier words' share is already top_p
        outside[:, 0] = False  # the likeliest word, even where top_p * total rounds to 0 in float32
        ordered = ordered.masked_fill(outside, 0.0)
        probabilities = torch.zeros_like(probabilities).scatter_(-1, order, ordered)
    return probabilities


def draw(probabilities, uniforms):
    """One word per row of probabilities (N, V), unnormalised, by inverse transform sampling with
    uniforms (N,) in [0, 1): the first word whose cumulative probability passes the uniform times the
    row's total (a word of probability 0 never does)."""
    cumulative = probabilities.cumsum(-1)  # (N, V)
    threshold = uniforms.unsqueeze(1) * cumulative[:, -1:]  # (N, 1)
    word = torch.searchsorted(cumulative, threshold, right=True).squeeze(1)  # (N,)
    return word.clamp_max(cumulative.size(1) - 1)  # a threshold rounded up to the total


@torch.no_grad()
@native_kernels()
def _decode(model, features, rules, samples, pick, length_norm):
    """The loop of greedy decoding and sampling: `samples` rows per image (the first step runs one row
    per image), each row's next word pick(log_probs (A*S, V), going (A,)) -> (A*S,); a row ends at
    </EOS> and an image leaves the batch once all its rows have ended -> per image its rows'
    (words, score, attention), best first."""
    check_search(1, 1, rules.usable_words, rules.min_len, rules.max_len, repeatable=rules.repeatable)
    batch, vocab, end, device = len(features), model.vocab_size, rules.end, features.device
    inputs, state = model.start(features)  # one row per image at first: (B, E)
    going = torch.arange(batch, device=device)  # (A,) the images still decoding: A rows of what follows
    tokens = torch.zeros(batch, samples, 0, dtype=torch.long, device=device)  # (A, S, t)
    scores = torch.zeros(batch, samples, device=device)  # (A, S): log-probabilities so far
    alive = torch.ones(batch, samples, dtype=torch.bool, device=device)  # (A, S): rows not yet ended
    regions = model.attention(state)  # (B, R) or None: does the model attend?
    weights = None if regions is None else regions.new_zeros(batch, samples, 0, regions.size(-1))  # (A, S, t, R)
    found = [[None] * samples for _ in range(batch)]
    said_end = torch.full((vocab,), float("-inf"), device=device)  # (V,): what an ended row draws from
    said_end[end] = 0.0
    for t in range(rules.max_len + 1):
        log_probs, state = rules.step(model, inputs, state, t, tokens[:, :, -1].reshape(-1) if t else None)
        width = len(log_probs) // len(going)  # the state's rows per image: 1 at the first step, then S
        log_probs = log_probs.view(len(going), width, vocab).expand(-1, samples, -1).reshape(-1, vocab)  # (A*S, V)
        log_probs = torch.where(alive.view(-1, 1), log_probs, said_end)  # an ended row says </EOS> again
        word = pick(log_probs, going).view(len(going), samples)  # (A, S)
        if t == rules.max_len:
            word = torch.full_like(word, end)  # a caption ends at max_len words
        scores = scores + log_probs.gather(1, word.view(-1, 1)).view_as(scores)  # an ended row's: + 0
        _keep_ended(found, alive & (word == end), going, tokens, scores / (t + 1) ** length_norm, weights)
        alive = alive & (word != end)
        keep = alive.any(1).nonzero().squeeze(1)  # (A',) the images with rows still going
        if not len(keep):
            break
        tokens = torch.cat([tokens, word.unsqueeze(-1)], -1)[keep]  # (A', S, t+1)
        if weights is not None:
            step_weights = model.attention(state).view(len(going), width, 1, -1).expand(-1, samples, -1, -1)
            weights = torch.cat([weights, step_weights], 2)[keep]  # (A', S, t+1, R)
        parent = torch.arange(samples, device=device) if width > 1 else going.new_zeros(samples)  # (S,)
        state = model.select(state, keep.unsqueeze(1) * width + parent)  # rows (A', S)
        going, scores, alive, word = going[keep], scores[keep], alive[keep], word[keep]
        inputs = model.embed(word.view(-1))  # (A'*S, E)
    return [sorted(rows, key=lambda row: row[1], reverse=True) for rows in found]


def _keep_ended(found, ended, going, tokens, scores, weights):
    """found[image][row] = (words, score, attention) of each row that ended at this step, ended (A, S)."""
    if bool(ended.any()):
        images = going.tolist()
        for a, s in ended.nonzero().tolist():
            found[images[a]][s] = (tokens[a, s].tolist(), scores[a, s].item(),
                                   None if weights is None else weights[a, s])

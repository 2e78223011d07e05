r"""CTC as EG: a network reads digit strings column by column; the alignment is an exact E-step.

Data: strings of 1-4 bundled 8x8 digits (:func:`pyro_emvae.datasets.load_digits`) placed side by
side, with optional blank columns between them; frame ``t`` is image column ``t`` (8 pixels),
the labels are the digits (label ``d + 1``; 0 is CTC's blank). The model

.. math::

    y \mid \text{frames} \sim \mathrm{CTC}\big(f_\theta(\text{frames})\big),\qquad
    \log p_\theta(y) = \log \sum_{\pi:\ \mathcal B(\pi) = y} \prod_t
        \mathrm{softmax}(f_\theta)_{t, \pi_t}

has one implicit latent, the alignment :math:`\pi`, which :class:`~pyro_emvae.ExactEStep`
sums exactly; ``fit(model, ExactEStep(model), *data, optim=pyro.optim.Adam(...))`` then takes
gradient steps on the exact :math:`\log p_\theta(y)` (EG: by Fisher's identity the expected
complete-data gradient at the exact posterior).

Example::

    >>> frames, lengths, targets, _ = make_digit_strings(16, seed=0)
    >>> net = FrameNet()
    >>> model = make_ctc_model(net)
    >>> model(frames, lengths, targets)     # doctest: +SKIP
"""

from __future__ import annotations

import functools

import pyro
import torch
from torch import nn

from pyro_emvae.datasets import load_digits
from pyro_emvae.distributions.ctc import CTC, collapse

BLANK = 0
NUM_CLASSES = 11  # blank + ten digits


class FrameNet(nn.Module):
    """Per-frame label scores ``(B, T, 11)`` from image columns ``(B, T, 8)``: a 1-D convolution
    over 3 columns, then a bidirectional GRU (each frame sees the whole string: where a digit
    starts and ends), then a linear read-out. Measured: the GRU leaves CTC's all-blank plateau
    within a few hundred minibatch steps; a purely convolutional net of the same size took
    about three times as many.

    >>> FrameNet(hidden=4)(torch.rand(2, 10, 8)).shape
    torch.Size([2, 10, 11])
    """

    def __init__(self, hidden: int = 32, height: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv1d(height, hidden, 3, padding=1)
        self.gru = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, NUM_CLASSES)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(frames.transpose(1, 2))).transpose(1, 2)
        return self.out(self.gru(h)[0])


def make_ctc_model(net: nn.Module):
    """The Pyro model ``model(frames (B, T, 8), lengths (B,), targets (B, T) padded with -1)``:
    ``pyro.module``-registered network, one observed :class:`CTC` site ``"y"`` per string.

    >>> pyro.clear_param_store()
    >>> model = make_ctc_model(FrameNet(hidden=4))
    >>> frames, lengths, targets, _ = make_digit_strings(3, seed=1)
    >>> tr = pyro.poutine.trace(model).get_trace(frames, lengths, targets)
    >>> tr.nodes["y"]["fn"].batch_shape, bool(tr.log_prob_sum() < 0)
    (torch.Size([3]), True)
    """

    def model(frames, lengths, targets):
        pyro.module("net", net)
        with pyro.plate("strings", frames.size(0)):
            pyro.sample("y", CTC(net(frames), lengths, blank=BLANK), obs=targets)

    return model


@functools.lru_cache(maxsize=2)
def _digits(dtype):
    return load_digits(dtype=dtype)


def split_digits(test_fraction: float = 0.3, seed: int = 0, dtype=None):
    """The bundled digits split into train and held-out images: ``((x, y), (x, y))`` with
    ``x (n, 8, 8)`` in [0, 1] and ``y (n,)``; no image appears in both.

    >>> (x_train, y_train), (x_test, y_test) = split_digits(test_fraction=0.3)
    >>> x_train.shape, x_test.shape, float(x_train.max())
    (torch.Size([1258, 8, 8]), torch.Size([539, 8, 8]), 1.0)
    """
    x, y = _digits(dtype or torch.get_default_dtype())
    x = x.reshape(-1, 8, 8)  # (load_digits has already scaled the grey levels to [0, 1])
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = round(test_fraction * len(y))
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def make_digit_strings(
    n: int,
    images: torch.Tensor | None = None,
    digits: torch.Tensor | None = None,
    min_len: int = 1,
    max_len: int = 4,
    max_gap: int = 2,
    seed: int = 0,
):
    """``n`` strings of ``min_len``-``max_len`` digit images side by side, with 0-``max_gap``
    blank columns before, between and after the digits.

    Returns ``(frames (n, T, 8), lengths (n,), targets (n, T), strings)``: frames are
    image columns (zero-padded after ``lengths``), targets the labels ``digit + 1`` padded
    with -1 to ``T`` (the CTC site's event shape), strings the digit strings as text.

    >>> frames, lengths, targets, strings = make_digit_strings(3, seed=1)
    >>> strings, lengths.tolist(), targets[0, :3].tolist()
    (['55', '3148', '2'], [21, 36, 11], [6, 6, -1])
    """
    if images is None:
        (images, digits), _ = split_digits()
    g = torch.Generator().manual_seed(seed)
    width = images.size(-1)
    t_max = max_len * width + (max_len + 1) * max_gap
    frames = images.new_zeros((n, t_max, images.size(-2)))
    targets = torch.full((n, t_max), -1, dtype=torch.long)
    lengths = torch.zeros(n, dtype=torch.long)
    strings = []
    counts = torch.randint(min_len, max_len + 1, (n,), generator=g)
    for i in range(n):
        k = int(counts[i])
        pick = torch.randint(len(digits), (k,), generator=g)
        gaps = torch.randint(0, max_gap + 1, (k + 1,), generator=g)
        t = int(gaps[0])
        for j, idx in enumerate(pick.tolist()):
            frames[i, t : t + width] = images[idx].T  # columns as frames
            t += width + int(gaps[j + 1])
        lengths[i] = t
        targets[i, :k] = digits[pick] + 1
        strings.append("".join(str(int(d)) for d in digits[pick]))
    return frames, lengths, targets, strings


def greedy_decode(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Best-path (greedy) decoding: the most probable label per frame, collapsed;
    ``(B, T)`` label sequences padded with -1.

    >>> logits = torch.full((1, 5, 11), -5.0)
    >>> logits[0, [0, 1, 3, 4], 3] = 5.0  # label 3, blank, label 3
    >>> logits[0, 2, BLANK] = 5.0
    >>> greedy_decode(logits, torch.tensor([5])).tolist()
    [[3, 3, -1, -1, -1]]
    """
    return collapse(logits.argmax(-1), BLANK, lengths)


def rescored_decode(
    logits: torch.Tensor, lengths: torch.Tensor, num_candidates: int = 32, seed: int = 0
) -> torch.Tensor:
    """The most probable labelling among candidates by the exact CTC likelihood: the greedy
    labelling and ``num_candidates`` labellings of alignments drawn frame by frame from the
    network's distributions, each scored by the exact forward algorithm
    (:math:`\\log p(y \\mid x)` sums all its alignments, which greedy decoding does not).
    Returns ``(B, T)`` label sequences padded with -1.

    >>> logits = torch.full((1, 5, 11), -5.0)
    >>> logits[0, [0, 1, 3, 4], 3] = 5.0  # label 3, blank, label 3
    >>> logits[0, 2, BLANK] = 5.0
    >>> rescored_decode(logits, torch.tensor([5]), num_candidates=4).tolist()
    [[3, 3, -1, -1, -1]]
    """
    g = torch.Generator().manual_seed(seed)
    b, t_len, c = logits.shape
    with torch.no_grad():
        probs = logits.softmax(-1)
        draws = torch.multinomial(probs.reshape(-1, c), num_candidates, True, generator=g)
        draws = draws.reshape(b, t_len, num_candidates).permute(2, 0, 1)
        cands = torch.cat((logits.argmax(-1).unsqueeze(0), draws))  # (K+1, B, T)
        labels = collapse(cands, BLANK, lengths)  # (K+1, B, T)
        k = labels.size(0)
        score = CTC(logits.expand(k, b, t_len, c), lengths.expand(k, b)).log_prob(labels)
        best = score.argmax(0)
        return labels[best, torch.arange(b)]


def sequence_metrics(decoded: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Sequence accuracy (the whole string right) and label error rate (edit distance over
    the number of true labels) of decoded label sequences against the targets (both padded
    with -1).

    >>> decoded = torch.tensor([[3, 3, -1], [1, -1, -1]])
    >>> sequence_metrics(decoded, torch.tensor([[3, 3, -1], [2, -1, -1]]))
    {'sequence_accuracy': 0.5, 'label_error_rate': 0.3333333333333333}
    """
    right, edits, total = 0, 0, 0
    for d, t in zip(decoded.tolist(), targets.tolist()):
        d = [v for v in d if v >= 0]
        t = [v for v in t if v >= 0]
        right += d == t
        edits += _edit_distance(d, t)
        total += len(t)
    return {"sequence_accuracy": right / len(targets), "label_error_rate": edits / total}


def _edit_distance(a: list, b: list) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]

"""Per-layer statistics of captured activations: count, mean, variance and norms, mergeable.

:class:`ActivationCapture` accumulates, for every captured layer, the rows it stores (the
non-padding tokens when the batch has an attention mask): their count, per-dimension mean and
sum of squared deviations (Welford's algorithm, merged across batches and processes with Chan et
al.'s formula), and the sums of their L2 norms and squared norms. Each writer (rank) keeps its
own partial sums in the run's metadata, ``capture.writers[rank].stats[layer]``, and the merged
figures are ``capture.stats[layer]``: what :func:`read_stats`, ``mi-crow-store stats`` and
``ActivationDataset(normalize=...)`` read.

Stored form of one layer (JSON), both per writer and merged::

    {"count": 2048, "d": 768, "mean": [...768 floats], "m2": [...768 floats],
     "norm_sum": 51234.5, "sq_norm_sum": 1.3e6}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mi_crow.store.store import Store

STATS_FIELD = "stats"  # in run metadata's "capture" and in each of its writers


@dataclass
class LayerStats:
    """Running statistics of the rows ``[n, d]`` of one layer (float64 sums).

    Attributes:
        count: Rows seen.
        mean: Per-dimension mean, ``[d]`` float64.
        m2: Per-dimension sum of squared deviations from the mean, ``[d]`` float64.
        norm_sum: Sum of the rows' L2 norms.
        sq_norm_sum: Sum of the rows' squared L2 norms.

    Examples:
        >>> import torch
        >>> from mi_crow.store.stats import LayerStats
        >>> x = torch.arange(12.0).reshape(4, 3)
        >>> s = LayerStats.of(x[:1]).merged(LayerStats.of(x[1:]))
        >>> s.count, s.mean.tolist(), s.var.tolist()
        (4, [4.5, 5.5, 6.5], [11.25, 11.25, 11.25])
    """

    count: int
    mean: torch.Tensor
    m2: torch.Tensor
    norm_sum: float = 0.0
    sq_norm_sum: float = 0.0

    @property
    def d(self) -> int:
        """The rows' width."""
        return int(self.mean.shape[0])

    @property
    def var(self) -> torch.Tensor:
        """Per-dimension population variance (``m2 / count``), ``[d]`` float64."""
        return self.m2 / max(self.count, 1)

    @property
    def std(self) -> torch.Tensor:
        """Per-dimension population standard deviation, ``[d]`` float64."""
        return self.var.sqrt()

    @property
    def mean_norm(self) -> float:
        """Mean L2 norm of a row (what SAELens's norm scaling divides ``sqrt(d)`` by)."""
        return self.norm_sum / self.count if self.count else 0.0

    @property
    def mean_sq_norm(self) -> float:
        """Mean squared L2 norm of a row."""
        return self.sq_norm_sum / self.count if self.count else 0.0

    @classmethod
    def empty(cls, d: int) -> LayerStats:
        """Statistics of no rows of width ``d``."""
        return cls(0, torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64))

    @classmethod
    def of(cls, rows: torch.Tensor) -> LayerStats:
        """Statistics of ``rows`` (``[n, d]``; ``[..., d]`` is flattened to rows)."""
        x = rows.detach().reshape(-1, rows.shape[-1]).to(torch.float64)
        n = int(x.shape[0])
        if n == 0:
            return cls.empty(int(x.shape[1]))
        mean = x.mean(0)
        m2 = ((x - mean) ** 2).sum(0)
        sq = (x * x).sum(1)
        return cls(n, mean, m2, float(sq.sqrt().sum()), float(sq.sum()))

    def merged(self, other: LayerStats) -> LayerStats:
        """Statistics of both sets of rows (Chan et al.'s parallel update; neither is changed).

        Raises:
            ValueError: If the widths differ.
        """
        if self.count and other.count and self.d != other.d:
            raise ValueError(f"cannot merge statistics of rows of width {self.d} and {other.d}")
        if not other.count:
            return self
        if not self.count:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        return LayerStats(n, mean, m2, self.norm_sum + other.norm_sum, self.sq_norm_sum + other.sq_norm_sum)

    def to_json(self) -> dict[str, Any]:
        """The stored form (finite floats only; JSON has no NaN)."""
        return {
            "count": self.count,
            "d": self.d,
            "mean": [_finite(v) for v in self.mean.tolist()],
            "m2": [_finite(v) for v in self.m2.tolist()],
            "norm_sum": _finite(self.norm_sum),
            "sq_norm_sum": _finite(self.sq_norm_sum),
        }

    @classmethod
    def from_json(cls, value: Any, where: str = "stats") -> LayerStats:
        """Back from :meth:`to_json`'s form, checked.

        Raises:
            ValueError: If ``value`` is not that form (the message names ``where``).
        """
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be an object, got {type(value).__name__}")
        count, d = value.get("count"), value.get("d")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{where} has an invalid count {count!r}")
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"{where} has an invalid width d {d!r}")
        vectors = []
        for name in ("mean", "m2"):
            v = value.get(name)
            if not isinstance(v, list) or len(v) != d or not all(_is_number(x) for x in v):
                raise ValueError(f"{where} field {name!r} must be a list of {d} numbers")
            vectors.append(torch.tensor(v, dtype=torch.float64))
        sums = []
        for name in ("norm_sum", "sq_norm_sum"):
            v = value.get(name, 0.0)
            if not _is_number(v):
                raise ValueError(f"{where} field {name!r} must be a number, got {v!r}")
            sums.append(float(v))
        return cls(count, vectors[0], vectors[1], sums[0], sums[1])


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _finite(v: float) -> float:
    return v if math.isfinite(v) else 0.0


def merge_writer_stats(writers: Mapping[str, Any]) -> dict[str, LayerStats]:
    """The merged statistics of every layer from the writers' partial ones
    (``capture.writers[rank].stats``); a writer without statistics adds nothing."""
    merged: dict[str, LayerStats] = {}
    for rank, writer in sorted(writers.items()):
        stats = writer.get(STATS_FIELD) if isinstance(writer, Mapping) else None
        if not isinstance(stats, Mapping):
            continue
        for layer, value in stats.items():
            part = LayerStats.from_json(value, f"capture.writers[{rank!r}].stats[{layer!r}]")
            merged[layer] = merged[layer].merged(part) if layer in merged else part
    return merged


def read_stats(store: Store, run_id: str) -> dict[str, LayerStats]:
    """The statistics of every captured layer of ``run_id``, from its metadata.

    Raises:
        KeyError: If the run has no statistics (it was not captured by :class:`ActivationCapture`
            of this version, or holds no batch yet); the message names the run.
        ValueError: If the stored statistics are malformed.
    """
    capture = store.get_run_metadata(run_id).get("capture")
    stats = capture.get(STATS_FIELD) if isinstance(capture, Mapping) else None
    if not isinstance(stats, Mapping) or not stats:
        raise KeyError(
            f"run {run_id!r} has no per-layer statistics (capture.stats in its metadata): capture it with "
            "ActivationCapture or `mi-crow-store capture` of mi-crow-store 0.2 or later"
        )
    return {layer: LayerStats.from_json(v, f"run {run_id!r} capture.stats[{layer!r}]") for layer, v in stats.items()}

"""Drift-adaptive streaming anomaly detection, one small state per (entity, metric).

One :class:`AdaptiveDetector` (configuration and code, no per-series data) is
shared by every series; each series owns a compact :class:`DetectorState`
(about 1 KB packed) that travels with the entity's feature hash in Redis.
Memory therefore grows linearly and modestly with the number of series, and a
partition that moves to another worker brings its detector state with it.

For each sample, :meth:`AdaptiveDetector.score` uses only the state built from
earlier samples, and :meth:`AdaptiveDetector.learn` folds the sample in
afterwards (score before learn: no look-ahead).  The layers, in order:

1. **Predictions.**  Two baselines predict the sample: a fast EWMA level, and
   an hour-of-week seasonal profile (168 slots, learnt per slot).  Each keeps
   an EW mean absolute residual (its scale).  The one with the smaller scale so
   far is the series' predictor, so a seasonal series is judged against its
   season and a flat one against its level.
2. **Raw score.**  ``raw = 1 - exp(-|residual| / (3 * scale))`` in [0, 1):
   bounded, so one outlier cannot wreck the distributions below.
3. **Anomaly likelihood** (after Numenta's): the raw score and its short-term
   EW mean are compared with their own long-term mean and variance; the
   Gaussian tail probability ``p`` of the larger deviation gives
   ``score = -log10(p) / 10`` (``p = 1e-5`` scores 0.5, ``1e-10`` scores 1).
   This makes scores mean the same on every series, whatever its units or
   noise.  Before ``learning`` samples a robust z-score tail stands in.
4. **Range check.**  A value beyond everything the series has shown, by more
   than 5% of its range, scores 1 (Numenta's spatial anomaly).
5. **Alert suppression.**  After a score reaches ``alert_level`` the next
   ``suppress_samples`` scores are capped below it: one incident, one alert.
6. **Drift.**  Page-Hinkley tests (River's algorithm, on packed state) watch
   the signed residual z (level) and the raw score (dispersion).  A level drift
   re-centres the level on the sample and makes the seasonal profile relearn;
   a dispersion drift re-estimates the scales from their fast versions.  See
   :mod:`ia.decisions.drift` for the bound on how long a shift stays anomalous.
"""

from __future__ import annotations

import math
import struct
from array import array
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from ia.decisions.drift import PH_FIELDS, PageHinkleyParams, ph_update
from ia.schemas.models import DriftState, ModelInfo

STATE_FORMAT = 1
SEASON_SLOTS = 168  # hours of the week
SLOT_MS = 3_600_000
# -log10 tail probability that scores 1.0.
SURPRISE_AT_ONE = 10.0
# Mean absolute deviation -> standard deviation for Gaussian noise (sqrt(pi/2)).
MAD_TO_STD = 1.2533141373155003
Z_CLIP = 10.0
# Slots of DetectorState.lik, per predictor: LEVEL + i or SEASONAL + i.
WIN, MEAN, VAR, WIN_MEAN, WIN_VAR = range(5)
LEVEL, SEASONAL = 0, 5


def upper_tail_surprise(z: float) -> float:
    """-log10 P(Z >= z) for a standard normal; 0 for z <= 0; stable for huge z."""
    if z < 8.0:
        return -math.log10(0.5 * math.erfc(z / math.sqrt(2.0)))
    # Mills-ratio asymptote: P ~ exp(-z^2/2) / (z sqrt(2 pi)).
    return (z * z / 2.0 + math.log(z * math.sqrt(2.0 * math.pi))) / math.log(10.0)


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    # Fast level: a half-life of ~6.6 samples follows a series closely, so
    # the residual isolates what is new in this sample.
    level_alpha: float = 0.1
    # Residual scales: a half-life of ~69 samples, slow enough that an
    # anomaly does not immediately excuse itself.
    scale_alpha: float = 0.01
    # Fast scales, used to re-baseline the slow ones after a dispersion drift.
    fast_scale_alpha: float = 0.1
    raw_scale: float = 3.0
    # EW span of the short-term mean of raw scores (sustained surprise).
    window: float = 5.0
    # Long-term distribution of raw scores: half-life ~693 samples.
    long_alpha: float = 0.001
    learning: int = 300
    warmup: int = 20
    season_alpha: float = 0.1
    season_min_visits: int = 3
    spatial_tolerance: float = 0.05
    alert_level: float = 0.5
    suppress_samples: int = 50
    suppressed_cap: float = 0.4
    drift_hold: int = 10
    level_drift: PageHinkleyParams = field(default_factory=lambda: PageHinkleyParams(
        min_instances=30, delta=0.5, threshold=100.0))
    dispersion_drift: PageHinkleyParams = field(default_factory=lambda: PageHinkleyParams(
        min_instances=30, delta=0.05, threshold=15.0))


_SCALARS = struct.Struct("<BqqiiI" + "d" * 20 + "d" * 2 * PH_FIELDS)


class DetectorState:
    """Everything one series needs; packs to ~1.1 KB (format-versioned)."""

    __slots__ = ("base", "base_scale", "bias_s", "disp_ph", "fast_l", "fast_s", "hi", "hold",
                 "last_ts", "level", "level_ph", "lik", "lo", "n", "profile", "scale_l",
                 "scale_s", "suppress",
                 "visits")

    def __init__(self) -> None:
        self.n = 0
        self.last_ts = -1
        self.suppress = 0
        self.hold = 0
        self.level = 0.0
        self.scale_l = 0.0
        self.scale_s = 0.0
        self.fast_l = 0.0
        self.fast_s = 0.0
        self.bias_s = 0.0
        self.base = 0.0
        self.base_scale = 0.0
        self.lo = 0.0
        self.hi = 0.0
        # per predictor (LEVEL, SEASONAL): WIN, MEAN, VAR, WIN_MEAN, WIN_VAR
        self.lik = [0.0] * 10
        self.level_ph = [0.0] * PH_FIELDS
        self.disp_ph = [0.0] * PH_FIELDS
        self.profile = array("f", bytes(4 * SEASON_SLOTS))
        self.visits = bytearray(SEASON_SLOTS)

    def pack(self) -> bytes:
        head = _SCALARS.pack(STATE_FORMAT, self.n, self.last_ts, self.suppress, self.hold, 0,
                             self.level, self.scale_l, self.scale_s, self.fast_l, self.fast_s,
                             self.bias_s, self.base, self.base_scale, self.lo, self.hi,
                             *self.lik, *self.level_ph, *self.disp_ph)
        return head + self.profile.tobytes() + bytes(self.visits)

    @classmethod
    def unpack(cls, blob: bytes) -> DetectorState:
        """The state in ``blob``, or a fresh one if it was written by another format."""
        st = cls()
        if not blob or blob[0] != STATE_FORMAT or \
                len(blob) != _SCALARS.size + 5 * SEASON_SLOTS:
            return st
        v = _SCALARS.unpack_from(blob)
        st.n, st.last_ts, st.suppress, st.hold = v[1], v[2], v[3], v[4]
        (st.level, st.scale_l, st.scale_s, st.fast_l, st.fast_s, st.bias_s, st.base,
         st.base_scale, st.lo, st.hi) = v[6:16]
        st.lik = list(v[16:26])
        st.level_ph = list(v[26:26 + PH_FIELDS])
        st.disp_ph = list(v[26 + PH_FIELDS:26 + 2 * PH_FIELDS])
        off = _SCALARS.size
        st.profile = array("f")
        st.profile.frombytes(blob[off:off + 4 * SEASON_SLOTS])
        st.visits = bytearray(blob[off + 4 * SEASON_SLOTS:])
        return st


@dataclass(slots=True)
class Scored:
    """One sample's score and what produced it (kept for :meth:`learn`)."""

    value: float
    ts: int
    score: float
    slot: int
    res_l: float
    res_s: float
    raw_l: float
    raw_s: float
    components: dict[str, float]


class PackedState(Protocol):
    def pack(self) -> bytes: ...


S = TypeVar("S", bound=PackedState)


class SeriesDetector(Protocol[S]):
    """What the decision engine needs of a detector: one shared object, per-series state.

    The engine keeps one state per (entity, metric) in the entity's Redis hash as the
    bytes of ``state.pack()``, and for every sample calls ``score`` and then ``learn``
    with what ``score`` returned (score before learn: no look-ahead). ``info`` names the
    model and version on every decision.
    """

    info: ModelInfo

    def new_state(self) -> S: ...

    def unpack(self, blob: bytes) -> S: ...

    def score(self, state: S, value: float, ts: int) -> Scored: ...

    def learn(self, state: S, scored: Scored) -> tuple[DriftState, str | None]: ...


class AdaptiveDetector:
    """Streaming, unsupervised anomaly scores in [0, 1] that mean the same on every series.

    One detector (configuration and code) serves every series; each series owns a
    :class:`DetectorState`. The layers are described in the module docstring.

    Parameters
    ----------
    config
        The hyperparameters (:class:`DetectorConfig`; defaults if omitted):
        ``level_alpha`` (EWMA weight of the fast level), ``scale_alpha`` and
        ``fast_scale_alpha`` (weights of the slow and fast mean absolute residuals),
        ``raw_scale`` (residual / scale ratio that gives a raw score of 1 - 1/e),
        ``window`` (EW span of the short-term mean of raw scores), ``long_alpha``
        (weight of the long-term distribution of raw scores), ``learning`` (samples
        before the likelihood is used), ``warmup`` (samples before any alarm),
        ``season_alpha`` and ``season_min_visits`` (hour-of-week profile),
        ``spatial_tolerance`` (fraction of the range beyond which a value scores 1),
        ``alert_level``, ``suppress_samples`` and ``suppressed_cap`` (one alert per
        incident), ``drift_hold`` (samples a drift is reported), ``level_drift`` and
        ``dispersion_drift`` (Page-Hinkley parameters).

    Examples
    --------
    >>> import math
    >>> det = AdaptiveDetector()
    >>> state = det.new_state()
    >>> scores = {}
    >>> for i in range(400):
    ...     value = 25.0 if i == 350 else 10.0 + math.sin(i / 5.0)
    ...     scored = det.score(state, value, ts=i * 60_000)
    ...     drift, detected = det.learn(state, scored)
    ...     scores[i] = round(scored.score, 3)
    >>> scores[100], scores[349], scores[350], scores[351]
    (0.104, 0.063, 1.0, 0.09)
    >>> len(state.pack()), det.unpack(state.pack()).n
    (1125, 400)

    References
    ----------
    Ahmad, S., Lavin, A., Purdy, S., Agha, Z. (2017). Unsupervised real-time anomaly
    detection for streaming data. Neurocomputing 262, 134-147 (the anomaly likelihood).
    Page, E. S. (1954). Continuous inspection schemes. Biometrika 41, 100-115
    (the Page-Hinkley drift test).
    """

    info = ModelInfo(id="adaptive-likelihood", version=f"1.0.0+s{STATE_FORMAT}")

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()

    def new_state(self) -> DetectorState:
        return DetectorState()

    def unpack(self, blob: bytes) -> DetectorState:
        """The state packed in ``blob``; a fresh one if it is empty or of another format."""
        return DetectorState.unpack(blob)

    # -- scoring ---------------------------------------------------------------------------

    def score(self, st: DetectorState, value: float, ts: int) -> Scored:
        """Score ``value`` against ``st`` as it is: nothing about this sample is used."""
        c = self.config
        slot = (ts // SLOT_MS) % SEASON_SLOTS
        if st.n == 0:
            return Scored(value, ts, 0.0, slot, 0.0, 0.0, 0.0, 0.0, {})
        floor = 1e-9 * abs(st.level) + 1e-12
        res_l = _finite(value - st.level)
        seasonal_ready = st.visits[slot] >= c.season_min_visits
        res_s = _finite(value - st.profile[slot]) if seasonal_ready else res_l
        sc_l, sc_s = max(st.scale_l, floor), max(st.scale_s, floor)
        raw_l = 1.0 - math.exp(-min(abs(res_l) / (c.raw_scale * sc_l), 700.0))
        raw_s = 1.0 - math.exp(-min(abs(res_s) / (c.raw_scale * sc_s), 700.0))
        seasonal = st.scale_s < st.scale_l
        res, scale, raw = (res_s, sc_s, raw_s) if seasonal else (res_l, sc_l, raw_l)
        z = _finite(res / (MAD_TO_STD * scale))
        comps = {"expected": value - res, "residual_z": _clip(z),
                 "seasonal": 1.0 if seasonal else 0.0, "out_of_range": 0.0}
        if st.n < c.learning:
            score = self._warmup_score(st.n, z, comps)
        else:
            score = self._likelihood_score(st, raw, SEASONAL if seasonal else LEVEL, comps)
            span = st.hi - st.lo
            outside = max(value - st.hi, st.lo - value)
            comps["range_excess"] = _clip(outside / span) if span > 0 else 0.0
            if span > 0 and outside > c.spatial_tolerance * span:
                score = 1.0
                comps["out_of_range"] = 1.0
        comps["score_unsuppressed"] = score
        if st.suppress > 0:
            score = min(score, c.suppressed_cap)
        return Scored(value, ts, min(1.0, max(0.0, score)), slot, res_l, res_s, raw_l, raw_s,
                      comps)

    def _warmup_score(self, n: int, z: float, comps: dict[str, float]) -> float:
        # Too few samples for a distribution of scores: trust a robust z-score
        # tail, ramped in so that the first handful of samples cannot alarm.
        ramp = min(1.0, n / self.config.warmup) if 2 * n >= self.config.warmup else 0.0
        s = min(1.0, upper_tail_surprise(abs(z) * ramp) / SURPRISE_AT_ONE)
        comps["score_point"] = s
        return s

    def _likelihood_score(self, st: DetectorState, raw: float, base: int,
                          comps: dict[str, float]) -> float:
        lik = st.lik
        a = 2.0 / (self.config.window + 1.0)
        win = lik[base + WIN] + a * (raw - lik[base + WIN])
        point = upper_tail_surprise((raw - lik[base + MEAN])
                                    / math.sqrt(max(lik[base + VAR], 1e-6)))
        window = upper_tail_surprise((win - lik[base + WIN_MEAN])
                                     / math.sqrt(max(lik[base + WIN_VAR], 1e-6)))
        comps["score_point"] = min(1.0, point / SURPRISE_AT_ONE)
        comps["score_window"] = min(1.0, window / SURPRISE_AT_ONE)
        return max(comps["score_point"], comps["score_window"])

    # -- learning --------------------------------------------------------------------------

    def learn(self, st: DetectorState, s: Scored) -> tuple[DriftState, str | None]:
        """Fold the scored sample into ``st``; return the drift state and what drift was
        detected just now (``level``, ``dispersion``, both joined by ``+``, or None).

        A sample at or before the last learnt timestamp (late, or redelivered after a
        crash) is not learnt again."""
        c = self.config
        if st.n == 0:
            self._first(st, s)
            return DriftState.stable, None
        if s.ts <= st.last_ts:
            return (DriftState.drift if st.hold > 0 else DriftState.stable), None
        self._fold_likelihood(st, s)
        n1 = 1.0 / (st.n + 1)
        st.level += max(c.level_alpha, n1) * s.res_l
        a = max(c.scale_alpha, n1)
        st.scale_l += a * (abs(s.res_l) - st.scale_l)
        st.scale_s += a * (abs(s.res_s) - st.scale_s)
        fa = max(c.fast_scale_alpha, n1)
        st.fast_l += fa * (abs(s.res_l) - st.fast_l)
        st.fast_s += fa * (abs(s.res_s) - st.fast_s)
        st.bias_s += fa * (s.res_s - st.bias_s)
        res_b = s.value - st.base
        # The level test watches the residual against the slow baseline: a
        # persistent shift keeps it off zero for many samples, a spike does not.
        z_base = _clip(res_b / (MAD_TO_STD * max(st.base_scale, 1e-12)))
        st.base += a * res_b
        st.base_scale += a * (abs(res_b) - st.base_scale)
        v = st.visits[s.slot]
        st.profile[s.slot] += max(c.season_alpha, 1.0 / (v + 1)) * (s.value - st.profile[s.slot])
        st.visits[s.slot] = min(255, v + 1)
        st.lo, st.hi = min(st.lo, s.value), max(st.hi, s.value)
        st.n += 1
        st.last_ts = s.ts
        if st.suppress > 0:
            st.suppress -= 1
        elif s.score >= c.alert_level:
            st.suppress = c.suppress_samples
        return self._drift(st, s, z_base)

    def _first(self, st: DetectorState, s: Scored) -> None:
        st.n, st.last_ts, st.level, st.lo, st.hi = 1, s.ts, s.value, s.value, s.value
        st.base = s.value
        st.profile[s.slot] = s.value
        st.visits[s.slot] = 1

    def _fold_likelihood(self, st: DetectorState, s: Scored) -> None:
        lik = st.lik
        a = 2.0 / (self.config.window + 1.0)
        al = max(self.config.long_alpha, 1.0 / st.n)
        for base, raw in ((LEVEL, s.raw_l), (SEASONAL, s.raw_s)):
            lik[base + WIN] += a * (raw - lik[base + WIN]) if st.n > 1 else raw
            for i, x in ((base + MEAN, raw), (base + WIN_MEAN, lik[base + WIN])):
                d = x - lik[i]
                lik[i] += al * d
                lik[i + 1] = (1.0 - al) * (lik[i + 1] + al * d * d)

    def _drift(self, st: DetectorState, s: Scored,
               z_base: float) -> tuple[DriftState, str | None]:
        c = self.config
        level_drift = ph_update(st.level_ph, z_base, c.level_drift)
        raw = s.raw_s if s.components["seasonal"] else s.raw_l
        dispersion_drift = ph_update(st.disp_ph, raw, c.dispersion_drift)
        if level_drift:
            # Re-centre on the new level, and move the seasonal profile by the
            # recent mean seasonal residual: the shape of the week is kept.
            st.level = st.base = s.value
            shift = st.bias_s
            st.profile = array("f", (v + shift for v in st.profile))
            st.bias_s = 0.0
        if dispersion_drift:
            st.scale_l, st.scale_s = max(st.fast_l, 1e-12), max(st.fast_s, 1e-12)
        if level_drift or dispersion_drift:
            st.hold = c.drift_hold
            kinds = [k for k, hit in (("level", level_drift), ("dispersion", dispersion_drift))
                     if hit]
            return DriftState.drift, "+".join(kinds)
        if st.hold > 0:
            st.hold -= 1
            return DriftState.drift, None
        return DriftState.stable, None


def _finite(x: float) -> float:
    """Saturate an overflowed difference (two huge finite values) to a finite float."""
    if math.isfinite(x):
        return x
    return 1e300 if math.isnan(x) else math.copysign(1e300, x)


def _clip(x: float) -> float:
    return max(-Z_CLIP, min(Z_CLIP, x)) if math.isfinite(x) else math.copysign(Z_CLIP, x)

"""The embedded default dataset: a seeded road-traffic simulator.

Radial highway corridors meet at a central interchange; every corridor has an inbound and an
outbound carriageway with the same detector stations.  Speeds come from a congestion level
``c`` per sensor and step:

    d_n(t) = D_dir(h, weekend) * m_{corridor,dir,day} + e_n(t)         demand (AR(1) noise e)
    l_n(t) = 1 - (1 - b_n * tanh(relu(d_n - d_crit) / s)) * (1 - I_n(t))  local congestion
    c_n(t) = 1 - (1 - l_n(t)) * (1 - alpha * mean_{m downstream} c_m(t - tau_nm))
    v_n(t) = vf_n * (1 - k_d * min(d_n, 1.2)) * (1 - k_c * c_n(t)) + eps,  eps ~ N(0, noise^2)

so a queue spreads upstream with the shock-wave delay ``tau_nm = km_nm / w``: a sensor's
future depends on its downstream neighbour's past.  ``docs/synthetic.md`` explains every term.
Everything is drawn from one ``numpy`` seed; the same config gives identical output.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from stlink.config import ConfigError, SyntheticConfig
from stlink.data.formats import RawData

CENTRE_LAT, CENTRE_LON = 34.05, -118.25  # downtown of the made-up city
KM_PER_DEG_LAT = 110.574
KM_PER_DEG_LON_EQ = 111.320
CARRIAGEWAY_KM = 0.015        # inbound/outbound detectors sit 15 m either side of the axis
INNER_RADIUS_KM = (1.5, 2.0)  # first station's distance from the interchange
GAP_KM = (1.6, 3.2)           # spacing of consecutive stations along a corridor
FREE_FLOW_MPH = (55.0, 70.0)
SHOCKWAVE_KMH = 18.0          # w: speed at which a queue grows upstream (~11 mph)
SPILL = 0.9                   # alpha: share of the downstream congestion passed upstream per hop
D_CRIT = 0.55                 # demand at which a bottleneck starts to congest
D_SCALE = 0.4                 # s: how fast congestion saturates above D_CRIT
K_DEMAND = 0.05               # k_d: mild speed loss with demand in free flow
K_CONG = 0.85                 # k_c: a fully congested sensor runs at 15 % of free flow
MIN_SPEED_MPH = 2.0
AR_TAU_MIN = 30.0             # correlation time of the demand fluctuations e_n
AR_STD = 0.06                 # stationary std of e_n
DAY_STD = 0.08                # log-std of the per-day demand multiplier m
INCIDENT_SEVERITY = (0.5, 0.85)   # I during an incident
INCIDENT_MIN = (15.0, 30.0, 120.0)  # minimum, mean extra (exponential), maximum duration
RECOVERY_MIN = 15.0           # e-folding time of the recovery after clearance
OUTAGE_HOURS = (2.0, 12.0)    # multi-hour outages, uniform duration


@dataclass(frozen=True)
class Network:
    """Sensors (in sensor order) and directed edges (``src`` upstream of ``dst``)."""

    sensor_ids: list[str]
    corridor: np.ndarray    # (N,) int
    inbound: np.ndarray     # (N,) bool
    station: np.ndarray     # (N,) int, 0 = nearest the interchange
    lat: np.ndarray         # (N,)
    lon: np.ndarray         # (N,)
    src: np.ndarray         # (E,) int
    dst: np.ndarray         # (E,) int
    km: np.ndarray          # (E,) float, distance along the road

    @property
    def n(self) -> int:
        return len(self.sensor_ids)


def _check(cfg: SyntheticConfig) -> None:
    """Raise ``ConfigError`` naming the first out-of-range field of ``cfg``."""
    rules = {
        "n_corridors": cfg.n_corridors >= 1,
        "sensors_per_corridor": cfg.sensors_per_corridor >= 2,
        "days": cfg.days >= 1,
        "freq_minutes": cfg.freq_minutes >= 1 and 1440 % cfg.freq_minutes == 0,
        "incident_rate_per_day": cfg.incident_rate_per_day >= 0,
        "outage_rate_per_sensor": cfg.outage_rate_per_sensor >= 0,
        "missing_rate": 0 <= cfg.missing_rate < 1,
        "noise_mph": cfg.noise_mph >= 0,
    }
    for name, ok in rules.items():
        if not ok:
            raise ConfigError(f"data.synthetic.{name}: out of range, got {getattr(cfg, name)!r}")
    try:
        pd.Timestamp(cfg.start)
    except ValueError:
        raise ConfigError(f"data.synthetic.start: not a timestamp, got {cfg.start!r}") from None


def build_network(n_corridors: int, per_corridor: int, rng: np.random.Generator) -> Network:
    """Radial corridors at jittered angles; both carriageways share the station positions.

    Inbound runs station S-1 -> ... -> 0, outbound 0 -> ... -> S-1; at the interchange every
    inbound station 0 feeds the outbound station 0 of every *other* corridor.
    """
    C, S = n_corridors, per_corridor
    angle = 2 * np.pi * np.arange(C) / C + rng.uniform(-0.2, 0.2, C)               # (C,)
    gaps = rng.uniform(*GAP_KM, (C, S - 1))                                         # (C, S-1)
    radius = np.concatenate([rng.uniform(*INNER_RADIUS_KM, (C, 1)), gaps], axis=1).cumsum(1)  # (C, S)
    corridor, inbound, station = (a.ravel() for a in np.meshgrid(
        np.arange(C), np.array([True, False]), np.arange(S), indexing="ij"))      # (N,) each, N = C*2*S
    side = np.where(inbound, 1.0, -1.0) * CARRIAGEWAY_KM                            # (N,)
    r, th = radius[corridor, station], angle[corridor]
    x = r * np.cos(th) - side * np.sin(th)                                          # (N,) km east
    y = r * np.sin(th) + side * np.cos(th)                                          # (N,) km north
    lat = CENTRE_LAT + y / KM_PER_DEG_LAT
    lon = CENTRE_LON + x / (KM_PER_DEG_LON_EQ * np.cos(np.radians(CENTRE_LAT)))
    ids = [f"c{k}-{'in' if i else 'out'}-{j:02d}" for k, i, j in zip(corridor, inbound, station)]

    index = {(k, bool(i), j): n for n, (k, i, j) in enumerate(zip(corridor, inbound, station))}
    src, dst, km = [], [], []
    for k in range(C):
        for j in range(S - 1):
            src += [index[k, True, j + 1], index[k, False, j]]
            dst += [index[k, True, j], index[k, False, j + 1]]
            km += [gaps[k, j]] * 2
        for m in range(C):
            if m != k:  # through the interchange: in to the hub, then out along corridor m
                src.append(index[k, True, 0])
                dst.append(index[m, False, 0])
                km.append(radius[k, 0] + radius[m, 0])
    return Network(ids, corridor, inbound, station, lat, lon,
                   np.array(src), np.array(dst), np.array(km, dtype=float))


def _gauss(h: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((h - centre) / width) ** 2)


def demand_profile(hour: np.ndarray, weekend: np.ndarray, inbound: bool) -> np.ndarray:
    """D_dir(h, weekend): relative demand; weekday peaks AM inbound, PM outbound.  (T,) -> (T,)"""
    base = 0.15 + 0.25 * _gauss(hour, 13.0, 3.5)                      # daytime background
    am, pm = (0.9, 0.35) if inbound else (0.3, 0.9)
    commute = am * _gauss(hour, 7.75, 1.0) + pm * _gauss(hour, 17.25, 1.25)
    leisure = 0.3 * _gauss(hour, 13.5, 2.5)                              # weekend midday trips
    return np.where(weekend, base + 0.3 * commute + leisure, base + commute)


def ar1(rng: np.random.Generator, shape: tuple[int, int], phi: float, std: float) -> np.ndarray:
    """Stationary AR(1) noise along axis 0.  -> (T, N)"""
    eps = rng.normal(0.0, std * np.sqrt(1 - phi**2), shape)                         # (T, N)
    out = np.empty(shape)
    out[0] = rng.normal(0.0, std, shape[1])
    for t in range(1, shape[0]):
        out[t] = phi * out[t - 1] + eps[t]
    return out


def demand(net: Network, times: pd.DatetimeIndex, freq_min: int, rng: np.random.Generator) -> np.ndarray:
    """d_n(t) = D_dir(h, weekend) * m_{corridor,dir,day} + e_n(t).  -> (T, N)"""
    hour = np.asarray(times.hour + times.minute / 60.0)                              # (T,)
    weekend = np.asarray(times.day_of_week >= 5)                                       # (T,)
    day = np.asarray((times.normalize() - times[0].normalize()).days)               # (T,)
    profile = np.stack([demand_profile(hour, weekend, inb) for inb in net.inbound], axis=1)  # (T, N)
    group = net.corridor * 2 + (~net.inbound)                                        # (N,)
    mult = np.exp(rng.normal(0.0, DAY_STD, (day.max() + 1, group.max() + 1)))      # (days, groups)
    noise = ar1(rng, profile.shape, np.exp(-freq_min / AR_TAU_MIN), AR_STD)          # (T, N)
    return profile * mult[day][:, group] + noise


def bottleneck_strength(net: Network, rng: np.random.Generator) -> np.ndarray:
    """b_n: 0.9 at each inbound approach to the interchange, ~0.8 at one outbound lane drop per
    corridor, 0.05-0.2 elsewhere.  -> (N,)"""
    b = rng.uniform(0.05, 0.2, net.n)
    b[net.inbound & (net.station == 0)] = 0.9
    S = net.station.max() + 1
    for k in range(net.corridor.max() + 1):
        j = rng.integers(max(1, S // 3), max(2, S - 1))
        b[(net.corridor == k) & ~net.inbound & (net.station == j)] = rng.uniform(0.7, 0.85)
    return b


def incidents(net: Network, T: int, freq_min: int, rate_total: float,
              rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, int, int, float]]]:
    """I_n(t): severity during the incident, exponential recovery after it.

    Returns (I (T, N), [(sensor, start step, duration steps, severity), ...]).
    """
    lo, mean_extra, hi = INCIDENT_MIN
    count = rng.poisson(rate_total)
    sensor = rng.integers(0, net.n, count)
    start = rng.integers(0, T, count)
    minutes = np.minimum(lo + rng.exponential(mean_extra, count), hi)
    steps = np.maximum(1, np.round(minutes / freq_min)).astype(int)
    severity = rng.uniform(*INCIDENT_SEVERITY, count)
    level = np.zeros((T, net.n))
    tail = int(np.ceil(6 * RECOVERY_MIN / freq_min))  # recovery below 0.25 % of the drop
    for n, a, k, sev in zip(sensor, start, steps, severity):  # union of overlapping incidents
        t = np.arange(a, min(T, a + k + tail))                                       # (W,) steps
        since_end = np.maximum(t - (a + k), 0) * freq_min                            # (W,) minutes
        level[t, n] = 1 - (1 - level[t, n]) * (1 - sev * np.exp(-since_end / RECOVERY_MIN))
    listed = [(int(sensor[i]), int(start[i]), int(steps[i]), float(severity[i]))
              for i in np.argsort(start, kind="stable")]
    return level, listed


def delayed(x: np.ndarray, lag: float) -> np.ndarray:
    """x(t - lag) with linear interpolation for fractional lags, held at x[0] before t=0.  (T,) -> (T,)"""
    lo = int(np.floor(lag))
    frac = lag - lo
    pad = np.concatenate([np.full(lo + 1, x[0]), x])                                  # (T + lo + 1,)
    T = len(x)
    return (1 - frac) * pad[1:T + 1] + frac * pad[:T]


def upstream_order(net: Network) -> list[int]:
    """Sensors ordered so that every sensor comes after all of its downstream neighbours."""
    remaining = np.bincount(net.src, minlength=net.n)  # unprocessed downstream neighbours
    ready = [n for n in range(net.n) if remaining[n] == 0]
    order: list[int] = []
    while ready:
        m = ready.pop()
        order.append(m)
        for n in net.src[net.dst == m]:
            remaining[n] -= 1
            if remaining[n] == 0:
                ready.append(int(n))
    assert len(order) == net.n, "the road graph must be acyclic for upstream propagation"
    return order


def propagate(local: np.ndarray, net: Network, freq_min: int) -> np.ndarray:
    """c_n(t) = 1 - (1 - l_n(t)) (1 - alpha * mean_m c_m(t - tau_nm)).  (T, N) -> (T, N)"""
    lag_steps = net.km / SHOCKWAVE_KMH * 60.0 / freq_min                            # (E,)
    c = np.zeros_like(local)
    for n in upstream_order(net):
        out = np.flatnonzero(net.src == n)
        if len(out) == 0:
            c[:, n] = local[:, n]
            continue
        queue = np.mean([delayed(c[:, net.dst[e]], lag_steps[e]) for e in out], axis=0)  # (T,)
        c[:, n] = 1 - (1 - local[:, n]) * (1 - SPILL * queue)
    return c


def missing_mask(T: int, N: int, freq_min: int, cfg: SyntheticConfig,
                 rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Isolated misses (Bernoulli) plus multi-hour outages (Poisson count per sensor).

    Returns (missing (T, N) bool, [(sensor, start step, duration steps), ...]).
    """
    miss = rng.random((T, N)) < cfg.missing_rate                                     # (T, N)
    outages = []
    for n in range(N):
        for _ in range(rng.poisson(cfg.outage_rate_per_sensor)):
            steps = max(1, round(rng.uniform(*OUTAGE_HOURS) * 60 / freq_min))  # <= one day <= T
            start = int(rng.integers(0, T - steps + 1))
            miss[start:start + steps, n] = True
            outages.append((n, start, steps))
    return miss, outages


def free_flow_speed(net: Network, rng: np.random.Generator) -> np.ndarray:
    """vf_n: a corridor level plus a per-sensor offset, clipped to FREE_FLOW_MPH.  -> (N,)"""
    level = rng.uniform(58.0, 68.0, net.corridor.max() + 1)
    return np.clip(level[net.corridor] + rng.normal(0.0, 2.0, net.n), *FREE_FLOW_MPH)


def speed_from(d: np.ndarray, c: np.ndarray, vf: np.ndarray, noise_mph: float,
               rng: np.random.Generator) -> np.ndarray:
    """v = vf (1 - k_d min(d, 1.2)) (1 - k_c c) + eps, floored at MIN_SPEED_MPH.  (T, N) -> (T, N)"""
    v = vf * (1 - K_DEMAND * np.minimum(d, 1.2)) * (1 - K_CONG * c)
    return np.maximum(v + rng.normal(0.0, noise_mph, v.shape), MIN_SPEED_MPH)


def simulate(cfg: SyntheticConfig, null_value: float = 0.0) -> RawData:
    """Generate the synthetic network and its speed readings (mph), nulls as ``null_value``.

    ``meta["ground_truth"]`` lists the incidents and outages (sensor, ISO start, minutes) and the
    bottleneck sensors, for tests and for slicing evaluations.
    """
    _check(cfg)
    rng = [np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(7)]
    f = cfg.freq_minutes
    T = cfg.days * 1440 // f
    times = pd.date_range(pd.Timestamp(cfg.start), periods=T, freq=f"{f}min")
    net = build_network(cfg.n_corridors, cfg.sensors_per_corridor, rng[0])

    d = demand(net, times, f, rng[1])                                                # (T, N)
    b = bottleneck_strength(net, rng[2])                                             # (N,)
    inc, inc_list = incidents(net, T, f, cfg.incident_rate_per_day * cfg.days, rng[3])
    local = 1 - (1 - b * np.tanh(np.maximum(d - D_CRIT, 0) / D_SCALE)) * (1 - inc)  # (T, N)
    c = propagate(local, net, f)                                                     # (T, N)
    speed = speed_from(d, c, free_flow_speed(net, rng[4]), cfg.noise_mph, rng[5])    # (T, N)
    miss, out_list = missing_mask(T, net.n, f, cfg, rng[6])
    speed[miss] = null_value

    ids = net.sensor_ids
    truth = {
        "incidents": [{"sensor_id": ids[n], "start": times[s].isoformat(), "duration_min": k * f,
                       "severity": round(v, 3)} for n, s, k, v in inc_list],
        "outages": [{"sensor_id": ids[n], "start": times[s].isoformat(), "duration_min": k * f}
                    for n, s, k in out_list],
        "bottlenecks": [ids[n] for n in np.flatnonzero(b >= 0.5)],
        "shockwave_kmh": SHOCKWAVE_KMH,
    }
    readings = pd.DataFrame({
        "timestamp": np.repeat(times.values.astype("datetime64[ns]"), net.n),       # (T*N,) time-major
        "sensor_id": np.tile(np.array(ids, dtype=object), T),
        "speed": speed.ravel().astype(np.float64),
    })
    sensors = pd.DataFrame({"sensor_id": ids, "lat": net.lat, "lon": net.lon})
    edges = pd.DataFrame({"from": [ids[i] for i in net.src], "to": [ids[i] for i in net.dst],
                          "value": net.km})
    meta = {"source": "synthetic", "files": {}, "null_value": null_value, "channels": ["speed"],
            "units": ["mph"], "freq": f"{f}min", "value_kind": "distance",
            "generator": dataclasses.asdict(cfg), "ground_truth": truth}
    return RawData(readings=readings, sensors=sensors, edges=edges, meta=meta)

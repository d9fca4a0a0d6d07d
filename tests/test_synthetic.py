"""The synthetic road-traffic simulator: contract, determinism and the traffic physics it promises."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stlink.config import ConfigError, SyntheticConfig
from stlink.data.formats import load_raw, save_raw
from stlink.data.synthetic import simulate

SMALL = SyntheticConfig(n_corridors=2, sensors_per_corridor=5, days=7, seed=0)
STEPS_PER_DAY = 288  # 5-minute steps


@pytest.fixture(scope="module")
def raw():
    return simulate(SMALL)


def wide(raw) -> tuple[np.ndarray, pd.DatetimeIndex]:
    """Readings as a (T, N) array in sensor order, and the T timestamps."""
    table = raw.readings.pivot(index="timestamp", columns="sensor_id", values="speed")
    return table[raw.sensor_ids].to_numpy(), pd.DatetimeIndex(table.index)


def residuals(x: np.ndarray, times: pd.DatetimeIndex, null: float) -> tuple[np.ndarray, np.ndarray]:
    """Speed minus its mean by (sensor, day type, time of day) over valid readings; 0 where null."""
    valid = x != null                                                    # (T, N)
    xn = np.where(valid, x, np.nan)
    weekend = np.asarray(times.day_of_week >= 5)                         # (T,)
    profile = np.empty_like(x)
    for kind in (False, True):
        days = xn[weekend == kind].reshape(-1, STEPS_PER_DAY, x.shape[1])  # (D, P, N)
        profile[weekend == kind] = np.tile(np.nanmean(days, axis=0), (len(days), 1))
    return np.where(valid, x - profile, 0.0), valid


def inbound_edges(raw) -> list[tuple[int, int]]:
    """(upstream, downstream) sensor indices of the edges inside inbound carriageways."""
    index = {s: i for i, s in enumerate(raw.sensor_ids)}
    return [(index[a], index[b]) for a, b in zip(raw.edges["from"], raw.edges["to"])
            if "-in-" in a and "-in-" in b and a.split("-")[0] == b.split("-")[0]]


def lagged_corr(up: np.ndarray, down: np.ndarray, lag: int) -> float:
    """corr(up[t + lag], down[t])."""
    T = len(up)
    return float(np.corrcoef(up[max(lag, 0):T + min(lag, 0)], down[max(-lag, 0):T - max(lag, 0)])[0, 1])


def typical(speeds: np.ndarray) -> float:
    """Median of the valid (non-null) readings; 0 when there are none."""
    ok = speeds[speeds != 0]
    return float(np.median(ok)) if ok.size else 0.0


def test_contract_and_regular_grid(raw):
    n = 2 * 5 * 2
    T = 7 * STEPS_PER_DAY
    r = raw.readings
    assert list(r.columns) == ["timestamp", "sensor_id", "speed"]
    assert str(r["timestamp"].dtype) == "datetime64[ns]" and r["speed"].dtype == np.float64
    assert pd.api.types.is_string_dtype(r["sensor_id"])
    assert len(raw.sensor_ids) == n == len(set(raw.sensor_ids))
    assert len(r) == n * T
    assert r.groupby(["timestamp", "sensor_id"]).size().eq(1).all()
    steps = np.unique(np.diff(np.sort(r["timestamp"].unique())))
    assert len(steps) == 1 and steps[0] == np.timedelta64(5, "m")
    assert r["timestamp"].min() == pd.Timestamp(SMALL.start)
    assert list(raw.sensors.columns) == ["sensor_id", "lat", "lon"]
    assert raw.sensors["lat"].between(33, 35).all() and raw.sensors["lon"].between(-119, -117).all()
    e = raw.edges
    assert list(e.columns) == ["from", "to", "value"]
    assert set(e["from"]) | set(e["to"]) <= set(raw.sensor_ids)
    assert (e["from"] != e["to"]).all() and (e["value"] > 0).all()
    assert not e.duplicated(["from", "to"]).any()
    # each corridor: 2 x 4 carriageway links, plus one interchange link per other corridor
    assert len(e) == 2 * (2 * 4 + 1)
    meta = raw.meta
    assert meta["source"] == "synthetic" and meta["files"] == {} and meta["null_value"] == 0.0
    assert (meta["channels"], meta["units"], meta["freq"]) == (["speed"], ["mph"], "5min")
    assert meta["value_kind"] == "distance" and meta["generator"]["seed"] == 0
    json.dumps(meta)  # source.json must be writable


def test_round_trip_through_raw_folder(tmp_path):
    raw = simulate(SyntheticConfig(n_corridors=1, sensors_per_corridor=3, days=1))
    save_raw(raw, tmp_path / "raw")
    back = load_raw(tmp_path / "raw")
    pd.testing.assert_frame_equal(back.readings, raw.readings)
    assert back.sensor_ids == raw.sensor_ids and back.meta == raw.meta
    assert back.edges[["from", "to"]].values.tolist() == raw.edges[["from", "to"]].values.tolist()


def test_deterministic_for_a_seed_and_different_for_another(raw):
    again = simulate(SMALL)
    pd.testing.assert_frame_equal(again.readings, raw.readings)
    pd.testing.assert_frame_equal(again.sensors, raw.sensors)
    pd.testing.assert_frame_equal(again.edges, raw.edges)
    assert again.meta == raw.meta
    other = simulate(SyntheticConfig(**{**SMALL.__dict__, "seed": 1}))
    assert not np.allclose(other.readings["speed"], raw.readings["speed"])
    assert not np.allclose(other.edges["value"], raw.edges["value"])
    assert other.meta["ground_truth"] != raw.meta["ground_truth"]


def test_congestion_moves_upstream_with_a_delay(raw):
    """The upstream sensor follows its downstream neighbour: cross-correlation peaks at lag > 0."""
    x, times = wide(raw)
    res, _ = residuals(x, times, 0.0)
    lags = np.arange(-6, 7)
    edges = inbound_edges(raw)
    assert len(edges) == 2 * 4
    for up, down in edges:
        corr = np.array([lagged_corr(res[:, up], res[:, down], int(k)) for k in lags])
        peak = int(lags[np.argmax(corr)])
        assert peak > 0, f"{raw.sensor_ids[up]} <- {raw.sensor_ids[down]}: peak at lag {peak}"
        assert corr[lags == peak][0] > corr[lags == -peak][0] + 0.02
        assert corr.max() > 0.4


def test_downstream_past_improves_prediction(raw):
    """Least squares on residuals: own past + downstream neighbour's past beats own past alone."""
    x, times = wide(raw)
    res, valid = residuals(x, times, 0.0)
    k, p = 3, 3  # predict 15 min ahead from the last 3 steps
    rows = np.arange(p - 1, len(x) - k)
    fit = (rows // STEPS_PER_DAY) % 2 == 0   # fit on even days, score on odd days
    sse = np.zeros(2)
    for up, down in inbound_edges(raw):
        own = np.stack([res[rows - i, up] for i in range(p)], axis=1)        # (R, p)
        nbr = np.stack([res[rows - i, down] for i in range(p)], axis=1)      # (R, p)
        y, ok = res[rows + k, up], valid[rows + k, up]                        # (R,)
        for j, feats in enumerate((own, np.hstack([own, nbr]))):
            feats = np.hstack([feats, np.ones((len(rows), 1))])
            w, *_ = np.linalg.lstsq(feats[fit & ok], y[fit & ok], rcond=None)
            sse[j] += np.sum((feats[~fit & ok] @ w - y[~fit & ok]) ** 2)
    assert sse[1] / sse[0] < 0.88, f"graph MSE / own-past MSE = {sse[1] / sse[0]:.3f}"


def test_incidents_drop_speed_and_spread_upstream():
    raw = simulate(SyntheticConfig(**{**SMALL.__dict__, "incident_rate_per_day": 3.0}))
    x, times = wide(raw)
    ids = raw.sensor_ids
    upstream = dict(zip(raw.edges["to"], raw.edges["from"]))  # one upstream neighbour is enough
    weekend = np.asarray(times.day_of_week >= 5)
    checked = spread = 0
    for inc in raw.meta["ground_truth"]["incidents"]:
        n, s = ids.index(inc["sensor_id"]), times.get_loc(pd.Timestamp(inc["start"]))
        window = np.arange(s, min(s + inc["duration_min"] // 5, len(x)))
        same_kind = (weekend == weekend[s]) & (np.arange(len(x)) // STEPS_PER_DAY != s // STEPS_PER_DAY)
        other_days = x[same_kind].reshape(-1, STEPS_PER_DAY, len(ids))[:, window % STEPS_PER_DAY]  # (D, W, N)
        ref = [typical(other_days[:, :, i]) for i in range(len(ids))]
        here = x[window, n]
        if ref[n] < 45 or (here == 0).mean() > 0.5:
            continue  # already congested at this time of day, or the sensor was out
        checked += 1
        assert here[here != 0].mean() < ref[n] - 15, f"incident {inc} invisible"
        u = ids.index(upstream.get(inc["sensor_id"], inc["sensor_id"]))
        after = x[s:min(s + len(window) + 4, len(x)), u]  # allow the shock-wave delay
        if u != n and ref[u] >= 45 and (after != 0).any():
            spread += 1
            assert after[after != 0].min() < ref[u] - 10, f"incident {inc} did not spread upstream"
    assert checked >= 5 and spread >= 3, (checked, spread)


def test_missing_readings_and_outages(raw):
    x, times = wide(raw)
    truth = raw.meta["ground_truth"]
    assert not np.isnan(x).any()
    out = np.zeros_like(x, dtype=bool)
    for o in truth["outages"]:
        assert o["duration_min"] >= 120
        s = times.get_loc(pd.Timestamp(o["start"]))
        out[s:s + o["duration_min"] // 5, raw.sensor_ids.index(o["sensor_id"])] = True
    assert len(truth["outages"]) >= 3
    assert (x[out] == 0).all()
    isolated = (x[~out] == 0).mean()
    assert 0.5 * SMALL.missing_rate < isolated < 2 * SMALL.missing_rate
    assert (x[x != 0] > 1).all()  # a valid reading never looks like the null value


def test_null_value_is_used():
    raw = simulate(SyntheticConfig(n_corridors=1, sensors_per_corridor=3, days=2), null_value=-1.0)
    speed = raw.readings["speed"].to_numpy()
    assert (speed == -1.0).any() and not (speed == 0).any() and not np.isnan(speed).any()
    assert raw.meta["null_value"] == -1.0


def test_weekends_lighter_and_peaks_follow_direction(raw):
    x, times = wide(raw)
    xn = np.where(x == 0, np.nan, x)
    hour = np.asarray(times.hour + times.minute / 60)
    weekend = np.asarray(times.day_of_week >= 5)
    am, pm = (hour >= 7) & (hour < 9), (hour >= 16.5) & (hour < 18.5)
    for direction in ("in", "out"):
        cols = [i for i, s in enumerate(raw.sensor_ids) if f"-{direction}-" in s]
        speed_am = np.nanmean(xn[am & ~weekend][:, cols])
        speed_pm = np.nanmean(xn[pm & ~weekend][:, cols])
        busy = am if direction == "in" else pm
        quiet_am_pm = (speed_pm, speed_am) if direction == "in" else (speed_am, speed_pm)
        assert quiet_am_pm[0] > quiet_am_pm[1] + 5, f"{direction}: AM {speed_am:.1f}, PM {speed_pm:.1f}"
        assert np.nanmean(xn[busy & weekend][:, cols]) > np.nanmean(xn[busy & ~weekend][:, cols]) + 5


def test_default_size_and_bad_config():
    raw = simulate(SyntheticConfig())
    assert len(raw.sensor_ids) == 72 and len(raw.readings) == 72 * 28 * STEPS_PER_DAY
    with pytest.raises(ConfigError, match="n_corridors"):
        simulate(SyntheticConfig(n_corridors=0))
    with pytest.raises(ConfigError, match="freq_minutes"):
        simulate(SyntheticConfig(freq_minutes=7))
    with pytest.raises(ConfigError, match="start"):
        simulate(SyntheticConfig(start="next tuesday"))

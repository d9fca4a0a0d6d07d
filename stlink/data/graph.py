"""Adjacency construction from the raw graph (edge list or dense matrix).

Methods (``data.adjacency.method``):
  given     the dense matrix of the source as is (LOS-LOOP ``los_adj.csv``, METR-LA ``adj_mx.pkl``)
  gaussian  DCRNN kernel on road distances: d_ij is the shortest directed path along the edges
            (edge lists give adjacent links only; DCRNN's distance files give every reachable
            pair), A_ij = exp(-(d_ij / sigma)^2), sigma = std of the finite d_ij (i != j),
            entries below ``threshold`` set to 0
  binary    1 for every edge (common for the PEMS0x edge lists)
  auto      ``given`` for dense inputs, ``gaussian`` for distance edges, the weights for weight edges
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from stlink.config import AdjacencyConfig
from stlink.data.formats import DataError, RawData


def gaussian_kernel(dist: np.ndarray, sigma: float | None, threshold: float) -> np.ndarray:
    """exp(-(d / sigma)^2) with entries below ``threshold`` zeroed; d may hold inf (no edge)."""
    finite = dist[np.isfinite(dist)]
    if sigma is None:
        sigma = float(finite.std()) if finite.size > 1 else 1.0
    sigma = sigma if sigma > 0 else 1.0
    with np.errstate(over="ignore"):
        a = np.exp(-np.square(dist / sigma))
    a[~np.isfinite(dist)] = 0.0
    a[a < threshold] = 0.0
    return a


def road_distances(direct: np.ndarray) -> np.ndarray:
    """Shortest directed path lengths (N, N) from direct link lengths (inf = no link; all > 0)."""
    from scipy.sparse.csgraph import shortest_path

    links = direct[np.isfinite(direct)]
    if (links <= 0).any() or np.isnan(direct).any():  # a negative cycle has no shortest path
        raise DataError("road distances must be positive and finite (check_edge_values first)")
    finite = np.where(np.isfinite(direct), direct, 0.0)  # csgraph reads 0 as "no link"
    return shortest_path(finite, method="D", directed=True)


def check_edge_values(edges: pd.DataFrame, kind: str) -> None:
    """Distances must be finite and > 0, weights finite and >= 0; else a ``DataError`` naming the edge.

    Validation refuses these too; prepare checks again because a negative cycle would make the
    shortest-path search run away rather than fail.
    """
    v = pd.to_numeric(edges["value"], errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(v) | ((v <= 0) if kind == "distance" else (v < 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        need = "finite and > 0" if kind == "distance" else "finite and >= 0"
        raise DataError(f"edges: {edges['from'].iloc[i]} -> {edges['to'].iloc[i]}: {kind} {float(v[i])!r} must be {need} "
                        f"({int(bad.sum())} such edges)")


def edges_to_matrix(edges: pd.DataFrame, sensor_ids: list[str], fill: float) -> np.ndarray:
    """Dense (N, N) matrix of edge values; missing pairs hold ``fill``."""
    index = {s: i for i, s in enumerate(sensor_ids)}
    n = len(sensor_ids)
    mat = np.full((n, n), fill, dtype=np.float64)
    src = edges["from"].astype(str).map(index)
    dst = edges["to"].astype(str).map(index)
    unknown = edges[src.isna() | dst.isna()]
    if len(unknown):
        row = unknown.iloc[0]
        raise DataError(f"edge {row['from']} -> {row['to']}: unknown sensor id ({len(unknown)} such edges)")
    mat[src.to_numpy(int), dst.to_numpy(int)] = edges["value"].to_numpy(np.float64)
    return mat


def build_adjacency(raw: RawData, cfg: AdjacencyConfig) -> np.ndarray:
    """(N, N) float32 adjacency in sensor order."""
    ids = raw.sensor_ids
    n = len(ids)
    method = cfg.method
    kind = raw.meta.get("value_kind", "distance")
    if raw.edges is not None:
        check_edge_values(raw.edges, kind)
    if method == "auto":
        method = "given" if raw.adjacency is not None else ("gaussian" if kind == "distance" else "weights")
    if method == "given":
        if raw.adjacency is None:
            raise DataError("data.adjacency.method=given needs a dense adjacency from the source; it has an edge list")
        a = np.asarray(raw.adjacency, dtype=np.float64)
    elif raw.edges is None:
        a = np.asarray(raw.adjacency, dtype=np.float64) if raw.adjacency is not None else np.eye(n)
        if method == "binary":
            a = (a > 0).astype(np.float64)
    elif method == "gaussian":
        if kind != "distance":
            raise DataError("data.adjacency.method=gaussian needs edge distances; this source gives weights")
        dist = road_distances(edges_to_matrix(raw.edges, ids, np.inf))
        off = dist[~np.eye(n, dtype=bool) & np.isfinite(dist)]
        sigma = cfg.sigma if cfg.sigma is not None else (float(off.std()) if off.size > 1 else None)
        a = gaussian_kernel(dist, sigma, cfg.threshold)
    elif method == "binary":
        a = (np.isfinite(edges_to_matrix(raw.edges, ids, np.inf))).astype(np.float64)
    elif method == "weights":
        a = edges_to_matrix(raw.edges, ids, 0.0)
    else:
        raise DataError(f"data.adjacency.method: unknown method {cfg.method!r} (auto|gaussian|binary|given)")
    if a.shape != (n, n):
        raise DataError(f"adjacency is {a.shape[0]}x{a.shape[1]} but there are {n} sensors")
    if not np.isfinite(a).all() or (a < 0).any():
        i, j = np.argwhere(~np.isfinite(a) | (a < 0))[0]
        raise DataError(f"adjacency: entry {ids[i]} -> {ids[j]} is {float(a[i, j])!r}; entries must be finite and >= 0")
    if cfg.self_loops:
        np.fill_diagonal(a, np.maximum(np.diag(a), 1.0))
    if cfg.symmetric:
        a = np.maximum(a, a.T)
    return a.astype(np.float32)

import numpy as np
import pandas as pd
import pytest

from stlink.config import AdjacencyConfig
from stlink.data.formats import DataError, RawData
from stlink.data.graph import build_adjacency, gaussian_kernel


def _raw(edges=None, adjacency=None, kind="distance"):
    sensors = pd.DataFrame({"sensor_id": ["a", "b", "c"], "lat": np.nan, "lon": np.nan})
    readings = pd.DataFrame({"timestamp": [], "sensor_id": [], "speed": []})
    return RawData(readings, sensors, edges, adjacency, {"value_kind": kind})


def test_gaussian_kernel_matches_dcrnn_formula():
    d = np.array([[0.0, 1.0], [2.0, np.inf]])
    a = gaussian_kernel(d, sigma=2.0, threshold=0.1)
    np.testing.assert_allclose(a, [[1.0, np.exp(-0.25)], [np.exp(-1.0), 0.0]])
    assert gaussian_kernel(np.array([[3.0]]), sigma=1.0, threshold=0.1)[0, 0] == 0.0  # e^-9 < 0.1


def test_gaussian_on_road_distances_keeps_direction_and_sigma_is_std():
    edges = pd.DataFrame({"from": ["a", "b"], "to": ["b", "c"], "value": [1.0, 3.0]})
    a = build_adjacency(_raw(edges), AdjacencyConfig(method="gaussian", threshold=1e-6))
    d = np.array([1.0, 3.0, 4.0])               # a->b, b->c, and a->c along the road
    sigma = d.std()
    assert a[0, 1] == pytest.approx(np.exp(-(1.0 / sigma) ** 2))
    assert a[0, 2] == pytest.approx(np.exp(-(4.0 / sigma) ** 2))
    assert a[1, 0] == 0.0 and a[2, 0] == 0.0    # directed: no road back
    assert np.all(np.diag(a) == 1.0)            # self loops


def test_binary_and_given():
    edges = pd.DataFrame({"from": ["a"], "to": ["c"], "value": [5.0]})
    a = build_adjacency(_raw(edges), AdjacencyConfig(method="binary", self_loops=False))
    assert a.tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 0]]
    dense = np.arange(9, dtype=float).reshape(3, 3)
    g = build_adjacency(_raw(adjacency=dense), AdjacencyConfig(method="auto", self_loops=False))
    np.testing.assert_array_equal(g, dense)


def test_edge_to_unknown_sensor_is_named():
    edges = pd.DataFrame({"from": ["a"], "to": ["zz"], "value": [1.0]})
    with pytest.raises(DataError, match="edge a -> zz: unknown sensor id"):
        build_adjacency(_raw(edges), AdjacencyConfig())


def test_given_adjacency_of_wrong_size():
    with pytest.raises(DataError, match="adjacency is 2x2 but there are 3 sensors"):
        build_adjacency(_raw(adjacency=np.eye(2)), AdjacencyConfig(method="given"))


@pytest.mark.parametrize("value, why", [(-3.0, "distance -3.0 must be finite and > 0"),
                                        (0.0, "distance 0.0 must be finite and > 0"),
                                        (np.inf, "distance inf must be finite and > 0"),
                                        (np.nan, "distance nan must be finite and > 0")])
@pytest.mark.parametrize("method", ["gaussian", "binary", "auto"])
def test_bad_edge_distances_are_refused_before_any_shortest_path(value, why, method):
    """The probe's negative cycle (a->b -3 beside b->a 1) made prepare allocate until bad_alloc."""
    edges = pd.DataFrame({"from": ["a", "b", "b"], "to": ["b", "a", "c"], "value": [value, 1.0, 2.0]})
    with pytest.raises(DataError, match=f"edges: a -> b: {why} \\(1 such edges\\)"):
        build_adjacency(_raw(edges), AdjacencyConfig(method=method))


def test_negative_weight_and_non_finite_given_matrix_are_refused():
    edges = pd.DataFrame({"from": ["a"], "to": ["b"], "value": [-1.0]})
    with pytest.raises(DataError, match="weight -1.0 must be finite and >= 0"):
        build_adjacency(_raw(edges, kind="weight"), AdjacencyConfig(method="auto"))
    dense = np.eye(3)
    dense[2, 0] = np.nan
    with pytest.raises(DataError, match="adjacency: entry c -> a is nan"):
        build_adjacency(_raw(adjacency=dense), AdjacencyConfig(method="given"))

"""CPU benchmark cases (pytest-benchmark): one gradient step and one Sinkhorn pass per backend.
Implementations are first checked to agree, then timed. Run: `make bench`."""
import pytest
import torch

from inmap_ext import _ops
from inmap_ext.functional import Runner
from inmap_ext.synthetic import make_problem

SIZES = [(20_000, 512, 100), (50_000, 256, 1000)]
BACKENDS = ["torch"] + (["ext"] if _ops.ext_available("cpu") else [])


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: "N{}xD{}xC{}".format(*s))
def problem(request):
    n, d, c = request.param
    p = make_problem(n, d, c, seed=0)
    return p.image_features, p.text_proxies


def _runner(backend, x, t):
    return Runner("cpu", backend, None, x.shape[0], t.shape[1], x.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_step(benchmark, problem, backend):
    x, t = problem
    r = _runner(backend, x, t)
    G, _ = benchmark(r.xt_softmax, x, t, 25.0)
    torch.testing.assert_close(G, _runner("torch", x, t).xt_softmax(x, t, 25.0)[0],
                               rtol=1e-4, atol=1e-3)
    benchmark.extra_info["gflop"] = 4 * x.shape[0] * x.shape[1] * t.shape[1] / 1e9


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_pass(benchmark, problem, backend):
    x, t = problem
    r = _runner(backend, x, t)
    bias = torch.zeros(t.shape[1])
    lse = benchmark(r.column_lse, x, t, bias, 100.0)
    torch.testing.assert_close(lse, _runner("torch", x, t).column_lse(x, t, bias, 100.0),
                               rtol=1e-4, atol=1e-4)

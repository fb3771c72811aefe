"""A backend whose optional dependency is missing is reported as unavailable, with the install command,
so benchmarks skip it with a printed reason instead of stopping on an ImportError."""
from __future__ import annotations

import importlib.util

import fedlearn.simulation.backends as backends
from fedlearn.simulation.backends import backend_unavailable


def test_a_missing_ray_is_reported_with_the_extra_that_installs_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None if name == "ray" else real(name))
    assert backend_unavailable("ray") == "ray is not installed (pip install 'fedlearn[ray]')"
    assert backend_unavailable("sequential") is None and backend_unavailable("process") is None


def test_an_installed_ray_is_available():
    if importlib.util.find_spec("ray") is None:
        return  # covered by the test above: this environment lacks the extra
    assert backend_unavailable("ray") is None

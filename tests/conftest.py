import os
import sys

from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))  # tests import their helpers from utils.py

# Hypothesis profiles (tests/test_properties.py): "ci" draws the same few examples on every run
# (derandomized, no example database) so CI stays fast and reproducible; "thorough", chosen with
# NSA_HYPOTHESIS_PROFILE=thorough, draws many more, randomly, for a search on demand.
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None,
                          print_blob=True, suppress_health_check=_QUIET)
settings.register_profile("thorough", max_examples=500, deadline=None, print_blob=True,
                          suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("NSA_HYPOTHESIS_PROFILE", "ci"))

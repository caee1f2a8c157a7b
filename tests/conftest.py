import os
import pathlib

import pytest
from hypothesis import settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("PA_JAX_SHARED_DATA", ROOT.parent / "shared" / "data"))

# JIT compilation makes the first example slow: no per-example deadline; a fixed derandomized
# profile in CI so runs are reproducible.
settings.register_profile("default", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The read-only evaluation data beside the repo (../shared/data); skip if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set PA_JAX_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The CLI tests' tiny checkpoints (``helpers.cli_checkpoints``): (folder, tokenizer, PyTorch models)."""
    from helpers import cli_checkpoints

    return cli_checkpoints(tmp_path_factory.mktemp("ckpt"))

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402  (after the environment defaults above, which must precede any torch/deepspeed import)

# The long tier: tests marked ``@pytest.mark.long`` are long variants of checks that a shorter test makes in the
# suite; they run only with MCD_LONG_TESTS=1 (tools/dev/long_tests.py). docs/testing.md lists each one and the test
# that covers it in the suite.
LONG_TESTS_ENV = "MCD_LONG_TESTS"


def pytest_configure(config):
    config.addinivalue_line("markers", f"long: a long variant, run only with {LONG_TESTS_ENV}=1 "
                                       "(tools/dev/long_tests.py); docs/testing.md names its short cover")


def pytest_collection_modifyitems(config, items):
    if os.environ.get(LONG_TESTS_ENV, "") == "1":
        return
    skip = pytest.mark.skip(reason=f"long tier ({LONG_TESTS_ENV}=1, tools/dev/long_tests.py; covered short: "
                                   "docs/testing.md)")
    for item in items:
        if item.get_closest_marker("long") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """(prepared corpus, run directory): tests/tiny_run.py's corpus and 2-step single-process run with its step-2
    checkpoint, built once per session and shared READ-ONLY by the checkpoint, conversion and entry-point tests
    (each copies what it changes). Teardown fails the session if any test changed a file of it."""
    from tests import tiny_run

    tmp = str(tmp_path_factory.mktemp("tiny_base"))
    data = tiny_run.prepare(tmp)
    run_dir = os.path.join(tmp, "run")
    res = tiny_run.train(run_dir, data, "train.steps=2")
    assert res.returncode == 0, res.stderr
    before = tiny_run.tree_digest(tmp)
    yield data, run_dir
    assert tiny_run.tree_digest(tmp) == before, "a test changed the shared tiny_base run or corpus: copy it first"

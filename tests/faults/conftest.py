import pytest

from tests.faults import common


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    return common.prepare_corpus(str(tmp_path_factory.mktemp("faults_corpus")))


@pytest.fixture(scope="session")
def teacher(tmp_path_factory) -> str:
    return common.make_teacher(str(tmp_path_factory.mktemp("faults_teacher")))

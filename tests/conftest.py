import logging

import pytest

from tests import tiny


def pytest_configure(config):
    logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def bpe_member():
    return tiny.member_bpe()


@pytest.fixture(scope="session")
def bpe_member_qwen():
    return tiny.member_bpe_qwen()


@pytest.fixture(scope="session")
def sp_member():
    return tiny.member_sp()


@pytest.fixture(scope="session", params=["bpe", "bpe_qwen", "sp"])
def any_member(request, bpe_member, bpe_member_qwen, sp_member):
    return {"bpe": bpe_member, "bpe_qwen": bpe_member_qwen, "sp": sp_member}[request.param]

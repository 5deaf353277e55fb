import pytest

from pensieve.operator.settings import Settings


@pytest.fixture
def settings() -> Settings:
    return Settings()

import pytest
from eval_world import World, make_world


@pytest.fixture(scope="session")
def world() -> World:
    return make_world()

"""The fixtures every test module can use, one module per concern under tests/fixtures/."""
import pytest

pytest_plugins = ["tests.fixtures.records", "tests.fixtures.qwen", "tests.fixtures.llm", "tests.fixtures.stores", "tests.fixtures.jobs"]


@pytest.fixture(scope="session", autouse=True)
def embedding_cache_dir(tmp_path_factory):
    """The on-disk MiniLM embedding cache of the whole session (and of the processes it starts) in a
    temporary folder, never the user's ~/.cache/psydef."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("embedding-cache")
        mp.setenv("PSYDEF_CACHE_DIR", str(folder))
        yield folder

"""The fixtures every test module can use, one module per concern under tests/fixtures/."""
pytest_plugins = ["tests.fixtures.records", "tests.fixtures.qwen", "tests.fixtures.llm", "tests.fixtures.stores", "tests.fixtures.jobs"]

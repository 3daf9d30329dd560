"""Shared fixtures: one local Azure stack (Azurite + fake identity + fake Azure OpenAI) per test session,
and a fake Application Insights ingestion endpoint per test that wants one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.stack import LocalStack
from tests.stack.app_insights import FakeIngestion


@pytest.fixture(scope="session")
def stack_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture
def stack(stack_session: LocalStack) -> LocalStack:
    """The running stack with the fakes' configuration and counters reset for this test."""
    stack_session.openai.reset()
    stack_session.identity.reset()
    return stack_session


@pytest.fixture
def ingestion(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeIngestion]:
    """A running fake ingestion endpoint, and this process's environment pointed at it (`environ()` has
    the same variables for a child process)."""
    with FakeIngestion() as fake:
        for name, value in fake.environ().items():
            monkeypatch.setenv(name, value)
        yield fake

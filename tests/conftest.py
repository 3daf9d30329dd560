"""Shared fixtures: one local Azure stack (Azurite + fake identity + fake Azure OpenAI) per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.stack import LocalStack


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

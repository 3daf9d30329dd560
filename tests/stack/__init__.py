"""The local Azure stack: Azurite, a fake managed-identity endpoint and a fake Azure OpenAI on 127.0.0.1."""

from .local_stack import LocalStack

__all__ = ["LocalStack"]

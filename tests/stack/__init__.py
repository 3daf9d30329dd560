"""The local Azure stack on 127.0.0.1: Azurite, a fake Azure OpenAI, and stand-ins for every way to get an Entra
token (managed-identity endpoint, Entra authority, GCE metadata server, fake `az`, scripted browser)."""

from .local_stack import LocalStack

__all__ = ["LocalStack"]

"""An asyncio batch worker for Azure OpenAI: prompt files in, Batch API result lines out, keyless."""

__version__ = "0.1.0"

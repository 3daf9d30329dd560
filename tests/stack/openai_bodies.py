"""Response bodies of Azure OpenAI, shaped like the real service's (success and every error we fake)."""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import time
import uuid
from typing import Any

ENTRA_401 = {
    "statusCode": 401,
    "message": "Unauthorized. Access token is missing, invalid, audience is incorrect "
    "(https://cognitiveservices.azure.com), or have expired.",
}
API_KEY_401 = {
    "error": {
        "code": "401",
        "message": "Access denied due to invalid subscription key or wrong API endpoint. "
        "Make sure to provide a valid key for an active subscription and use a correct regional API "
        "endpoint for your resource.",
    }
}
RESOURCE_NOT_FOUND = {"error": {"code": "404", "message": "Resource not found"}}
DEPLOYMENT_NOT_FOUND = {
    "error": {
        "code": "DeploymentNotFound",
        "message": "The API deployment for this resource does not exist. "
        "If you created the deployment within the last 5 minutes, please wait a moment and try again.",
    }
}


def operation_not_supported(operation: str, deployment: str) -> dict[str, Any]:
    """400 for an operation the deployment's model does not do (chat on an embeddings model)."""
    name = "chatCompletion" if operation == "chat" else "embeddings"
    return {
        "error": {
            "code": "OperationNotSupported",
            "message": f"The {name} operation does not work with the specified model, {deployment}. "
            "Please choose different model and try again. You can learn more about which models can be "
            "used with each operation here: https://go.microsoft.com/fwlink/?linkid=2197993.",
        }
    }


SERVER_ERROR_500 = {
    "error": {
        "message": "The server had an error while processing your request. Sorry about that!",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}
SERVICE_UNAVAILABLE_503 = {
    "error": {
        "code": "ServiceUnavailable",
        "message": "The service is temporarily unable to process your request. Please try again later.",
    }
}
_SAFE = {"filtered": False, "severity": "safe"}
_CLEAN_FILTER_RESULTS = dict.fromkeys(("hate", "self_harm", "sexual", "violence"), _SAFE)
PROMPT_FILTERED_400 = {
    "error": {
        "code": "content_filter",
        "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management "
        "policy. Please modify your prompt and retry. To learn more about our content filtering policies "
        "please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766",
        "param": "prompt",
        "type": None,
        "status": 400,
        "innererror": {
            "code": "ResponsibleAIPolicyViolation",
            "content_filter_result": {
                **_CLEAN_FILTER_RESULTS,
                "hate": {"filtered": True, "severity": "high"},
                "jailbreak": {"filtered": False, "detected": False},
            },
        },
    }
}
_OPERATION_NAMES = {"chat": "ChatCompletions_Create", "embeddings": "Embeddings_Create"}


def invalid_request_400(message: str) -> dict[str, Any]:
    """A 400 for a request body the service cannot parse."""
    return {
        "error": {"code": "BadRequest", "message": message, "param": None, "type": "invalid_request_error"}
    }


def rate_limited_429(operation: str, api_version: str, limit: str, retry_after_s: int) -> dict[str, Any]:
    """The 429 body; `limit` is "tokens" or "requests"; `retry_after_s` in whole seconds."""
    kind = "token rate limit" if limit == "tokens" else "call rate limit"
    return {
        "error": {
            "code": "429",
            "message": f"Requests to the {_OPERATION_NAMES[operation]} Operation under Azure OpenAI API "
            f"version {api_version} have exceeded {kind} of your current OpenAI S0 pricing tier. "
            f"Please retry after {retry_after_s} seconds. Please go here: https://aka.ms/oai/quotaincrease "
            "if you would like to further increase the default rate limit.",
        }
    }


def chat_completion(
    model: str, content: str, *, prompt_tokens: int, completion_tokens: int, output_filtered: bool
) -> dict[str, Any]:
    """A `chat.completion` object with one choice."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:29]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_local_stack",
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": _CLEAN_FILTER_RESULTS}],
        "choices": [
            {
                "index": 0,
                "finish_reason": "content_filter" if output_filtered else "stop",
                "logprobs": None,
                "message": {
                    "role": "assistant",
                    "content": None if output_filtered else content,
                    "refusal": None,
                },
                "content_filter_results": (
                    {**_CLEAN_FILTER_RESULTS, "violence": {"filtered": True, "severity": "medium"}}
                    if output_filtered
                    else _CLEAN_FILTER_RESULTS
                ),
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for `text` (same text, same vector)."""
    digest = hashlib.sha256(text.encode()).digest()
    while len(digest) < dimensions:
        digest += hashlib.sha256(digest).digest()
    raw = [byte / 255.0 - 0.5 for byte in digest[:dimensions]]
    norm = math.sqrt(sum(value * value for value in raw)) or 1.0
    return [value / norm for value in raw]


def embedding_list(
    model: str, texts: list[str], *, dimensions: int, as_base64: bool, prompt_tokens: int
) -> dict[str, Any]:
    """A `list` of `embedding` objects; base64 means little-endian float32, as the SDK asks by default."""
    data: list[dict[str, Any]] = []
    for index, text in enumerate(texts):
        vector = embedding_vector(text, dimensions)
        encoded: list[float] | str = (
            base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }

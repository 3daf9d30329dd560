"""SharedTokens: one fetch for many callers, one refresh for many rejections, claims past the cache."""

import asyncio
import time

import pytest
from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError

from worker.errors import ConfigError
from worker.identity import SharedTokens, TokenEndpointUnavailable, is_transient


class CountingCredential:
    """A credential that issues token-1, token-2, ... and remembers what it was asked."""

    def __init__(self, *, lifetime: float = 3600, refuse_claims: bool = False, unreachable: int = 0) -> None:
        self.requests: list[dict[str, object]] = []
        self.lifetime = lifetime
        self.refuse_claims = refuse_claims
        self.unreachable = unreachable

    async def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        await asyncio.sleep(0.01)
        if self.unreachable:
            self.unreachable -= 1
            raise ServiceRequestError("connection refused")
        if options and options.get("claims") and self.refuse_claims:
            raise ClientAuthenticationError("claims are not supported")
        self.requests.append({"scope": scopes[0], **(options or {})})
        return AccessTokenInfo(f"token-{len(self.requests)}", int(time.time() + self.lifetime))

    async def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        info = await self.get_token_info(*scopes)
        return AccessToken(info.token, info.expires_on)

    async def close(self) -> None: ...


async def test_a_hundred_concurrent_callers_share_one_fetch() -> None:
    credential = CountingCredential()
    tokens = SharedTokens(credential)  # type: ignore[arg-type]
    got = await asyncio.gather(*(tokens.token("scope-a") for _ in range(100)))
    assert {t.token for t in got} == {"token-1"}
    assert len(credential.requests) == 1
    await tokens.token("scope-b")
    assert len(credential.requests) == 2  # one per scope


async def test_a_token_near_expiry_is_replaced() -> None:
    credential = CountingCredential(lifetime=120)  # inside the 5-minute refresh margin
    tokens = SharedTokens(credential)  # type: ignore[arg-type]
    await tokens.token("s")
    await tokens.token("s")
    assert len(credential.requests) == 2


async def test_many_rejections_of_one_token_cause_one_refresh_with_claims() -> None:
    credential = CountingCredential()
    tokens = SharedTokens(credential)  # type: ignore[arg-type]
    rejected = (await tokens.token("s")).token
    renewed = await asyncio.gather(*(tokens.refresh("s", rejected) for _ in range(50)))
    assert all(renewed)
    assert len(credential.requests) == 2
    assert "claims" in credential.requests[1]
    assert (await tokens.token("s")).token == "token-2"
    assert tokens.refreshes == 1


async def test_a_credential_that_refuses_claims_is_asked_again_without_them() -> None:
    credential = CountingCredential(refuse_claims=True)
    tokens = SharedTokens(credential)  # type: ignore[arg-type]
    rejected = (await tokens.token("s")).token
    assert await tokens.refresh("s", rejected)
    assert "claims" not in credential.requests[1]


async def test_waiters_of_a_failed_fetch_share_its_outcome() -> None:
    credential = CountingCredential(unreachable=100)
    tokens = SharedTokens(credential)  # type: ignore[arg-type]
    outcomes = await asyncio.gather(*(tokens.token("s") for _ in range(50)), return_exceptions=True)
    assert all(isinstance(o, TokenEndpointUnavailable) for o in outcomes)
    assert isinstance(outcomes[0], ServiceRequestError)  # so the callers' retry layers retry it
    assert credential.unreachable == 99  # one request to the endpoint for fifty callers


async def test_a_failed_refresh_ahead_keeps_serving_the_valid_token() -> None:
    credential = CountingCredential(lifetime=120)  # valid, but inside the refresh margin
    tokens = SharedTokens(credential)  # type: ignore[arg-type]
    first = await tokens.token("s")
    credential.unreachable = 1
    assert (await tokens.token("s")).token == first.token
    assert (await tokens.token("s")).token == first.token  # no new attempt before the retry time
    assert credential.unreachable == 0
    assert len(credential.requests) == 1


async def test_an_expired_token_is_not_served_when_the_endpoint_fails() -> None:
    credential = CountingCredential(lifetime=10)
    tokens = SharedTokens(credential)  # type: ignore[arg-type]
    await tokens.token("s")
    credential.unreachable = 1
    with pytest.raises(TokenEndpointUnavailable):
        await tokens.token("s")


@pytest.mark.parametrize(
    ("message", "transient"),
    [
        (
            "DefaultAzureCredential failed to retrieve a token from the included credentials.\n"
            "Attempted credentials:\n\tEnvironmentCredential: EnvironmentCredential authentication unavailable.\n"
            "\tManagedIdentityCredential: Server disconnected\nTo mitigate this issue, ...",
            True,
        ),
        (
            "DefaultAzureCredential failed to retrieve a token from the included credentials.\n"
            "Attempted credentials:\n\tManagedIdentityCredential: Unable to load the proper Managed Identity.",
            False,
        ),
        (
            "DefaultAzureCredential failed to retrieve a token from the included credentials.\n"
            "Attempted credentials:\n\tEnvironmentCredential: AADSTS7000215: Invalid client secret provided.",
            False,
        ),
        (
            "DefaultAzureCredential failed to retrieve a token from the included credentials.\n"
            "Attempted credentials:\n\tEnvironmentCredential: EnvironmentCredential authentication unavailable.",
            False,
        ),
        ("AADSTS700016: Application not found in the directory", False),
        (
            "DefaultAzureCredential failed to retrieve a token from the included credentials.\n"
            "Attempted credentials:\n\tAzureCliCredential: Azure CLI not found on path\n"
            "\tAzurePowerShellCredential: PowerShell is not installed",
            False,
        ),
        (
            "DefaultAzureCredential failed to retrieve a token from the included credentials.\n"
            "Attempted credentials:\n\tManagedIdentityCredential: (None) Service Unavailable",
            True,
        ),
    ],
)
def test_transient_and_definitive_credential_failures(message: str, transient: bool) -> None:
    assert is_transient(ClientAuthenticationError(message)) is transient


async def test_an_authentication_failure_is_a_config_error_naming_the_scope() -> None:
    class Refusing(CountingCredential):
        async def get_token_info(
            self, *scopes: str, options: TokenRequestOptions | None = None
        ) -> AccessTokenInfo:
            raise ClientAuthenticationError("AADSTS7000215: Invalid client secret provided.\nTrace ID: x")

    tokens = SharedTokens(Refusing())  # type: ignore[arg-type]
    with pytest.raises(
        ConfigError, match=r"could not get a token for s: AADSTS7000215: Invalid client secret provided\.$"
    ):
        await tokens.token("s")


async def test_a_challenge_with_claims_goes_to_the_credential_and_replaces_the_cache() -> None:
    credential = CountingCredential()
    tokens = SharedTokens(credential)  # type: ignore[arg-type]
    await tokens.get_token_info("s")
    challenged = await tokens.get_token_info("s", options={"claims": '{"access_token":{}}'})
    assert challenged.token == "token-2"
    assert (await tokens.get_token("s")).token == "token-2"

"""The append blob's limits follow the service version the SDK sends."""

import pytest
from azure.storage.blob.aio import BlobClient, BlobLeaseClient

from worker.storage import ResultFileFull
from worker.storage.blob import APPEND_RESERVE, MAX_APPEND_BLOCKS, MIB, BlobUnit, append_block_limit


async def test_the_sdks_service_version_takes_appends_of_100_mib() -> None:
    async with BlobClient("https://account.blob.core.windows.net", "container", "a.results.jsonl") as blob:
        assert blob.api_version >= "2022-11-02"
        assert append_block_limit(blob.api_version) == 100 * MIB


def test_older_service_versions_take_4_mib() -> None:
    assert append_block_limit("2021-12-02") == 4 * MIB
    assert append_block_limit("2022-11-02") == 100 * MIB


async def test_an_append_blob_near_its_block_limit_is_full_before_any_request() -> None:
    async with BlobClient("https://account.blob.core.windows.net", "container", "a.results.jsonl") as blob:
        unit = BlobUnit(blob, BlobLeaseClient(blob), renew_every=3600, version="v1")
        try:
            unit.appends_used = MAX_APPEND_BLOCKS - APPEND_RESERVE
            with pytest.raises(ResultFileFull, match="split this input"):
                await unit.append(b"a line\n")  # no request: the account does not exist
        finally:
            unit.stop_renewing()

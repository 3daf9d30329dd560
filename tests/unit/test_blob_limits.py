"""The append blob's limits follow the service version the SDK sends."""

from azure.storage.blob.aio import BlobClient

from worker.storage.blob import MIB, append_block_limit


async def test_the_sdks_service_version_takes_appends_of_100_mib() -> None:
    async with BlobClient("https://account.blob.core.windows.net", "container", "a.results.jsonl") as blob:
        assert blob.api_version >= "2022-11-02"
        assert append_block_limit(blob.api_version) == 100 * MIB


def test_older_service_versions_take_4_mib() -> None:
    assert append_block_limit("2021-12-02") == 4 * MIB
    assert append_block_limit("2022-11-02") == 100 * MIB

"""`make demo`: start the local Azure stack, upload the sample prompts, run `worker run` exactly as a
Container Apps job with a user-assigned managed identity would, show the summary and some results, stop.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.stack import LocalStack

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "examples" / "prompts"
WORKDIR = ROOT / ".demo"


def main() -> int:
    shutil.rmtree(WORKDIR, ignore_errors=True)
    print(
        "Starting the local Azure stack (Azurite over HTTPS + OAuth, managed-identity endpoint, Azure OpenAI fake)..."
    )
    with LocalStack(WORKDIR) as stack:
        blobs = stack.blob_service()
        prompts = blobs.create_container("prompts")
        for path in sorted(PROMPTS.rglob("*")):
            if path.is_file():
                prompts.upload_blob(path.relative_to(PROMPTS).as_posix(), path.read_bytes())
                print(f"  uploaded prompts/{path.relative_to(PROMPTS).as_posix()}")
        stack.openai.configure(latency_ms=150, jitter_ms=100)

        env = {
            **stack.worker_env("managed-identity"),
            "WORKER_SOURCE": stack.blob_url("prompts"),
            "WORKER_SINK": stack.blob_url("results", "nightly/"),
            "CONTAINER_APP_JOB_NAME": "aoai-batch-demo",
            "CONTAINER_APP_JOB_EXECUTION_NAME": "aoai-batch-demo-7x2k9",
            "WORKER_LOG_FORMAT": "json",
        }
        shown = {
            k: v
            for k, v in env.items()
            if k.startswith(("WORKER_", "AZURE_", "IDENTITY_ENDPOINT", "CONTAINER_APP"))
        }
        print("\nRunning `worker run` with the Container Apps job environment:")
        for key, value in sorted(shown.items()):
            print(f"  {key}={value}")
        print()
        worker = str(Path(sys.executable).parent / "worker")
        done = subprocess.run(
            [worker, "run", "--concurrency", "8"], env=env, capture_output=True, text=True, check=False
        )
        log_lines = done.stdout.strip().splitlines()
        for line in log_lines[-6:-1]:
            print("  log:", line[:160])
        summary = json.loads(log_lines[-1])
        print("\nLast line (run.summary):")
        print(json.dumps(summary, indent=2))

        results = blobs.get_container_client("results")
        print("\nResult files:")
        shown_results = 0
        for blob in results.list_blobs(name_starts_with="nightly/", include=["metadata"]):
            print(f"  results/{blob.name}  ({blob.size} bytes, metadata {blob.metadata})")
        for blob in results.list_blobs(name_starts_with="nightly/"):
            if not blob.name.endswith(".results.jsonl") or shown_results >= 6:
                continue
            for line in results.download_blob(blob.name).readall().splitlines():
                record = json.loads(line)
                if record["error"]:
                    outcome = f"ERROR {record['error']['code']}: {record['error']['message'][:80]}"
                else:
                    outcome = record["response"]["body"]["choices"][0]["message"]["content"][:100]
                print(f"  {record['custom_id']:<28} {outcome}")
                shown_results += 1
        print(f"\nworker exit code: {done.returncode} (0 = every item reached a final state)")
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
        return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())

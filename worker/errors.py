"""The worker's errors, one class per meaning.

    WorkerError
    ├── ConfigError            a setting is missing or wrong; exit 2 with a message that says what to fix
    │   └── AccessDenied       storage or Azure OpenAI refused the identity (a role is missing); exit 2
    ├── LeaseLost              another replica took a work unit this process held; the unit stops
    ├── UnitHeld               another process holds a work unit's lease right now
    ├── UnsafeName             a path would lead outside SOURCE or SINK; nothing is read or written there
    ├── NameCollision          a result path holds a file that is not the worker's own; it is never touched
    └── Unfinished             an item ends this run without a record; exit 1, the next run retries it
        └── DeploymentDown     a deployment is out for this run (outage past --outage-seconds, or it
                               asked for a wait longer than the worker may wait, e.g. a daily quota)

Messages never contain a secret, key or token: callers pass names and places, not values.
"""


class WorkerError(Exception):
    """Base class of the worker's own errors."""


class ConfigError(WorkerError):
    """A configuration or usage error: the run cannot start or cannot go on. Exit code 2."""


class AccessDenied(ConfigError):
    """The identity was authenticated but not authorised (or not authenticated at all) by a service."""


class LeaseLost(WorkerError):
    """The lease on a work unit expired or was taken: stop writing to it."""


class UnitHeld(WorkerError):
    """Another process holds the lease (or lock) on a work unit at this moment."""


class Unfinished(WorkerError):
    """Retryable failures are left (attempts spent while the service was otherwise healthy): the item
    gets no record this run and the next run tries it again."""


class DeploymentDown(Unfinished):
    """A deployment is unavailable for the rest of this run; its items are left for the next run."""

    def __init__(self, deployment: str, reason: str) -> None:
        super().__init__(f"deployment {deployment!r} {reason}")
        self.deployment = deployment


class UnsafeName(WorkerError):
    """A name is not valid (see storage.names) or its path resolves outside its root: it is not used."""


class NameCollision(WorkerError):
    """The result path of an input is taken by a file or blob the worker did not create."""


def first_line(message: str | None) -> str:
    """The first line of a long error message (a credential's, an SDK's): it carries the cause, and never
    a secret."""
    return (message or "").strip().splitlines()[0] if message and message.strip() else "authentication failed"
